"""This process's place among the tensor- and expert-parallel ranks (torch.distributed's default group), and the
checks that keep the ranks in lockstep: one GPU a rank, one KV-cache size, one random stream."""

from __future__ import annotations

import torch


def parallel_rank(config) -> tuple[int, int]:
    """(rank, world size) of this process, checked against torch.distributed: the world is the larger of
    `config.tensor_parallel_size` and `config.expert_parallel_size` (CompileConfig lets them differ only where one
    is 1: expert parallelism runs over the tensor-parallel group)."""
    field, size = max((("tensor_parallel_size", config.tensor_parallel_size),
                       ("expert_parallel_size", config.expert_parallel_size)), key=lambda f: f[1])  # fmt: skip
    if size == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            f"{field}={size} needs torch.distributed initialized with {size} processes, one per rank "
            "(torchrun --nproc-per-node, or torch.distributed.init_process_group); it is not initialized"
        )
    world = dist.get_world_size()
    if world != size:
        raise ValueError(
            f"{field}={size} does not match torch.distributed's world size {world}: start {size} processes, or set "
            f"{field}={world}"
        )
    return dist.get_rank(), world


def shared_gpu(placements: list[tuple[str, int]]) -> str | None:
    """Why the ranks' (host, GPU index) placements are not one GPU a rank, or None."""
    first: dict[tuple[str, int], int] = {}
    for rank, place in enumerate(placements):
        if place in first:
            return f"ranks {first[place]} and {rank} both run on cuda:{place[1]} of host {place[0]}"
        first[place] = rank
    return None


def check_one_gpu_per_rank(device: torch.device) -> None:
    """Refuses ranks that share a GPU (more ranks than GPUs, or a process that did not pick its own): NCCL would stop
    with a message that names neither."""
    if device.type != "cuda":
        return
    import socket

    import torch.distributed as dist

    placements: list = [None] * dist.get_world_size()
    index = device.index if device.index is not None else torch.cuda.current_device()
    dist.all_gather_object(placements, (socket.gethostname(), index))
    why = shared_gpu(placements)
    if why is not None:
        raise ValueError(
            f"{why}: one GPU a rank is needed ({torch.cuda.device_count()} on this host); start at most that many "
            "processes a host and move each rank's model to its own GPU (torch.cuda.set_device(LOCAL_RANK))"
        )


def over_ranks(value: int, device: torch.device, op: str) -> int:
    """`value` reduced over the ranks by `op` ("min" or "max"), through a tensor on `device` (the process group's
    backend must reach it)."""
    import torch.distributed as dist

    reduced = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(reduced, op={"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return int(reduced.item())


def check_ranks_share_random_stream(device: torch.device) -> None:
    """Tensor- and expert-parallel ranks each sample from their own generator, and must draw the same tokens: a rank
    that drew another would run other steps than the rest (other shapes into the collectives: a hang, or wrong sums).
    Refuses where the ranks' generators for `device` are in different states (seeded differently, or not at all)."""
    import hashlib

    state = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    digest = int.from_bytes(hashlib.sha256(state.numpy().tobytes()).digest()[:7], "little")
    if over_ranks(digest, device, "min") != over_ranks(digest, device, "max"):
        raise ValueError(
            "do_sample=True under tensor or expert parallelism needs the same random stream on every rank: call "
            "torch.manual_seed(seed) with one seed on every rank before generating (or decode greedily)"
        )
