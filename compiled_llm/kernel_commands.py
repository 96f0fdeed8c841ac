"""`compiled-llm tune` and `compiled-llm cache ls|clear`: the kernel cache from the command line (cli.py parses the
arguments)."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import torch

from autotune.kernel_cache import KernelCache, format_bucket
from compiled_llm.config import CompileConfig

# The end-to-end comparison's workload: the sequences `benchmarks/tune_run.sh` tunes attention for (128 + 128).
END_TO_END_LENGTHS = (128, 128)


def tune_kernels(model_source: str, dtype: torch.dtype | None, config: CompileConfig,
                 end_to_end: tuple[int, ...] = ()) -> int:  # fmt: skip
    """Compile the model with autotune="full" (every tunable op timed on the GPU, each winner stored in the kernel
    cache at once) and print each choice's gain over the heuristic; then, for each batch size in `end_to_end`,
    decode tok/s with the heuristics (autotune="off") and with the stored choices (autotune="cache")."""
    from compiled_llm.compiled_model import compile_model
    from compiled_llm.model_source import load_model

    config = config.model_copy(update={"autotune": "full"})
    model = load_model(model_source, dtype).model
    if next(model.parameters()).device.type != "cuda":
        raise ValueError("tune times kernels on a CUDA GPU: the model loaded on the CPU (no GPU visible)")
    compiled = compile_model(model, config)
    print(format_tuning_table(compiled.report.kernels))
    print(f"kernel cache: {config.cache_dir}")
    if end_to_end:
        del compiled  # its KV cache holds most of the GPU's memory
        gc.collect()
        torch.cuda.empty_cache()
        print(format_end_to_end_table(end_to_end_gains(model, model_source, config, end_to_end)))
    return 0


def end_to_end_gains(model, model_name: str, config: CompileConfig, batch_sizes: tuple[int, ...],
                     measure=None) -> list[dict]:  # fmt: skip
    """Per batch size: decode tok/s of `bench --mode latency` (128 + 128 tokens) with autotune "off" and "cache",
    each in its own compile, in alternating order across batch sizes so that neither always runs on a warmer GPU.
    `measure(model, model_name, batch_size, config) -> decode tok/s` (default: the latency benchmark)."""
    measure = measure or _decode_tokens_per_s
    # The batch shape is the benchmark's own: the tuned run's batch and graph sizes are not this run's.
    fields = config.model_dump(exclude_unset=True)
    for name in ("autotune", "max_batch_size", "cuda_graph_batch_sizes", "max_seq_len", "num_kv_blocks"):
        fields.pop(name, None)
    rows = []
    for i, batch in enumerate(batch_sizes):
        modes = ("off", "cache") if i % 2 == 0 else ("cache", "off")
        speeds = {mode: measure(model, model_name, batch, CompileConfig(**fields, autotune=mode)) for mode in modes}
        rows.append({"batch_size": batch, "heuristic_tokens_per_s": speeds["off"], "tuned_tokens_per_s": speeds["cache"]})
    return rows


def _decode_tokens_per_s(model, model_name: str, batch_size: int, config: CompileConfig) -> float:
    from compiled_llm.bench.latency import run_latency_benchmark

    input_len, output_len = END_TO_END_LENGTHS
    result = run_latency_benchmark(model, model_name, batch_size, input_len, output_len, baselines=(), config=config)
    torch.cuda.empty_cache()
    return result["results"][0]["decode_tokens_per_s"]


def format_end_to_end_table(rows: list[dict]) -> str:
    input_len, output_len = END_TO_END_LENGTHS
    lines = [f"end to end: decode tok/s per sequence, {input_len} prompt + {output_len} new tokens",
             f"{'batch':>5} {'heuristics':>11} {'tuned':>9} {'gain':>6}"]  # fmt: skip
    for row in rows:
        heuristic, tuned = row["heuristic_tokens_per_s"], row["tuned_tokens_per_s"]
        lines.append(f"{row['batch_size']:>5} {heuristic:>11.1f} {tuned:>9.1f} {tuned / heuristic:>5.2f}x")
    return "\n".join(lines)


def kernel_cache_command(action: str, root: Path) -> int:
    """`ls`: every stored choice under `root`, by device key, and the captured graphs; `clear`: remove them all."""
    try:
        keys = sorted(p.name for p in (root / "kernels").iterdir() if p.is_dir()) if (root / "kernels").is_dir() else []
        graphs = sorted(p for p in (root / "graphs").iterdir() if p.is_dir()) if (root / "graphs").is_dir() else []
        staging = [p for p in graphs if p.name.startswith(".")]  # a store a crash interrupted: clear removes it
        graphs = [p for p in graphs if p not in staging]
    except OSError as error:
        raise ValueError(f"the cache {root} cannot be read: {error.strerror}") from None
    # Inductor's compiled graphs stored as AOT-compiled functions (compiled_artifact.py), and interrupted stores.
    compiled = sorted((root / "compiled").glob("*.bin")) if (root / "compiled").is_dir() else []
    caches = [KernelCache(root, key=key) for key in keys]
    if action == "clear":
        removed = sum(c.clear() for c in caches)
        for graph in graphs + staging:
            shutil.rmtree(graph, ignore_errors=True)
        for path in (root / "compiled").glob("*"):  # the stored functions, and stores a crash interrupted (.tmp)
            path.unlink(missing_ok=True)
        print(f"removed {removed} kernel choice{'s' * (removed != 1)} from {root / 'kernels'}, {len(graphs)} "
              f"captured graph{'s' * (len(graphs) != 1)} from {root / 'graphs'} and {len(compiled)} compiled "
              f"graph{'s' * (len(compiled) != 1)} from {root / 'compiled'}")  # fmt: skip
        return 0
    print(f"compiled graphs {root / 'compiled'}: {len(compiled)} ({sum(p.stat().st_size for p in compiled) / 2**20:.1f} MiB)")
    print(f"graph cache {root / 'graphs'}: {len(graphs)} captured graph{'s' * (len(graphs) != 1)}")
    for graph in graphs:
        try:
            described = json.loads((graph / "entry.json").read_text())
        except (OSError, ValueError):
            described = {}
        rewritten = len(list((graph / "rewritten").glob("*.pkl")))  # one per CompileConfig it was compiled with
        print(f"  {graph.name}: {described.get('architecture', '?')}, max_num_tokens {described.get('max_num_tokens', '?')}"
              f", torch {described.get('torch', '?')}, {rewritten} rewritten")  # fmt: skip
    print(f"kernel cache {root / 'kernels'}: {sum(len(c.entries()) for c in caches)} choices")
    for key, kernel_cache in zip(keys, caches):
        print(key)
        for entry in kernel_cache.entries():
            time = entry.times_us.get(entry.winner)
            print(f"  {entry.op} {entry.dtype} {format_bucket(entry.bucket)}: {entry.winner}"
                  f"{f' {time:.1f} us' if time is not None else ''} of {len(entry.times_us)} timed ({entry.tuned_at})")  # fmt: skip
    return 0


def format_tuning_table(kernels) -> str:
    """Per op and bucket: the heuristic's time, the winner's, and the gain (the report's KernelChoice list)."""
    if not kernels:
        return "nothing to tune: the compiled graph calls no tunable kernel (on this GPU, with this configuration)"
    lines = [f"{'op':<18} {'bucket':<28} {'winner':<30} {'heuristic us':>12} {'winner us':>10} {'gain':>6}  from"]
    for choice in kernels:
        first, best = choice.times_us.get(choice.heuristic), choice.times_us.get(choice.winner)
        gain = f"{first / best:5.2f}x" if first and best else "-"
        cell = lambda t: f"{t:.1f}" if t is not None else "-"
        lines.append(f"{choice.op:<18} {format_bucket(choice.bucket):<28} {choice.winner:<30} {cell(first):>12} "
                     f"{cell(best):>10} {gain:>6}  {choice.source}")  # fmt: skip
    return "\n".join(lines)
