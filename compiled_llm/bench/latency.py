"""`compiled-llm bench --mode latency`: batch decode speed, time to first token and compile time of this
project and of Hugging Face baselines, in one process on the same model and prompts.

For each system: `generate` of 1 token (time to first token, TTFT) and of `output_len` tokens, medians of
`repeats` runs after a warm-up; decode tokens/s per sequence = (output_len - 1) / (t_full - t_ttft).

`compare_passes`: what each named pass gains, measured in the same process: the model compiled again without
that pass (one at a time, from the same pipeline), decode tokens/s on against off.

Over several ranks (`tensor_parallel_size` / `expert_parallel_size`), this process is rank 0 of an `LLM` that starts
the others (rank_workers.py) from the model's name, and the batch goes through `LLM.generate` (the same figures:
every row generates its tokens in one batch, EOS ignored); there is no baseline and no pass comparison then, and
the bandwidth limits are a rank's: its shard of the weights and of the KV cache at its GPU's copy bandwidth.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.fx

from compiled_llm.bench.ceilings import active_expert_share, embedding_rows_on_a_rank, routed_expert_share
from compiled_llm.bench.decode_profile import profile_decode, profile_decode_cpu
from compiled_llm.bench.measure import check_baselines, copy_bandwidth, median_time, timed
from compiled_llm.capture.forward_signature import compute_dtype
from compiled_llm.config import CompileConfig

if TYPE_CHECKING:
    from torch import nn

    from compiled_llm.compiled_model import CompiledModel

log = logging.getLogger("compiled_llm.bench")

BASELINES = ("hf-eager", "hf-compile")


@dataclass
class SystemResult:
    system: str
    decode_tokens_per_s: float  # per sequence
    ttft_s: float
    compile_s: float | None
    details: dict = field(default_factory=dict)


def _measure(system: str, generate: Callable[[int], object], output_len: int, device, repeats: int,
             compile_s: float | None) -> SystemResult:  # fmt: skip
    ttft = median_time(lambda: generate(1), device, repeats)
    full = median_time(lambda: generate(output_len), device, repeats)
    if full <= ttft:  # the decode steps took less than the two timings' noise: no figure, rather than a wrong one
        log.warning("%s: %d tokens took %.4f s, the first alone %.4f s: decode speed not measurable at this "
                    "--output-len (raise it or --repeats)", system, output_len, full, ttft)  # fmt: skip
        decode = float("nan")
    else:
        decode = (output_len - 1) / (full - ttft)
    log.info("%s: ttft %.4f s, %d tokens in %.3f s, decode %.1f tokens/s", system, ttft, output_len, full, decode)
    return SystemResult(system, decode, ttft, compile_s, {"full_generate_s": full})


def _hf_generate(model, ids, cache_implementation: str | None):
    mask = torch.ones_like(ids)
    extra = {"cache_implementation": cache_implementation} if cache_implementation else {}

    def generate(n: int):
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=0, **extra)  # fmt: skip

    return generate


@dataclass
class _OurModel:
    """This project's model as the benchmark times it. `generate_for(ids)` [B, T] gives `generate(n)`, which has every
    row generate n tokens greedily, EOS ignored, and returns how many each got."""

    compiled: CompiledModel  # over several ranks: rank 0's
    model: nn.Module  # over several ranks: rank 0's (its parameters may be on meta: checkpoint_slices.py)
    generate_for: Callable[[torch.Tensor], Callable[[int], list[int]]]
    close: Callable[[], None] = lambda: None  # stops the other ranks, where it started them


def _compile_in_this_process(model, fields: dict) -> _OurModel:
    from compiled_llm.compiled_model import compile_model

    cm = compile_model(model, **fields)

    def generate_for(ids: torch.Tensor) -> Callable[[int], list[int]]:
        def generate(n: int) -> list[int]:
            out = cm.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=[], pad_token_id=0)
            return [out.shape[1] - ids.shape[1]] * ids.shape[0]

        return generate

    return _OurModel(cm, model, generate_for)


def _start_ranks(model_name: str, fields: dict, dtype: torch.dtype | None) -> _OurModel:
    """Rank 0 of an `LLM` that starts the other ranks (rank_workers.py), which step with its engine: the batch goes
    through `LLM.generate`. Without prefix caching (unless asked for): a repeat of the same prompts would otherwise
    skip their prefill, as `CompiledModel.generate` on one rank never does."""
    from compiled_llm.engine import SamplingParams
    from compiled_llm.llm import LLM

    if fields.get("enable_prefix_caching"):
        log.warning("enable_prefix_caching=True: each repeat after the first reads its prompt from the prefix cache, so "
                    "its time to first token is not a prefill's")  # fmt: skip
    llm = LLM(model_name, None, dtype, **{"enable_prefix_caching": False, **fields})

    def generate_for(ids: torch.Tensor) -> Callable[[int], list[int]]:
        prompts = ids.tolist()  # once, outside the timed calls

        def generate(n: int) -> list[int]:
            params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
            return [len(output.outputs[0].token_ids) for output in llm.generate(prompts, params, use_tqdm=False)]

        return generate

    return _OurModel(llm.compiled, llm.model, generate_for, llm.close)


def run_latency_benchmark(
    model,
    model_name: str,
    batch_size: int,
    input_len: int,
    output_len: int,
    baselines: tuple[str, ...] = BASELINES,
    repeats: int = 3,
    config: CompileConfig | None = None,
    profile: bool = False,
    compare_passes: tuple[str, ...] = (),
    dtype: torch.dtype | None = None,
) -> dict:
    """`model`: the model, or over several ranks (`config.parallel_ranks` > 1) its name, which each rank loads
    (`model_source.load_model`, in `dtype`)."""
    ranks = config.parallel_ranks if config is not None else 1
    check_baselines(baselines, BASELINES, "latency", ranks)
    if ranks > 1 and compare_passes:
        raise ValueError(f"--compare-passes compiles the model again without each pass, which over {ranks} ranks "
                         "means starting every rank again: compare passes on one rank")  # fmt: skip
    pipeline = _pipeline_without_each(config, compare_passes)
    if batch_size < 1 or input_len < 1 or output_len < 2:
        raise ValueError("batch_size and input_len must be >= 1 and output_len >= 2")

    # Only what this run needs: a KV cache for its sequences, graphs for its batch size.
    block = 16
    fields = dict(max_batch_size=batch_size, max_seq_len=input_len + output_len, block_size=block,
                  num_kv_blocks=batch_size * math.ceil((input_len + output_len) / block) + 1,
                  max_num_tokens=max(batch_size * input_len, 256), cuda_graph_batch_sizes=(batch_size,))  # fmt: skip
    if config is not None:
        fields.update(config.model_dump(exclude_unset=True))
    if fields["max_batch_size"] < batch_size:  # the engine (over ranks) would decode the batch in several waves
        raise ValueError(f"--max-batch-size {fields['max_batch_size']} is below --batch-size {batch_size}: the batch "
                         "would not decode together; leave --max-batch-size out (the benchmark sets it)")  # fmt: skip
    start = time.perf_counter()
    ours = _start_ranks(model, fields, dtype) if ranks > 1 else _compile_in_this_process(model, fields)
    compile_s = time.perf_counter() - start
    try:
        model, cm, device = ours.model, ours.compiled, ours.compiled.device
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (batch_size, input_len), generator=generator).to(device)
        generate = ours.generate_for(ids)
        generated = generate(output_len)  # the same warm-up as each baseline's first call
        if generated != [output_len] * batch_size:
            raise RuntimeError(f"compiled-llm generated {generated} tokens per sequence, not --output-len {output_len}")
        results = [_measure("compiled-llm", generate, output_len, device, repeats, compile_s)]
        results[0].details["report"] = str(cm.report)
        results[0].details["generated_tokens"] = sum(generated)
        if profile:
            prompt = ids[:, :8]
            profiler = profile_decode if device.type == "cuda" else profile_decode_cpu
            results[0].details["profile"] = profiler(ours.generate_for(prompt), prompt.shape[1])
    finally:
        ours.close()
    # As the compiled graph stores them (quantized weights at their size), not as the model does; over several
    # ranks, rank 0's shard.
    weight_bytes = cm.report.weight_bytes

    for name, passes in pipeline.items():  # after ours, so its figure does not share the GPU with another model
        start = time.perf_counter()
        without = _compile_in_this_process(model, {**fields, "passes": passes})
        seconds = time.perf_counter() - start
        theirs = without.generate_for(ids)
        theirs(output_len)
        result = _measure(f"without {name}", theirs, output_len, device, repeats, seconds)
        results[0].details.setdefault("pass_gains", {})[name] = results[0].decode_tokens_per_s / result.decode_tokens_per_s
        results.append(result)
        del without, theirs
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for baseline in baselines:
        hf = _hf_generate(model, ids, "static" if baseline == "hf-compile" else None)
        first_call = timed(lambda: hf(output_len), device)  # compiles, for hf-compile
        result = _measure(baseline, hf, output_len, device, repeats, None)
        if baseline == "hf-compile":
            result.compile_s = first_call - result.details["full_generate_s"]
        results.append(result)

    out = {
        "model": model_name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "dtype": str(compute_dtype(model)).removeprefix("torch."),
        "batch_size": batch_size,
        "input_len": input_len,
        "output_len": output_len,
        "ranks": ranks,
        "weight_bytes": weight_bytes,
        "torch": torch.__version__,
        "results": [asdict(r) for r in results],
    }
    if device.type == "cuda":
        # Counted from the model's own routing where this process holds all of it.
        share = routed_expert_share(model, ids, min(output_len, 16)) if batch_size > 1 and ranks == 1 else None
        out.update(bandwidth_limits(model, weight_bytes, cm, batch_size, input_len + output_len / 2, copy_bandwidth(device),
                                    share))  # fmt: skip
        ours_result = out["results"][0]
        speed = ours_result["decode_tokens_per_s"]
        ours_result["details"]["fraction_of_bandwidth_limit"] = speed / out["bandwidth_limit_tokens_per_s"]
        ours_result["details"]["fraction_of_bytes_read_limit"] = speed / out["bytes_read_limit_tokens_per_s"]
        for r in out["results"][1:]:
            if not r["system"].startswith("without "):  # pass ablations: pass_gains
                ours_result["details"][f"speedup_vs_{r['system']}"] = speed / r["decode_tokens_per_s"]
    return out


def _pipeline_without_each(config: CompileConfig | None, names: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """For each pass name, the run's pipeline without it; a name not in the pipeline, or one the runtime
    requires, is a ValueError that lists the pipeline."""
    from fx_passes import DEFAULT_PIPELINE, REQUIRED_PASSES

    pipeline = config.passes if config is not None and config.passes is not None else DEFAULT_PIPELINE
    out = {}
    for name in names:
        if name not in pipeline or name in REQUIRED_PASSES:
            why = "is required by the runtime" if name in REQUIRED_PASSES else "is not in the pipeline"
            raise ValueError(f"compare_passes: {name!r} {why}; the pipeline is {', '.join(pipeline)}")
        out[name] = tuple(p for p in pipeline if p != name)
    return out


def graph_expert_bytes(gm) -> int:
    """Bytes of the expert tensors the graph's experts ops read (weights, their scales, biases; each storage once),
    as the graph stores them: FP8 or MXFP4 experts at their size, not the model's float copies."""
    from compiled_llm.compiled_model import graph_weight_bytes
    from custom_ops.moe import EXPERTS_OPS

    reads = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in EXPERTS_OPS:
            continue
        for arg in node.args[3:-3]:  # after x, ids, weights; before the activation, its parameters and the backend
            while isinstance(arg, torch.fx.Node) and arg.op == "call_function":  # a transposed view of a parameter
                arg = arg.args[0]
            if isinstance(arg, torch.fx.Node):
                reads.append(arg)
    return graph_weight_bytes(gm, reads)


