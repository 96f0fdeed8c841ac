"""`compiled-llm bench --mode latency`: batch decode speed, time to first token and compile time of this
project and of Hugging Face baselines, in one process on the same model and prompts.

For each system: `generate` of 1 token (time to first token, TTFT) and of `output_len` tokens, medians of
`repeats` runs after a warm-up; decode tokens/s per sequence = (output_len - 1) / (t_full - t_ttft).

`compare_passes`: what each named pass gains, measured in the same process: the model compiled again without
that pass (one at a time, from the same pipeline), decode tokens/s on against off.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.fx

from compiled_llm.bench.ceilings import active_expert_share, routed_expert_share
from compiled_llm.bench.measure import check_baselines, copy_bandwidth, median_time, timed
from compiled_llm.config import CompileConfig

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
) -> dict:
    from compiled_llm.compiled_model import compile_model

    check_baselines(baselines, BASELINES, "latency")
    pipeline = _pipeline_without_each(config, compare_passes)
    if batch_size < 1 or input_len < 1 or output_len < 2:
        raise ValueError("batch_size and input_len must be >= 1 and output_len >= 2")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch_size, input_len), generator=generator).to(device)

    # Only what this run needs: a KV cache for its sequences, graphs for its batch size.
    block = 16
    fields = dict(max_batch_size=batch_size, max_seq_len=input_len + output_len, block_size=block,
                  num_kv_blocks=batch_size * math.ceil((input_len + output_len) / block) + 1,
                  max_num_tokens=max(batch_size * input_len, 256), cuda_graph_batch_sizes=(batch_size,))  # fmt: skip
    if config is not None:
        fields.update(config.model_dump(exclude_unset=True))
    start = time.perf_counter()
    cm = compile_model(model, **fields)
    compile_s = time.perf_counter() - start
    # As the compiled graph stores them (quantized weights at their size), not as the model does.
    weight_bytes = cm.report.weight_bytes

    def ours(n: int):
        return cm.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=[], pad_token_id=0)

    ours(output_len)  # the same warm-up as each baseline's first call
    results = [_measure("compiled-llm", ours, output_len, device, repeats, compile_s)]
    results[0].details["report"] = str(cm.report)

    if profile:
        results[0].details["profile"] = profile_decode(cm, ids) if device.type == "cuda" else profile_decode_cpu(cm, ids)

    for name, passes in pipeline.items():  # after ours, so its figure does not share the GPU with another model
        start = time.perf_counter()
        without = compile_model(model, **{**fields, "passes": passes})
        seconds = time.perf_counter() - start

        def theirs(n: int, without=without):
            return without.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=[], pad_token_id=0)

        theirs(output_len)
        result = _measure(f"without {name}", theirs, output_len, device, repeats, seconds)
        results[0].details.setdefault("pass_gains", {})[name] = results[0].decode_tokens_per_s / result.decode_tokens_per_s
        results.append(result)
        del without, theirs
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for baseline in baselines:
        generate = _hf_generate(model, ids, "static" if baseline == "hf-compile" else None)
        first_call = timed(lambda: generate(output_len), device)  # compiles, for hf-compile
        result = _measure(baseline, generate, output_len, device, repeats, None)
        if baseline == "hf-compile":
            result.compile_s = first_call - result.details["full_generate_s"]
        results.append(result)

    out = {
        "model": model_name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "input_len": input_len,
        "output_len": output_len,
        "weight_bytes": weight_bytes,
        "torch": torch.__version__,
        "results": [asdict(r) for r in results],
    }
    if device.type == "cuda":
        share = routed_expert_share(model, ids, min(output_len, 16)) if batch_size > 1 else None
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
    `ceilings.active_expert_share` (exact at batch 1, an estimate above)."""
    cache = cm.runner.kv_cache
    kv_bytes = batch_size * average_context * cache.bytes_per_block(cache.layers, 1)
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == embedding.data_ptr()
    read = weight_bytes if tied else weight_bytes - embedding.numel() * embedding.element_size() + (
        batch_size * embedding.shape[1] * embedding.element_size()
    )
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


