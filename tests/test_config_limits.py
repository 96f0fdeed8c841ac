"""The numeric CompileConfig fields at the ends of their documented ranges and past them (batch sizes, token
budgets, block sizes, KV blocks, graph buckets). A value in range compiles with Inductor and gives HF's
greedy tokens; a value past it is a ValueError that names the field, never an error from Dynamo, Inductor
or an allocator."""

from __future__ import annotations

import pytest
import torch

from compiled_llm import CompileConfig, compile_model
from conftest import paged_layers, random_prompt, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")  # max_position_embeddings=256


def hf_greedy(model, prompt: torch.Tensor, new: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=new, do_sample=False, eos_token_id=[])


@pytest.mark.parametrize(
    "fields, batch, prompt_len, new",
    [
        ({"max_batch_size": 1, "block_size": 1}, 1, 9, 6),
        # The smallest token budget, the longest context: a prompt of 250 prefilled in chunks of 16.
        ({"max_num_tokens": 16, "max_seq_len": 256, "max_batch_size": 2}, 2, 250, 6),
        # A block longer than the context; all of the memory share; graph sizes (no effect on a CPU).
        ({"block_size": 1024, "kv_cache_memory_fraction": 1.0, "cuda_graph_batch_sizes": (3,), "max_batch_size": 3},
         3, 9, 6),
        ({"max_seq_len": 2, "num_kv_blocks": 2, "max_batch_size": 2}, 2, 1, 1),  # one block per sequence
        ({"max_batch_size": 1024, "max_num_tokens": 1024}, 1024, 3, 3),  # a step of 1024 sequences
    ],
    ids=lambda value: "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else None,
)
def test_in_range_values_compile_and_give_hf_tokens(model, fields, batch, prompt_len, new):
    cm = compile_model(model, **fields)
    prompt = random_prompt(prompt_len, batch, seed=prompt_len)
    assert torch.equal(cm.generate(prompt, max_new_tokens=new, eos_token_id=[]), hf_greedy(model, prompt, new))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_num_tokens": 15}, "max_num_tokens"),
        ({"max_batch_size": 17, "max_num_tokens": 16}, "max_batch_size=17 exceeds max_num_tokens=16"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": 1025}, "block_size"),
        ({"max_seq_len": 1}, "max_seq_len"),
        ({"num_kv_blocks": 0}, "num_kv_blocks"),
        ({"num_kv_blocks": 4, "max_batch_size": 8}, "the largest max_batch_size that works is 4"),
        ({"kv_cache_memory_fraction": 0.0}, "kv_cache_memory_fraction"),
        ({"cuda_graph_batch_sizes": ()}, "cuda_graph_batch_sizes"),
        ({"cuda_graph_batch_sizes": (0, 8)}, "cuda_graph_batch_sizes"),
        ({"cuda_graph_batch_sizes": (8, 16), "max_batch_size": 8}, r"cuda_graph_batch_sizes \[16\] exceed max_batch_size=8"),
        ({"inductor_options": {"max_autotune": "yes"}}, "inductor_options: max_autotune='yes' has type str"),
    ],
)
def test_values_past_the_range_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        CompileConfig(**fields)


def test_max_seq_len_past_the_models_positions_names_the_largest(model):
    with pytest.raises(ValueError, match=r"max_seq_len=257 exceeds the model's context of 256 positions .*: the "
                       "largest max_seq_len that works is 256"):  # fmt: skip
        compile_model(model, max_seq_len=257)


@pytest.mark.parametrize(
    "rope, context",
    [
        (None, 4096),
        ({"rope_type": "linear", "factor": 2.0}, 8192),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}, 4096),
        # llama3 configs give the extended length as max_position_embeddings already
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 512}, 4096),
    ],
)
def test_the_models_context_counts_rope_scaling_as_vllm_does(rope, context):
    import transformers as tf

    from compiled_llm.sequence_limits import context_length as _context_length

    assert _context_length(tf.LlamaConfig(max_position_embeddings=4096, rope_scaling=rope)) == context


def test_kv_cache_sizes_that_cannot_be_served_name_the_field_and_the_largest(model, monkeypatch):
    import compiled_llm.runtime.kv_cache as kv_cache

    monkeypatch.setattr(kv_cache, "_available_host_memory", lambda: 16 << 30)  # the same on every machine
    layers = paged_layers(32, 8, 128)  # 4 MiB a block
    kv_cache.check_kv_cache_fits(layers, 4095, 16, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"num_kv_blocks=4096 needs 16.00 GiB, more than the 16.00 GiB of available "
                       "RAM left for it: at most 4095 fit"):  # fmt: skip
        kv_cache.check_kv_cache_fits(layers, 4096, 16, torch.device("cpu"))
    # A tiny share of memory: room for 5 blocks, a sequence of 16 tokens takes one, 8 sequences asked for.
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # layers x (k, v) x block_size x KV heads x head_dim x float32
    fraction = 5.5 * block_bytes / kv_cache.CPU_KV_CACHE_BUDGET
    with pytest.raises(ValueError, match=r"max_batch_size=8: the KV cache holds 5 blocks \(capped at .*\) and each "
                       "running sequence holds one at least, so the largest max_batch_size that works is 5"):  # fmt: skip
        compile_model(model, max_batch_size=8, max_seq_len=16, kv_cache_memory_fraction=fraction)


def test_an_error_inside_the_compiled_graph_is_raised_as_itself(compiled):
    """Not as Dynamo's "Attempt to trace generator" (what a CUDA OOM during graph capture looked like)."""
    from compiled_llm.runtime import ScheduledChunk, Sequence

    runner = compiled("llama")[1].runner
    inputs, metadata, _ = runner.step_inputs([ScheduledChunk(Sequence([5, 6, 7]), 3, "last")])
    inputs["slot_mapping"] += 10**9  # rows past the cache's end
    with pytest.raises(IndexError, match="out of bounds"):
        runner.run_graph(inputs, metadata)