def bandwidth_limits(model, weight_bytes: int, cm, batch_size: int, average_context: float, bandwidth: float,
                     expert_share: float | None = None) -> dict:  # fmt: skip
    """Decode steps per second if a step only moved bytes at the measured copy bandwidth, two ways:
    `bandwidth_limit`: all weights + the KV cache read per step (the issue's definition);
    `bytes_read_limit`: what a step actually reads: the input embedding table contributes only the
    batch's rows (unless it is tied to the LM head, which reads all of it), and an MoE layer only the experts
    its tokens are routed to: `expert_share` where counted from the routing (ceilings.routed_expert_share), else
    `ceilings.active_expert_share` (exact at batch 1, an estimate above).
    Over several ranks, a rank's: `weight_bytes` its shard's, `cm` its compiled model (its KV cache holds its heads),
    and of the embedding table the rows it holds."""
    cache = cm.runner.kv_cache
    kv_bytes = batch_size * average_context * cache.bytes_per_block(cache.layers, 1)
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    # By identity: a rank that read only its slices of the checkpoint has its parameters on meta, all at address 0.
    tied = output is not None and (output.weight is embedding or output.weight.data_ptr() == embedding.data_ptr() != 0)
    unread_rows = 0 if tied else embedding_rows_on_a_rank(embedding, cm.config) - batch_size
    read = weight_bytes - unread_rows * embedding.shape[1] * embedding.element_size()
    share = expert_share if expert_share is not None else active_expert_share(model.config, batch_size)
    read -= (1.0 - share) * graph_expert_bytes(cm.graph_module)
    counted = "the routing" if expert_share is not None else "k of E" if batch_size == 1 else "a uniform estimate"
    return {
        "active_expert_share": share,
        "active_expert_share_from": counted,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "step_bytes": weight_bytes + kv_bytes,
        "bandwidth_limit_tokens_per_s": bandwidth / (weight_bytes + kv_bytes),
        "step_bytes_read": read + kv_bytes,
        "bytes_read_limit_tokens_per_s": bandwidth / (read + kv_bytes),
    }


