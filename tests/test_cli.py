"""The `compiled-llm` command line on a tiny model saved as an HF directory."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch
from conftest import tiny_model

from compiled_llm import CompileConfig, compile_model
from compiled_llm.cli import main


def test_build_prints_the_report_and_stores_the_warm_start(tmp_path, capsys):
    tiny_model("llama").save_pretrained(tmp_path / "model")
    build = ["build", str(tmp_path / "model"), "--compile-backend", "eager", "--max-seq-len", "64", "--cache-dir",
             str(tmp_path / "cache")]  # fmt: skip
    assert main(build) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "insert_paged_attention" in out and "max_seq_len 64" in out
    assert "max_seq_len 64; sized for max_batch_size=64 sequences of max_seq_len" in out
    assert "(stored in the graph cache)" in out and f"warm-start caches under {tmp_path / 'cache'}" in out
    assert main(build) == 0
    assert "rewritten graph from the graph cache (no torch.export, no passes)" in capsys.readouterr().out


def test_build_rejects_bad_input(tmp_path, capsys):
    assert main(["build", str(tmp_path / "missing")]) == 2
    assert "is none of: a local Hugging Face directory" in capsys.readouterr().err
    tiny_model("llama").save_pretrained(tmp_path)
    assert main(["build", str(tmp_path), "--max-batch-size", "zero"]) == 2
    assert "max_batch_size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["frobnicate"])


def test_bench_throughput_runs_every_request_to_its_length(tmp_path, capsys):
    import json

    tiny_model("llama").save_pretrained(tmp_path / "model")
    out_json = tmp_path / "result.json"
    args = ["bench", str(tmp_path / "model"), "--mode", "throughput", "--num-requests", "6", "--input-len", "9",
            "--output-len", "5", "--max-batch-size", "4", "--max-seq-len", "64", "--compile-backend", "eager",
            "--json", str(out_json)]  # fmt: skip
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "compiled-llm / hf-eager" in table
    result = json.loads(out_json.read_text())
    ours, hf = result["results"]
    assert ours["system"] == "compiled-llm" and hf["system"] == "hf-eager"
    assert ours["output_tokens"] == hf["output_tokens"] == 6 * 5
    assert ours["ttft_s"]["p50"] <= ours["ttft_s"]["p90"] <= ours["ttft_s"]["p99"]
    assert ours["prefix_cache_hit_tokens"] == 0  # the warm-up's prompts share no blocks with the measured ones
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("\n".join(json.dumps({"prompt_token_ids": [5 + i, 6, 7]}) for i in range(3)))
    args = ["bench", str(tmp_path / "model"), "--mode", "throughput", "--num-requests", "3", "--dataset", str(dataset),
            "--output-len", "2", "--baselines", "none", "--compile-backend", "eager", "--max-seq-len", "64"]  # fmt: skip
    assert main(args) == 0
    args[args.index("3")] = "4"
    assert main(args) == 2
    assert "has 3 prompts, fewer than --num-requests 4" in capsys.readouterr().err


def test_a_throughput_run_takes_serving_limits_where_the_config_sets_none(tmp_path):
    from compiled_llm.bench.throughput import throughput_config
    from compiled_llm.cli_config import config_from_args

    serving = throughput_config(CompileConfig(), 3000)
    assert (serving.max_batch_size, serving.max_num_tokens) == (512, 16384)
    assert throughput_config(CompileConfig(), 6).max_batch_size == 64  # the default, never below it
    assert throughput_config(CompileConfig(num_kv_blocks=100), 3000).max_batch_size == 100  # a block a sequence
    given = throughput_config(CompileConfig(max_batch_size=4, max_num_tokens=256), 3000)
    assert (given.max_batch_size, given.max_num_tokens) == (4, 256)
    # the command line's: a flag or a --config file's field counts as set, even at the default's value
    config_file = tmp_path / "config.yaml"
    config_file.write_text("max_num_tokens: 8192\n")
    args = argparse.Namespace(**dict.fromkeys(CompileConfig.model_fields), config=str(config_file))
    args.max_batch_size = "64"
    flagged = throughput_config(config_from_args(args), 3000)
    assert (flagged.max_batch_size, flagged.max_num_tokens) == (64, 8192)


def test_bench_latency_on_cpu_with_its_profile(tmp_path, capsys):
    tiny_model("llama").save_pretrained(tmp_path)
    args = ["bench", str(tmp_path), "--mode", "latency", "--input-len", "6", "--output-len", "6", "--repeats", "1",
            "--baselines", "hf-eager", "--profile", "--compile-backend", "eager", "--max-seq-len", "64"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"compiled-llm / hf-eager: \S+x", out)  # a tiny model's timings: any value
    profile = out[out.index("profile (16 decode steps") :].splitlines()[1:]
    assert len(profile) == 15 and all(re.match(r"\s+\d+\.\d%\s+\d+\.\d ms\s+\d+x  \S", row) for row in profile)


def test_bench_latency_compares_each_named_pass_on_against_off(tmp_path, capsys):
    """One run: the model compiled again without each pass named, its figure and the on / off ratio; a pass not
    in the pipeline, or one the runtime needs, is refused before anything compiles."""
    tiny_model("llama").save_pretrained(tmp_path / "model")
    # 3 repeats: one run of 12 tokens on a loaded 2-core machine took less than its first token alone had (CI, nan)
    base = ["bench", str(tmp_path / "model"), "--mode", "latency", "--input-len", "4", "--output-len", "12",
            "--repeats", "3", "--baselines", "none", "--compile-backend", "eager", "--max-seq-len", "32"]  # fmt: skip
    out = tmp_path / "out.json"
    assert main([*base, "--compare-passes", "fuse_rms_norm, fuse_parallel_linears", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"fuse_rms_norm: on / off \d+\.\d{3}x", text) and "fuse_parallel_linears: on / off" in text
    result = json.loads(out.read_text())
    assert [r["system"] for r in result["results"]] == [
        "compiled-llm",
        "without fuse_rms_norm",
        "without fuse_parallel_linears",
    ]
    assert set(result["results"][0]["details"]["pass_gains"]) == {"fuse_rms_norm", "fuse_parallel_linears"}
    assert main([*base, "--compare-passes", "fuse_norm_quantize_fp8"]) == 2  # opt-in: not in the default pipeline
    assert "'fuse_norm_quantize_fp8' is not in the pipeline" in capsys.readouterr().err
    assert main([*base, "--compare-passes", "insert_paged_attention"]) == 2
    assert "required by the runtime" in capsys.readouterr().err
    assert main([*base[:3], "throughput", *base[4:], "--compare-passes", "fuse_rms_norm"]) == 2
    assert "takes --mode latency" in capsys.readouterr().err


def test_bench_latency_counts_the_weights_as_the_graph_stores_them(tmp_path):
    """The bandwidth limits' weight bytes are those the compiled graph reads: fp8 linears at a byte a value."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    sizes = {}
    for quantization in ("none", "fp8"):
        out = tmp_path / f"{quantization}.json"
        args = ["bench", str(tmp_path / "model"), "--mode", "latency", "--input-len", "4", "--output-len", "2",
                "--repeats", "1", "--baselines", "none", "--compile-backend", "eager", "--max-seq-len", "32",
                "--quantization", quantization, "--json", str(out)]  # fmt: skip
        assert main(args) == 0
        sizes[quantization] = json.loads(out.read_text())["weight_bytes"]
    assert sizes["none"] >= sum(p.nbytes for p in model.parameters())
    linears = sum(p.nbytes for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name
                  and "lm_head" not in name)  # fmt: skip
    assert sizes["none"] - sizes["fp8"] >= 0.7 * linears  # float32 -> float8: a quarter, plus a scale a row


