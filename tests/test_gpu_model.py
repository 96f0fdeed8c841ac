"""A compiled bf16 model on the GPU: FlashInfer attention, Inductor on CUDA, decode CUDA graphs."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers as tf
from torch._dynamo.utils import counters

from compiled_llm import compile_model
from conftest import relative_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None, reason="flashinfer is not installed"),
]

SHAPES = {  # head_dim 64 and 128: the FlashInfer kernels the device kit carries prebuilt
    "hd64-gqa3": dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3),
    "hd128-gqa4": dict(hidden_size=1024, num_attention_heads=8, num_key_value_heads=2),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def gpu_model(request):
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=4096, intermediate_size=1536, num_hidden_layers=3,
                            max_position_embeddings=1024, **SHAPES[request.param])  # fmt: skip
    with torch.device("cuda"):
        model = tf.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    graphs_before = counters["stats"]["unique_graphs"]
    cm = compile_model(model, max_batch_size=8, max_seq_len=512, num_kv_blocks=256, cuda_graph_batch_sizes=(1, 2, 4, 8))
    return model, cm, graphs_before


def test_report_says_what_runs(gpu_model):
    _, cm, _ = gpu_model
    assert {layer.backend for layer in cm.report.attention} == {"flashinfer"}
    assert cm.report.cuda_graphs.startswith("decode batch sizes [1, 2, 4, 8]")


def test_logits_match_hf(gpu_model):
    model, cm, _ = gpu_model
    ids = torch.randint(3, 4096, (3, 100), device="cuda")
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits.float()
    assert relative_error(cm(ids).logits.float(), expected) < 2e-2


def test_cuda_graph_decode_matches_a_full_forward(gpu_model):
    """Logits of every decode step (replayed CUDA graphs, paged cache) against one forward of the result."""
    model, cm, _ = gpu_model
    ids = torch.randint(3, 4096, (5, 40), device="cuda")
    step_logits = []
    execute = cm.runner.execute

    def recording(chunks, **kwargs):
        logits = execute(chunks, **kwargs)
        step_logits.append(logits.float().clone())
        return logits

    replays = cm.runner.cuda_graphs.replays
    cm.runner.execute = recording
    try:
        out = cm.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=[], pad_token_id=0)
    finally:
        cm.runner.execute = execute
    assert cm.runner.cuda_graphs.replays - replays == 23  # every decode step after the prefill
    with torch.no_grad():
        full = model(out[:, :-1], use_cache=False).logits.float()  # [5, 63, V]
    decoded = torch.stack(step_logits[1:], dim=1)  # [5, 23, V]: logits of positions 40..62
    assert relative_error(decoded, full[:, 40:]) < 2e-2
    # greedy tokens are the argmax of what the graphs computed
    assert torch.equal(out[:, 41:], decoded.argmax(-1))


def test_one_compiled_graph_for_every_step(gpu_model):
    _, cm, graphs_before = gpu_model
    for batch, length in [(1, 1), (2, 7), (8, 64)]:
        cm(torch.randint(3, 4096, (batch, length), device="cuda"))
    cm.generate(torch.randint(3, 4096, (3, 5), device="cuda"), max_new_tokens=4, eos_token_id=[], pad_token_id=0)
    assert counters["stats"]["unique_graphs"] - graphs_before == 1


def test_pipelined_decode_stops_rows_at_eos(gpu_model):
    """Steps are launched before the host reads the previous tokens; a row that hits EOS must still stop
    exactly there and be padded, while the other rows go on unchanged."""
    _, cm, _ = gpu_model
    ids = torch.randint(3, 4096, (4, 12), device="cuda")
    free_run = cm.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=[], pad_token_id=0)[:, 12:]
    eos = int(free_run[0, 5])
    stopped = cm.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=0)[:, 12:]
    for row in range(4):
        hits = (free_run[row] == eos).nonzero()
        end = int(hits[0]) + 1 if len(hits) else 16
        assert torch.equal(stopped[row, :end], free_run[row, :end])
        assert (stopped[row, end:] == 0).all()
    assert stopped.shape[1] == max(int((r == eos).nonzero()[0]) + 1 if (r == eos).any() else 16 for r in free_run)


def test_back_to_back_prefill_steps_while_the_gpu_lags():
    """Chunked prefill runs many steps without waiting for the GPU; each FlashInfer plan must not
    overwrite the one of a step still queued (seen as wrong results or an illegal memory access)."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)  # fmt: skip
    with torch.device("cuda"):
        model = tf.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    cm = compile_model(model, max_batch_size=8, max_seq_len=512, num_kv_blocks=256, max_num_tokens=16,
                       cuda_graphs=False)  # fmt: skip
    ids = torch.randint(3, 4096, (2, 200))  # 400 tokens: 25 steps of 16
    with torch.no_grad():
        expected = model(ids.cuda(), use_cache=False).logits.float()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # the GPU starts about a second behind the host
    actual = cm(ids).logits.float()
    torch.cuda.synchronize()
    assert relative_error(actual, expected) < 2e-2