def format_kernel_profile(profile: dict, rows: int = 12) -> list[str]:
    """A GPU profile's summary lines: kernels and their time a step, and how much of it overlapped (PDL)."""
    steps = profile["steps"]
    kernels, time, idle = (profile[key] / steps for key in ("kernels_total", "device_time_us", "gpu_idle_us"))
    lines = [f"profile ({profile['note']}): {kernels:.0f} kernels and {time:.0f} us of kernel time a step, GPU idle {idle:.0f} us"]
    if profile["overlap_us"] > 0.05 * profile["device_time_us"]:
        lines.append(
            f"  {profile['overlap_us'] / steps:.0f} us a step of that ran beside other kernels (programmatic dependent "
            "launch: a kernel's time includes its wait for the one before; COMPILED_LLM_DISABLE_PDL=1 for times that "
            "add up)"
        )
    for row in profile["top"][:rows]:
        lines.append(f"  {row['total_us'] / steps:9.1f} us {row['count'] / steps:6.1f}x  {row['kernel'][:90]}")
    return lines


def format_table(result: dict) -> str:
    width = max(14, *(len(r["system"]) for r in result["results"]))
    over_ranks = result.get("ranks", 1) > 1
    ranks = f" x {result['ranks']} ranks" if over_ranks else ""
    a_rank = " on each rank" if over_ranks else ""  # the bandwidth limits are a rank's: its shard, its GPU
    lines = [
        f"{result['model']} on {result['device']}{ranks} ({result['dtype']}): batch {result['batch_size']}, "
        f"input {result['input_len']}, output {result['output_len']}",
        f"{'system':<{width}} {'decode tok/s/seq':>17} {'TTFT s':>9} {'compile s':>10}",
    ]
    for r in result["results"]:
        compile_s = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-"
        lines.append(f"{r['system']:<{width}} {r['decode_tokens_per_s']:>17.1f} {r['ttft_s']:>9.4f} {compile_s:>10}")
    ours_speed = result["results"][0]["decode_tokens_per_s"]
    for r in result["results"][1:]:
        ratio = ours_speed / r["decode_tokens_per_s"]
        if r["system"].startswith("without "):
            shown = f"{ratio:.3f}x" if math.isfinite(ratio) else "not measurable (see the warning above)"
            lines.append(f"{r['system'].removeprefix('without ')}: on / off {shown}")
        else:
            lines.append(f"compiled-llm / {r['system']}: {ratio:.2f}x")
    profile = result["results"][0]["details"].get("profile")
    if profile is not None and "host_ms_per_step" in profile:  # CPU: ops by self time
        lines.append(f"profile ({profile['note']}; {profile['host_ms_per_step']:.1f} ms a step):")
        lines += [f"  {row['share']:6.1%} {row['self_ms']:9.1f} ms {row['calls']:7d}x  {row['op']}" for row in profile["top"]]
    elif profile is not None and "overlap_us" in profile:  # GPU: kernels by device time
        lines += format_kernel_profile(profile)
    if "bandwidth_limit_tokens_per_s" in result:
        ours = result["results"][0]["details"]
        lines.append(
            f"bandwidth limit {result['bandwidth_limit_tokens_per_s']:.1f} tok/s/seq "
            f"(copy {result['copy_bandwidth_GBps']:.0f} GB/s, {result['step_bytes'] / 1e9:.2f} GB per step"
            f"{a_rank}); "
            f"compiled-llm reaches {ours['fraction_of_bandwidth_limit']:.1%}"
        )
        share = result.get("active_expert_share", 1.0)
        experts = f"; MoE: {share:.1%} of each layer's experts{'' if result['batch_size'] == 1 else ', uniform routing'}"
        lines.append(
            f"counting only bytes a step reads ({result['step_bytes_read'] / 1e9:.2f} GB{a_rank}"
            f"{experts if share < 1 else ''}): "
            f"limit {result['bytes_read_limit_tokens_per_s']:.1f} tok/s/seq, reached {ours['fraction_of_bytes_read_limit']:.1%}"
        )
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
