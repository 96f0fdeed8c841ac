"""Tensor (and expert) parallelism: one process per rank, each compiling its shard, the same tokens as one process.

    torchrun --nproc-per-node 2 examples/tensor_parallel.py                      # CPU (gloo): a tiny random Llama
    torchrun --nproc-per-node 2 examples/tensor_parallel.py --model random:qwen3-30b-a3b --expert-parallel
    torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 8 examples/tensor_parallel.py --model DIR

Each rank loads the whole model here, so that rank 0 can compare with it, and keeps its shard
(`LLM("MODEL", tensor_parallel_size=N)` and `load_model(..., by_slices=True)` read only each rank's slices); it builds
the process group (NCCL on GPUs, one per local rank; gloo on CPU), and compiles with `tensor_parallel_size` (and
`expert_parallel_size`) equal to the world size. Ranks run in lockstep: every rank gets the same prompts and greedy
decoding, and rank 0 prints. Rank 0 also compares the first prompt's tokens with one unsharded process (tiny models).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from compiled_llm import compile_model
from compiled_llm.model_source import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:tiny-llama", help="as `compiled-llm bench` takes it")
    parser.add_argument("--expert-parallel", action="store_true", help="split MoE experts over the ranks too")
    args = parser.parse_args()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        torch.manual_seed(0)  # random: presets build the same weights on every rank
        model = load_model(args.model, dtype=None if torch.cuda.is_available() else torch.float32).model
        parallel = {"tensor_parallel_size": world, **({"expert_parallel_size": world} if args.expert_parallel else {})}
        compiled = compile_model(model, max_batch_size=4, max_seq_len=256, **parallel)
        prompts = torch.randint(1, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        tokens = compiled.generate(prompts.to(compiled.device), max_new_tokens=16, do_sample=False)
        if rank == 0:
            print(compiled.report)
            print(f"rank 0 of {world}: {tokens[0, 16:].tolist()}")
            with torch.no_grad():
                unsharded = model.generate(prompts[:1].to(compiled.device), max_new_tokens=16, do_sample=False)
            same = torch.equal(unsharded[0, 16:], tokens[0, 16:])
            print(f"the unsharded model's greedy tokens: {'the same' if same else unsharded[0, 16:].tolist()}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
