"""Decode CUDA graphs of 1024 and 2048 sequences, with the KV cache sized by the default rule (0.9 of the free
GPU memory, as `bench` and `serve` size it): they capture, and a step at the largest replays HF's tokens."""

from __future__ import annotations

import gc

import pytest
import torch
import transformers as tf

from compiled_llm import compile_model
from compiled_llm.runtime import default_batch_sizes
from tests.test_gpu_model import SHAPES, skip_without

pytestmark = pytest.mark.gpu
VOCAB = 4096


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # A long context: max_batch_size full-length sequences would take far more than the GPU has, so the cache
    # takes the memory share and the graphs are captured in what is left (where batch 1024 ran out before).
    config = tf.LlamaConfig(vocab_size=VOCAB, intermediate_size=1536, num_hidden_layers=3,
                            max_position_embeddings=131072, **SHAPES["hd128-gqa4"])  # fmt: skip
    with torch.device("cuda"):
        return tf.LlamaForCausalLM(config).to(torch.bfloat16).eval()


@pytest.mark.parametrize("backend, max_batch_size", [("flashinfer", 1024), ("flashinfer", 2048), ("triton", 2048)])
def test_decode_graphs_of_large_batches_capture_and_replay(model, backend, max_batch_size):
    skip_without(backend)
    cm = compile_model(model, attention_backend=backend, max_batch_size=max_batch_size)
    try:
        assert "capped at 0.9 of free GPU memory" in cm.report.kv_cache
        graphs = cm.runner.cuda_graphs
        assert graphs.batch_sizes == default_batch_sizes(max_batch_size) and graphs.batch_sizes[-1] == max_batch_size
        assert len(graphs.batch_sizes) <= 59  # coarse above 256: 8 sizes per doubling

        prompts = torch.randint(3, VOCAB, (max_batch_size, 5), generator=torch.Generator().manual_seed(1))
        replays = graphs.replays
        out = cm.generate(prompts.cuda(), max_new_tokens=3, do_sample=False, eos_token_id=[])
        assert graphs.replays - replays == 2  # both decode steps of every sequence: the largest graph

        # Each generated token is HF's argmax at its position, up to bf16 near-ties.
        with torch.no_grad():
            log_probs = model(out, use_cache=False).logits[:, 4:-1].float().log_softmax(-1)
        chosen = log_probs.gather(2, out[:, 5:, None])[..., 0]
        assert (log_probs.max(-1).values - chosen).max() < 0.1
    finally:
        del cm
        gc.collect()
        torch.cuda.empty_cache()
