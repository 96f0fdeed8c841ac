"""The one-shot all-reduce over symmetric memory for small messages (a decode step's rows): each rank copies its x
into a buffer every rank of the group mapped (PyTorch's symmetric memory, NVLink peer access), and one kernel sums
all the ranks' buffers (`symm_mem::one_shot_all_reduce_copy`; not its multicast variant, which stays off). NCCL's
ring takes 10-20 us a call at these sizes, and tensor parallelism adds two a layer.

Whether it runs is decided once a group and dtype, collectively (`usable`): every rank sets up its buffer, sums a
random probe both ways, and the group takes it only where every rank could and every rank's one-shot sum equals the
reference's within rounding. A rank that could not says why in the log; the op then keeps NCCL on every rank, so
the ranks never disagree on which collective they run.

Opt-in (COMPILED_LLM_ONE_SHOT_ALL_REDUCE=1) until its 2-GPU test (tests/test_all_reduce.py) has passed on a GPU
host: no multi-GPU machine has run this path yet. Otherwise NCCL.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("compiled_llm")

MAX_BYTES = 512 * 1024  # a message above this goes to NCCL (64 rows of 4096 bf16 features)
_DTYPES = (torch.bfloat16, torch.float32)  # what the kernel dispatches (float16 is not among them)
# (process group, device, dtype) -> its symmetric buffer, or None: the group keeps NCCL. Keyed by the group itself, not
# its name: a later group of the same process (an LLM started again) may reuse the name of a destroyed one.
_buffers: dict[tuple[object, torch.device, torch.dtype], torch.Tensor | None] = {}


def takes(x: torch.Tensor, group: str) -> bool:
    """Whether all_reduce(x, group) runs one-shot: a CUDA message up to MAX_BYTES of a group that agreed to it."""
    size = x.numel() * x.element_size()
    # Decided from what every rank's x has alike (shape, dtype): ranks on different paths would wait on each other.
    # 16-byte multiples: the kernel wants the buffer's and x's alignment equal (16, see all_reduce).
    if not (x.is_cuda and x.dtype in _DTYPES and size <= MAX_BYTES and size % 16 == 0):
        return False
    return usable(group, x.device, x.dtype)


def _key(group: str, device: torch.device, dtype: torch.dtype) -> tuple:
    from torch.distributed.distributed_c10d import _resolve_process_group

    return (_resolve_process_group(group), device, dtype)


def all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    buffer = _buffers[_key(group, x.device, x.dtype)]
    symmetric = buffer[: x.numel()].view(x.shape)
    x = x.contiguous()
    if x.data_ptr() % 16:  # a view at an odd offset: a fresh copy is aligned as the buffer is
        x = x.clone()
    return torch.ops.symm_mem.one_shot_all_reduce_copy(symmetric, x, "sum", group)


def usable(group: str, device: torch.device, dtype: torch.dtype) -> bool:
    """The group's decision for (device, dtype), made at the first call of every rank (collectively: the ranks'
    first calls are the same op's, in step), never during a CUDA-graph capture (NCCL keeps a call made then)."""
    key = _key(group, device, dtype)
    if key not in _buffers:
        if torch.cuda.is_current_stream_capturing():
            return False
        _buffers[key] = _set_up(group, device, dtype)
    return _buffers[key] is not None


def _agree(ok: bool, group: str, device: torch.device) -> bool:
    """Whether every rank of the group says ok (its refusals summed over the group, through NCCL, are 0)."""
    from custom_ops.all_reduce.op import reference_all_reduce

    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    return reference_all_reduce(flag, group).item() == 0.0


def _set_up(group: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """The group's buffer, or None. Each step that a rank could fail alone (its reasons, the allocation, the probe) is
    followed by an agreement, before the next collective step (the rendezvous, the one-shot kernel): a rank that
    stops early never leaves the others waiting in a collective it skips."""
    from custom_ops.all_reduce.op import reference_all_reduce

    why = _unavailable(device)
    buffer = None
    if why is None:
        try:
            import torch.distributed._symmetric_memory as symm_mem

            buffer = symm_mem.empty(MAX_BYTES // torch.tensor([], dtype=dtype).element_size(), dtype=dtype,
                                    device=device)  # fmt: skip
        except Exception as error:  # noqa: BLE001  (any failure keeps NCCL, agreed below)
            why = f"symmetric memory: {type(error).__name__}: {error}"
    if not _agree(why is None, group, device):
        log.info("all-reduce of group %s: NCCL for every message (%s)", group, why or "another rank cannot one-shot")
        return None
    symm_mem.rendezvous(buffer, group)  # collective: every rank is here
    # Held to the reference on a random probe before it may run: rows of 4096 features, as many as fit. The
    # reference sum first, on every rank, so that a one-shot failing on one rank leaves no NCCL call unpaired.
    probe = torch.randn(MAX_BYTES // 4 // 4096 // 2, 4096, device=device).to(dtype)
    expected = reference_all_reduce(probe, group)
    try:
        symmetric = buffer[: probe.numel()].view(probe.shape)
        got = torch.ops.symm_mem.one_shot_all_reduce_copy(symmetric, probe, "sum", group)
        error = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
        why = None if error < 1e-2 else f"its sum differs from NCCL's by {error:.2e}"
    except Exception as failure:  # noqa: BLE001
        why = f"the probe failed: {type(failure).__name__}: {failure}"
    if not _agree(why is None, group, device):
        log.warning("all-reduce of group %s: the one-shot sum was refused, NCCL for every message (%s)", group,
                    why or "another rank's probe failed")  # fmt: skip
        return None
    log.info("all-reduce of group %s: one-shot over symmetric memory up to %d KiB (%s), NCCL above", group,
             MAX_BYTES // 1024, dtype)  # fmt: skip
    return buffer


def _unavailable(device: torch.device) -> str | None:
    """Why this rank cannot one-shot, or None."""
    if os.environ.get("COMPILED_LLM_ONE_SHOT_ALL_REDUCE", "0") != "1":
        return "opt-in until tested on GPUs: COMPILED_LLM_ONE_SHOT_ALL_REDUCE=1"
    if torch.version.hip is not None:
        return "ROCm"
    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy"):
        return f"torch {torch.__version__} has no symm_mem.one_shot_all_reduce_copy"
    peers = [i for i in range(torch.cuda.device_count()) if i != device.index]
    if any(not torch.cuda.can_device_access_peer(device.index, peer) for peer in peers):
        return "not every GPU of this host is a peer of this rank's"
    return None