def profile_decode(cm, ids, steps: int = 8) -> dict:
    """Kernels of `steps` decode steps (torch profiler): count and device time per kernel, how long the GPU
    sat idle between kernels, and host time in the runner's annotated phases."""
    from torch.profiler import ProfilerActivity, profile

    prompt = ids[:, :8]
    cm.generate(prompt, max_new_tokens=2, eos_token_id=[], pad_token_id=0)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        cm.generate(prompt, max_new_tokens=steps + 1, eos_token_id=[], pad_token_id=0)
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    intervals, phases = [], {}
    for event in prof.events():
        if event.name.startswith("compiled_llm."):  # our record_function ranges (they show on the GPU too)
            if event.device_type != torch.autograd.DeviceType.CUDA:
                phases[event.name] = phases.get(event.name, 0.0) + event.cpu_time_total
        elif event.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(event.name, []).append(event.device_time)  # microseconds
            intervals.append((event.time_range.start, event.time_range.end))
    intervals.sort()
    busy, covered_until = 0.0, float("-inf")
    for begin, end in intervals:
        if end > covered_until:
            busy += end - max(begin, covered_until)
            covered_until = end
    span = intervals[-1][1] - intervals[0][0] if intervals else 0.0
    rows = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))
    return {
        "note": f"{steps} decode steps plus one prefill step of {prompt.shape[1]} tokens",
        "kernels_total": sum(len(t) for t in kernels.values()),
        "device_time_us": sum(sum(t) for t in kernels.values()),
        "gpu_span_us": span,
        "gpu_idle_us": span - busy,
        "host_phases_us": phases,
        "top": [{"kernel": name[:120], "count": len(t), "total_us": sum(t)} for name, t in rows[:25]],
    }


def profile_decode_cpu(cm, ids, steps: int = 16) -> dict:
    """Where the host's time goes in `steps` decode steps on a CPU (torch profiler, ops by self time; with
    Inductor's generated kernels under their own names where it profiles them)."""
    from torch.profiler import ProfilerActivity, profile

    prompt = ids[:, :8]
    cm.generate(prompt, max_new_tokens=2, eos_token_id=[], pad_token_id=0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        cm.generate(prompt, max_new_tokens=steps + 1, eos_token_id=[], pad_token_id=0)
    rows = sorted(prof.key_averages(), key=lambda row: -row.self_cpu_time_total)
    total = sum(row.self_cpu_time_total for row in rows)
    return {
        "note": f"{steps} decode steps plus one prefill step of {prompt.shape[1]} tokens, under the profiler",
        "host_ms_per_step": total / 1e3 / (steps + 1),
        "top": [{"op": row.key[:80], "calls": row.count, "self_ms": row.self_cpu_time_total / 1e3,
                 "share": row.self_cpu_time_total / total} for row in rows[:15]],  # fmt: skip
    }


def format_table(result: dict) -> str:
    width = max(14, *(len(r["system"]) for r in result["results"]))
    lines = [
        f"{result['model']} on {result['device']} ({result['dtype']}): batch {result['batch_size']}, "
        f"input {result['input_len']}, output {result['output_len']}",
        f"{'system':<{width}} {'decode tok/s/seq':>17} {'TTFT s':>9} {'compile s':>10}",
    ]
    for r in result["results"]:
        compile_s = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-"
        lines.append(f"{r['system']:<{width}} {r['decode_tokens_per_s']:>17.1f} {r['ttft_s']:>9.4f} {compile_s:>10}")
    ours_speed = result["results"][0]["decode_tokens_per_s"]
    for r in result["results"][1:]:
        if r["system"].startswith("without "):
            lines.append(f"{r['system'].removeprefix('without ')}: on / off {ours_speed / r['decode_tokens_per_s']:.3f}x")
        else:
            lines.append(f"compiled-llm / {r['system']}: {ours_speed / r['decode_tokens_per_s']:.2f}x")
    profile = result["results"][0]["details"].get("profile")
    if profile is not None and "host_ms_per_step" in profile:  # CPU: ops by self time
        lines.append(f"profile ({profile['note']}; {profile['host_ms_per_step']:.1f} ms a step):")
        lines += [f"  {row['share']:6.1%} {row['self_ms']:9.1f} ms {row['calls']:7d}x  {row['op']}" for row in profile["top"]]
    if "bandwidth_limit_tokens_per_s" in result:
        ours = result["results"][0]["details"]
        lines.append(
            f"bandwidth limit {result['bandwidth_limit_tokens_per_s']:.1f} tok/s/seq "
            f"(copy {result['copy_bandwidth_GBps']:.0f} GB/s, {result['step_bytes'] / 1e9:.2f} GB per step); "
            f"compiled-llm reaches {ours['fraction_of_bandwidth_limit']:.1%}"
        )
        share = result.get("active_expert_share", 1.0)
        experts = f"; MoE: {share:.1%} of each layer's experts{'' if result['batch_size'] == 1 else ', uniform routing'}"
        lines.append(
            f"counting only bytes a step reads ({result['step_bytes_read'] / 1e9:.2f} GB{experts if share < 1 else ''}): "
            f"limit {result['bytes_read_limit_tokens_per_s']:.1f} tok/s/seq, reached {ours['fraction_of_bytes_read_limit']:.1%}"
        )
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
