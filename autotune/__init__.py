"""Autotuning: times candidate kernels per op and shape bucket on the GPU and keeps the winners in an on-disk
kernel cache that compilation reads (kernel_cache.py: `KernelCache`). The tuner and `CompileConfig.autotune`
modes other than "off" are still to come (issue 23)."""

from autotune.kernel_cache import CacheEntry, KernelCache, device_key, source_hash

__all__ = ["CacheEntry", "KernelCache", "device_key", "source_hash"]
