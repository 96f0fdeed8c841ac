"""Autotuning: times candidate kernels per op and shape bucket on the GPU and keeps the winners in an
on-disk kernel cache that compilation reads. Empty until the kernel-cache milestone; `CompileConfig.autotune`
accepts only "off" until then."""
