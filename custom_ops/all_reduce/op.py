"""`compiled_llm::all_reduce_add_rms_norm`: a row-parallel linear's sum over the ranks, the residual add and the
RMSNorm after it, as one op (fx_passes/fuse_all_reduce_rms_norm.py inserts it where the graph had the three).

    all_reduce_add_rms_norm(x, r, w, eps, group, backend) = add_rms_norm(sum of x over the group's ranks, r, w, eps)

The sum is the functional all-reduce (NCCL on GPUs, gloo on CPU: the reference), or, opted in (one_shot.py), on
CUDA for a message up to one_shot.MAX_BYTES (a decode step's rows), PyTorch's one-shot all-reduce over symmetric
memory: each rank copies x into its buffer and one kernel reads every peer's over NVLink (no multicast), where NCCL's
ring takes 10-20 us a call, 64 a step on Llama-8B. Every rank of the group takes the same path (one_shot.usable agrees on it over the group), and
the one-shot sum was held to the reference on the group before it may run. The norm is add_rms_norm's (`backend`).
"""

from __future__ import annotations

import torch

from custom_ops.all_reduce import one_shot

_LIBRARY = torch.library.Library("compiled_llm", "FRAGMENT")
_LIBRARY.define(
    "all_reduce_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps, str group, str backend) "
    "-> (Tensor, Tensor)"
)


def reference_all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    """The functional all-reduce's sum, what the sharding passes insert (fx_passes/sharding.sum_over_ranks)."""
    functional = torch.ops._c10d_functional
    return functional.wait_tensor(functional.all_reduce(x, "sum", group))


def _all_reduce_add_rms_norm(x, residual, weight, eps: float, group: str, backend: str):
    summed = one_shot.all_reduce(x, group) if one_shot.takes(x, group) else reference_all_reduce(x, group)
    return torch.ops.compiled_llm.add_rms_norm(summed, residual, weight, eps, backend)


def _all_reduce_add_rms_norm_fake(x, residual, weight, eps, group, backend):
    return torch.ops.compiled_llm.add_rms_norm(x, residual, weight, eps, backend)


for _device in ("CPU", "CUDA"):
    _LIBRARY.impl("all_reduce_add_rms_norm", _all_reduce_add_rms_norm, _device)
torch.library.register_fake("compiled_llm::all_reduce_add_rms_norm", _all_reduce_add_rms_norm_fake, lib=_LIBRARY)
