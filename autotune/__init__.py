"""Autotuning: times candidate kernels per op and shape bucket on the GPU (tuner.py: `tune`, `choose`, the
`OpTuning` interface an op implements), keeps the winners in an on-disk kernel cache (kernel_cache.py:
`KernelCache`), and chooses for every tunable op of a compiled graph under `CompileConfig.autotune` (select.py:
`select_kernels`, `register`; an op family registers its tuning next to its kernels: custom_ops/linear/
decode_gemm_tuning.py, gemv_tuning.py). Inductor's and Triton's caches go under the same `cache_dir`
(compiled_llm/compiler_caches.py). Still to come (issue 23): more ops' tunings, warm starts."""

from autotune.kernel_cache import CacheEntry, KernelCache, device_key, source_hash
from autotune.select import KernelChoice, device_index, graph_value, register, select_kernels
from autotune.tuner import Candidate, Choice, OpTuning, TuningError, choose, cuda_timer, tune

__all__ = [
    "CacheEntry", "Candidate", "Choice", "KernelCache", "KernelChoice", "OpTuning", "TuningError", "choose",
    "cuda_timer", "device_index", "device_key", "graph_value", "register", "select_kernels", "source_hash", "tune",
]  # fmt: skip