def test_config_file_with_flags_over_it(tmp_path, capsys):
    tiny_model("llama").save_pretrained(tmp_path / "model")
    config = tmp_path / "config.yaml"
    config.write_text("compile_backend: eager\nmax_seq_len: 48\nmax_batch_size: 2\n")
    assert main(["build", str(tmp_path / "model"), "--config", str(config)]) == 0
    assert "max_seq_len 48" in capsys.readouterr().out
    assert main(["build", str(tmp_path / "model"), "--config", str(config), "--max-seq-len", "40"]) == 0
    assert "max_seq_len 40" in capsys.readouterr().out  # the flag wins
    config.write_text("max_seq_len: 48\nmax_sequence_length: 9\n")
    assert main(["build", str(tmp_path / "model"), "--config", str(config)]) == 2
    assert "unknown field 'max_sequence_length' (did you mean 'max_seq_len'?)" in capsys.readouterr().err
    config.write_text("max_batch_size: -1\n")
    assert main(["build", str(tmp_path / "model"), "--config", str(config)]) == 2
    assert "max_batch_size" in capsys.readouterr().err
    assert main(["build", str(tmp_path / "model"), "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    for flag in ("--tensor-parallel-size", "--expert-parallel-size"):  # one rank: serve, LLM(...) or torchrun for more
        assert main(["build", str(tmp_path / "model"), flag, "2"]) == 2
        assert "build runs on one rank for now (serve and bench --mode latency or throughput run over several)" in (
            capsys.readouterr().err
        )


def test_bench_throughput_over_two_ranks(tmp_path, capsys):
    """bench --mode throughput --tensor-parallel-size 2: this process is rank 0 of an LLM that starts rank 1 (gloo on
    CPU); every request gets its tokens. A baseline needs the whole model in one process: refused."""
    import json
    import subprocess
    import sys

    out = tmp_path / "result.json"
    flags = ["--mode", "throughput", "--tensor-parallel-size", "2", "--num-requests", "4", "--input-len", "8",
             "--output-len", "4", "--compile-backend", "eager", "--max-batch-size", "2"]  # fmt: skip
    assert main(["bench", "random:tiny-llama", *flags, "--baselines", "hf-eager"]) == 2
    assert "pass --baselines none" in capsys.readouterr().err
    run = subprocess.run([sys.executable, "-m", "compiled_llm.cli", "bench", "random:tiny-llama", *flags, "--baselines",
                          "none", "--json", str(out)], capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert " x 2 ranks: 4 requests" in run.stdout
    result = json.loads(out.read_text())
    assert result["ranks"] == 2 and result["results"][0]["output_tokens"] == 16


def test_bench_latency_over_two_ranks(tmp_path, capsys):
    """bench --mode latency --tensor-parallel-size 2: rank 0 of an LLM that starts rank 1 (gloo on CPU) decodes the
    batch through LLM.generate, every sequence its --output-len tokens; its profile comes with it. A baseline or a
    pass comparison, which needs the model again in one process, is refused before any rank starts."""
    import subprocess
    import sys

    out = tmp_path / "result.json"
    # --output-len 17: the profile's 16 decode steps after its 8-token prompt fit the benchmark's max_seq_len
    flags = ["--mode", "latency", "--tp", "2", "--batch-size", "2", "--input-len", "8",  # --tp: --tensor-parallel-size
             "--output-len", "17", "--repeats", "1", "--compile-backend", "eager"]  # fmt: skip
    assert main(["bench", "random:tiny-llama", *flags]) == 2  # the default baselines
    assert "hf-eager, hf-compile baseline runs the whole model in one process" in capsys.readouterr().err
    assert main(["bench", "random:tiny-llama", *flags, "--baselines", "none", "--compare-passes", "fuse_rms_norm"]) == 2
    assert "--compare-passes compiles the model again without each pass, which over 2 ranks" in capsys.readouterr().err
    run = subprocess.run([sys.executable, "-m", "compiled_llm.cli", "bench", "random:tiny-llama", *flags, "--baselines",
                          "none", "--profile", "--json", str(out)], capture_output=True, text=True, timeout=300,
                         check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert " x 2 ranks (bfloat16): batch 2, input 8, output 17" in run.stdout
    result = json.loads(out.read_text())
    ours = result["results"][0]
    assert result["ranks"] == 2 and [r["system"] for r in result["results"]] == ["compiled-llm"]
    assert ours["details"]["generated_tokens"] == 2 * 17
    assert 0 < ours["decode_tokens_per_s"] < float("inf") and ours["ttft_s"] > 0
    assert "rank 0 of 2" in ours["details"]["report"] and ours["details"]["profile"]["top"]


@pytest.mark.parametrize("command", ["build", "bench", "serve", "tune"])
def test_every_subcommand_has_help_with_defaults(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--config FILE.yaml" in out and "--max-batch-size" in out and "(default: 64)" in out
    options = re.split(r"\n  (?=-)", out)
    assert all(option.count("(default") <= 1 for option in options), "a default shown twice"
    if command == "bench":
        assert any(option.startswith("--input-len") and "(default: 128)" in option for option in options)


def test_tune_refuses_another_autotune_mode_and_a_model_without_a_gpu(tmp_path, capsys):
    assert main(["tune", "random:tiny-llama", "--autotune", "cache", "--cache-dir", str(tmp_path)]) == 2
    assert "it runs with autotune='full', not --autotune cache" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["tune", "random:tiny-llama", "--cache-dir", str(tmp_path)]) == 2
        assert "tune times kernels on a CUDA GPU" in capsys.readouterr().err


def test_tune_batch_sizes_become_the_cuda_graph_sizes_and_the_max_batch_size(tmp_path, capsys):
    """--batch-sizes sets the decode buckets to tune (comma lists parse as the tuple fields they fill); sizes over
    an explicit --max-batch-size, or ones that are not numbers, are refused before any model is loaded."""
    assert main(["tune", "random:tiny-llama", "--batch-sizes", "1,16", "--max-batch-size", "8"]) == 2
    assert "cuda_graph_batch_sizes [16] exceed max_batch_size=8" in capsys.readouterr().err
    assert main(["tune", "random:tiny-llama", "--batch-sizes", "1,x"]) == 2
    assert "--batch-sizes takes positive whole numbers" in capsys.readouterr().err
    assert main(["tune", "random:tiny-llama", "--batch-sizes", "1", "--cuda-graph-batch-sizes", "1"]) == 2
    assert "give one of them" in capsys.readouterr().err
    if not torch.cuda.is_available():  # valid sizes pass the configuration and reach the model
        assert main(["tune", "random:tiny-llama", "--batch-sizes", "1, 4", "--cache-dir", str(tmp_path)]) == 2
        assert "tune times kernels on a CUDA GPU" in capsys.readouterr().err


def test_the_tuning_table_gives_each_choice_its_gain_over_the_heuristic():
    from autotune.select import KernelChoice
    from compiled_llm.kernel_commands import format_tuning_table

    table = format_tuning_table([
        KernelChoice("fp8_decode_gemm", {"n": 64, "k": 128, "rows": 16}, "fast", "tuned", "default",
                     {"default": 10.0, "fast": 8.0}),
        KernelChoice("fp8_decode_gemm", {"n": 64, "k": 128, "rows": 32}, "default", "heuristic", "default"),
    ])  # fmt: skip
    first, second = table.splitlines()[1:]
    assert "n=64 k=128 rows=16" in first and first.split()[-4:] == ["10.0", "8.0", "1.25x", "tuned"]
    assert second.split()[-4:] == ["-", "-", "-", "heuristic"]
    assert "nothing to tune" in format_tuning_table([])


def test_tune_end_to_end_measures_each_batch_size_with_heuristics_and_with_the_tuned_choices():
    """Per batch size one measurement with autotune "off" and one with "cache", in alternating order; the tuned run's
    own batch shape (max batch, graph sizes, max_seq_len) is not the benchmark's, the rest of its config is."""
    from compiled_llm.config import CompileConfig
    from compiled_llm.kernel_commands import end_to_end_gains, format_end_to_end_table

    calls = []

    def measure(model, name, batch, config):
        calls.append((batch, config.autotune))
        assert config.model_dump(exclude_unset=True) == {"quantization": "fp8", "autotune": config.autotune}
        return {"off": 100.0, "cache": 110.0}[config.autotune] * batch

    tuned = CompileConfig(quantization="fp8", autotune="full", max_batch_size=16, cuda_graph_batch_sizes=(1, 16),
                          max_seq_len=256)  # fmt: skip
    rows = end_to_end_gains(None, "m", tuned, (1, 16), measure)
    assert calls == [(1, "off"), (1, "cache"), (16, "cache"), (16, "off")]
    lines = format_end_to_end_table(rows).splitlines()
    assert lines[2].split() == ["1", "100.0", "110.0", "1.10x"] and lines[3].split() == [
        "16",
        "1600.0",
        "1760.0",
        "1.10x",
    ]


def test_tune_end_to_end_runs_the_latency_benchmark():
    """The default measurement is `bench --mode latency`'s decode tok/s (here on the CPU, uncompiled graphs)."""
    from compiled_llm.config import CompileConfig
    from compiled_llm.kernel_commands import end_to_end_gains

    rows = end_to_end_gains(tiny_model("llama"), "tiny", CompileConfig(compile_backend="eager"), (2,))
    assert [row["batch_size"] for row in rows] == [2]
    assert rows[0]["heuristic_tokens_per_s"] > 0 and rows[0]["tuned_tokens_per_s"] > 0


def test_cache_ls_lists_each_choice_and_clear_empties_every_device_key(tmp_path, capsys):
    from autotune.kernel_cache import CacheEntry, KernelCache

    for key in ("GPU-A-sm90-torch2.11", "GPU-B-sm100-torch2.12"):
        KernelCache(tmp_path, key=key).put(CacheEntry("fp8_decode_gemm", "bfloat16", {"n": 64, "k": 128, "rows": 16},
                                                      {"a": "1", "b": "2"}, "b", {}, {"a": 3.0, "b": 2.5}))  # fmt: skip
    compile_model(tiny_model("llama"), compile_backend="eager", cache_dir=tmp_path)  # a captured graph too
    (tmp_path / "compiled").mkdir()
    (tmp_path / "compiled" / "0123.bin").write_bytes(b"x" * 2**20)  # and a stored compiled graph
    assert main(["cache", "ls", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "compiled: 1 (1.0 MiB)" in out
    assert ": 2 choices" in out and "GPU-A-sm90-torch2.11" in out and "GPU-B-sm100-torch2.12" in out
    assert out.count("fp8_decode_gemm bfloat16 k=128 n=64 rows=16: b 2.5 us of 2 timed") == 2
    assert "1 captured graph\n" in out and ": LlamaForCausalLM, max_num_tokens 8192, torch" in out
    assert main(["cache", "clear", "--cache-dir", str(tmp_path)]) == 0
    assert "removed 2 kernel choices" in capsys.readouterr().out and not any((tmp_path / "graphs").iterdir())
    assert not any((tmp_path / "compiled").iterdir())
    assert main(["cache", "ls", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert ": 0 choices" in out and "0 captured graphs" in out


def test_the_model_help_names_every_random_preset():
    from compiled_llm.cli import MODEL_HELP
    from compiled_llm.presets import preset_names

    listed = MODEL_HELP.split("random:NAME (")[1].rstrip(")").split(", ")
    assert listed == preset_names()


def test_serve_refuses_a_bad_port_and_a_port_in_use_before_the_model_compiles(monkeypatch, capsys):
    import socket

    from compiled_llm.engine_core import EngineCoreClient

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "random:tiny-llama", "--port", "70000"])
    assert exit_info.value.code == 2 and "'70000' is not a port (0-65535)" in capsys.readouterr().err

    def no_engine(*args, **kwargs):
        raise AssertionError("the engine started before the port was checked")

    monkeypatch.setattr(EngineCoreClient, "start", no_engine)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "random:tiny-llama", "--port", str(port)]) == 2
    assert f"compiled-llm serve: error: cannot listen on 127.0.0.1:{port}: Address already in use" in capsys.readouterr().err


def test_a_gpu_profile_says_how_much_kernel_time_overlapped():
    """The kernels' union of busy time, and the summary a GPU profile prints: per step, with the overlap (PDL) named
    where kernel durations do not add up (a synthetic profile: no GPU here)."""
    from compiled_llm.bench.decode_profile import covered_time
    from compiled_llm.bench.latency import format_kernel_profile

    assert covered_time([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    assert covered_time([]) == 0
    profile = {"note": "8 decode steps plus one prefill step of 8 tokens", "steps": 9, "kernels_total": 900,
               "device_time_us": 9000.0, "overlap_us": 1800.0, "gpu_span_us": 8100.0, "gpu_idle_us": 900.0,
               "top": [{"kernel": "gemv_kernel", "count": 288, "total_us": 4500.0},
                       {"kernel": "rms_norm_kernel", "count": 585, "total_us": 1170.0}]}  # fmt: skip
    lines = format_kernel_profile(profile)
    assert lines[0].endswith("100 kernels and 1000 us of kernel time a step, GPU idle 100 us")
    assert "200 us a step of that ran beside other kernels" in lines[1] and "COMPILED_LLM_DISABLE_PDL=1" in lines[1]
    assert re.match(r"\s+500\.0 us\s+32\.0x  gemv_kernel$", lines[2]) and "rms_norm_kernel" in lines[3]
    assert len(format_kernel_profile({**profile, "overlap_us": 100.0})) == 3  # under 5%: no overlap line
