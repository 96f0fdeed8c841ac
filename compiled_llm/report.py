"""`CompileReport`: what capture, the passes and the compiler did, readable with `print(cm.report)`."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from autotune.select import count_sources
from fx_passes import PagedLayer, PassResult


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'"""
    spans, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            spans.append(f"{start}-{n}" if n != start else f"{n}")
            start = None
    return ", ".join(spans)


@dataclass
class CompileReport:
    architecture: str
    device: str
    dtype: str
    compile_backend: str
    passes: list[PassResult]
    attention: list[PagedLayer]
    kv_cache: str  # e.g. "2 layers x 1024 blocks x 16 tokens (4.0 MiB)"
    cuda_graphs: str = "off"
    kernel_launch: str = ""  # how our Triton kernels launch (custom_ops.triton_runtime.kernel_launch_mode)
    timings: dict[str, float] = field(default_factory=dict)  # capture_s, passes_s, compile_s, cuda_graphs_s, self_check_s
    # the self-check's largest difference as a share of what it allows (verify.self_check), where it ran
    self_check_share: float | None = None
    released_cache: str | None = None  # the module's own KV cache, freed (module_state.release_replaced_caches)
    weight_bytes: int = 0  # of the weights the compiled graph reads (compiled_model.graph_weight_bytes)
    autotune: str = "off"  # CompileConfig.autotune
    kernels: list = field(default_factory=list)  # autotune.select.KernelChoice, one per op and bucket
    caches: str = ""  # where the kernel choices and the compilers' caches live (compiler_caches.use_cache_dir)
    capture: str = "torch.export, flat tokens"  # or from the graph cache (capture/graph_cache.py)

    def pass_sites(self, name: str) -> int:
        """Sites rewritten by the pass `name` (summed if it ran more than once)."""
        return sum(result.sites for result in self.passes if result.name == name)

    def __str__(self) -> str:
        t = self.timings
        lines = [
            f"compiled-llm: {self.architecture} on {self.device} ({self.dtype})",
            f"  capture  {t.get('capture_s', 0):7.2f} s  {self.capture}",
            f"  passes   {t.get('passes_s', 0):7.2f} s",
        ]
        for result in self.passes:
            detail = f"  ({result.detail})" if result.detail else ""
            lines.append(f"    {result.name:<24} {result.sites:5d} sites{detail}")
        if self.kernels:
            lines.append(f"  autotune {t.get('autotune_s', 0):7.2f} s  {self.autotune}: {len(self.kernels)} kernel "
                         f"choices ({count_sources(self.kernels)})")  # fmt: skip
            lines.extend(f"    {choice}" for choice in self.kernels)
        lines.append(f"  compile  {t.get('compile_s', 0):7.2f} s  {self.compile_backend}, first step included")
        lines.append(f"  weights  {self.weight_bytes / 2**20:.1f} MiB read by the graph")
        by_backend: dict[tuple[str, str], list[int]] = defaultdict(list)
        for layer in self.attention:
            by_backend[(layer.backend, layer.why)].append(layer.layer_idx)
        for (backend, why), layers in by_backend.items():
            lines.append(f"  attention {backend} for layers {_ranges(sorted(layers))} ({why})")
        lines.append(f"  kv cache  {self.kv_cache}")
        if self.released_cache:
            lines.append(f"  module's own kv cache released ({self.released_cache}): the paged cache replaces it (the module's "
                         "own forward needs its cache set up again)")
        lines.append(f"  cuda graphs {self.cuda_graphs}")
        if self.caches:
            lines.append(f"  caches    {self.caches}")
        if self.kernel_launch:
            lines.append(f"  triton kernels {self.kernel_launch}")
        if "self_check_s" in t:
            share = self.self_check_share
            closest = "" if share is None else f"; largest difference {share:.1%} of its bound"
            lines.append(f"  self-check {t['self_check_s']:5.2f} s  logits equal to the module's own (verify{closest})")
        return "\n".join(lines)
