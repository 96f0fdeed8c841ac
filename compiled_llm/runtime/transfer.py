"""Host <-> device copies that never stall a GPU running ahead of the host.

A copy from pageable host memory waits for the GPU to finish everything queued before it, and a plain
`.tolist()` of a device tensor waits for the whole stream; both would undo the overlap of host work with
the steps in flight. Copies go through pinned memory instead, and a read waits only for its own copy.
"""

from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on `device`, copied asynchronously (from pinned memory on CUDA)."""
    return torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda").to(device, non_blocking=True)


class HostCopy:
    """Device tensors on their way to the host: the copies start now, `get` waits for them only."""

    def __init__(self, *tensors: torch.Tensor):
        self._done = None
        if tensors and tensors[0].is_cuda:
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for host, tensor in zip(self._host, tensors):
                host.copy_(tensor, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._host = list(tensors)

    def get(self) -> list[list]:
        if self._done is not None:
            self._done.synchronize()
        return [t.tolist() for t in self._host]
