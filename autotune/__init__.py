"""Autotuning: times candidate kernels per op and shape bucket on the GPU (tuner.py: `tune`, `choose`, the
`OpTuning` interface an op implements) and keeps the winners in an on-disk kernel cache that compilation reads
(kernel_cache.py: `KernelCache`). Still to come (issue 23): the ops' OpTunings, `CompileConfig.autotune` modes
other than "off", `compiled-llm tune`, warm starts."""

from autotune.kernel_cache import CacheEntry, KernelCache, device_key, source_hash
from autotune.tuner import Candidate, Choice, OpTuning, TuningError, choose, cuda_timer, tune

__all__ = [
    "CacheEntry", "Candidate", "Choice", "KernelCache", "OpTuning", "TuningError", "choose", "cuda_timer",
    "device_key", "source_hash", "tune",
]  # fmt: skip
