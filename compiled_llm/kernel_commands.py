"""`compiled-llm tune` and `compiled-llm cache ls|clear`: the kernel cache from the command line (cli.py parses the
arguments)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from autotune.kernel_cache import KernelCache, format_bucket
from compiled_llm.config import CompileConfig


def tune_kernels(model_source: str, dtype: torch.dtype | None, config: CompileConfig) -> int:
    """Compile the model with autotune="full" (every tunable op timed on the GPU, each winner stored in the kernel
    cache at once) and print each choice's gain over the heuristic."""
    from compiled_llm.compiled_model import compile_model
    from compiled_llm.model_source import load_model

    config = config.model_copy(update={"autotune": "full"})
    model = load_model(model_source, dtype).model
    if next(model.parameters()).device.type != "cuda":
        raise ValueError("tune times kernels on a CUDA GPU: the model loaded on the CPU (no GPU visible)")
    compiled = compile_model(model, config)
    print(format_tuning_table(compiled.report.kernels))
    print(f"kernel cache: {config.cache_dir}")
    return 0


def kernel_cache_command(action: str, root: Path) -> int:
    """`ls`: every stored choice under `root`, by device key, and the captured graphs; `clear`: remove them all."""
    try:
        keys = sorted(p.name for p in (root / "kernels").iterdir() if p.is_dir()) if (root / "kernels").is_dir() else []
        graphs = sorted(p for p in (root / "graphs").iterdir() if p.is_dir()) if (root / "graphs").is_dir() else []
        staging = [p for p in graphs if p.name.startswith(".")]  # a store a crash interrupted: clear removes it
        graphs = [p for p in graphs if p not in staging]
    except OSError as error:
        raise ValueError(f"the cache {root} cannot be read: {error.strerror}") from None
    caches = [KernelCache(root, key=key) for key in keys]
    if action == "clear":
        removed = sum(c.clear() for c in caches)
        for graph in graphs + staging:
            shutil.rmtree(graph, ignore_errors=True)
        print(f"removed {removed} kernel choice{'s' * (removed != 1)} from {root / 'kernels'} and {len(graphs)} "
              f"captured graph{'s' * (len(graphs) != 1)} from {root / 'graphs'}")  # fmt: skip
        return 0
    print(f"graph cache {root / 'graphs'}: {len(graphs)} captured graph{'s' * (len(graphs) != 1)}")
    for graph in graphs:
        try:
            described = json.loads((graph / "entry.json").read_text())
        except (OSError, ValueError):
            described = {}
        print(f"  {graph.name}: {described.get('architecture', '?')}, max_num_tokens {described.get('max_num_tokens', '?')}"
              f", torch {described.get('torch', '?')}")  # fmt: skip
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
