"""custom_ops/all_reduce: the fused all-reduce + residual add + RMSNorm op and its one-shot sum over symmetric
memory. The op's NCCL/gloo form runs in the tensor-parallel tests (test_tensor_parallel.py); here, what decides the
one-shot path on a CPU machine, and on 2+ GPUs (gpu-marked) the one-shot sum against NCCL's, eagerly and replayed in
a CUDA graph."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
from conftest import free_port, relative_error, spawn_ranks

import custom_ops  # noqa: F401  (registers the ops)
from custom_ops.all_reduce import one_shot
from custom_ops.all_reduce.op import reference_all_reduce


def test_cpu_messages_and_large_ones_never_take_the_one_shot_path():
    x = torch.randn(2, 64)
    assert not one_shot.takes(x, "0")  # a CPU tensor: gloo's all-reduce, no group decision made
    assert not one_shot._buffers


@pytest.mark.parametrize("value", [None, "0"])
def test_the_one_shot_path_is_opt_in(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("COMPILED_LLM_ONE_SHOT_ALL_REDUCE", raising=False)
    else:
        monkeypatch.setenv("COMPILED_LLM_ONE_SHOT_ALL_REDUCE", value)
    assert "COMPILED_LLM_ONE_SHOT_ALL_REDUCE=1" in one_shot._unavailable(torch.device("cuda", 0))


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",  # multicast off (issue 27)
                      COMPILED_LLM_ONE_SHOT_ALL_REDUCE="1")  # fmt: skip
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120), device_id=torch.device("cuda", rank))  # fmt: skip
    try:
        group = dist.group.WORLD.group_name
        generator = torch.Generator("cuda").manual_seed(rank)
        results = {}
        for rows in (1, 16, 4096):  # 4096 rows of 4096 bf16: 32 MiB, past one_shot.MAX_BYTES (NCCL)
            x, residual = (torch.randn(rows, 4096, device="cuda", generator=generator).bfloat16() for _ in range(2))
            weight = torch.randn(4096, device="cuda", generator=generator).bfloat16()
            fused = torch.ops.compiled_llm.all_reduce_add_rms_norm(x, residual, weight, 1e-5, group, "triton")
            expected = torch.ops.compiled_llm.add_rms_norm(reference_all_reduce(x, group), residual, weight, 1e-5,
                                                           "triton")  # fmt: skip
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                replayed = torch.ops.compiled_llm.all_reduce_add_rms_norm(x, residual, weight, 1e-5, group, "triton")
            graph.replay()
            torch.cuda.synchronize()
            results[rows] = {"one_shot": one_shot.takes(x, group), "errors": [
                (relative_error(got[0].float(), expected[0].float()), relative_error(got[1].float(), expected[1].float()))
                for got in (fused, replayed)]}  # fmt: skip
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_the_one_shot_sum_is_nccls_eager_and_in_a_cuda_graph(tmp_path):
    spawn_ranks(_rank_main, 2, (2, free_port(), str(tmp_path)), 300)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert results[1]["one_shot"] and results[16]["one_shot"] and not results[4096]["one_shot"], (rank, results)
        for rows, got in results.items():
            for normed, total in got["errors"]:  # two ranks: a + b in either order, one rounding to bf16
                assert normed < 1e-2 and total < 1e-2, (rank, rows, got)
