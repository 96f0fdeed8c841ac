"""A compiled bf16 model on the GPU: FlashInfer or Triton attention, Inductor on CUDA, decode CUDA graphs."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers as tf
from torch._dynamo.utils import counters

from compiled_llm import compile_model
from conftest import relative_error

pytestmark = pytest.mark.gpu

SHAPES = {  # head_dim 64 and 128: the FlashInfer kernels the device kit carries prebuilt
    "hd64-gqa3": dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3),
    "hd128-gqa4": dict(hidden_size=1024, num_attention_heads=8, num_key_value_heads=2),
}


BACKENDS = ["flashinfer", "triton", "xqa"]


def skip_without(backend: str) -> None:
    module = {"xqa": "flashinfer"}.get(backend, backend)  # the xqa backend is FlashInfer's XQA kernel
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")


def random_llama(shape: str) -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=4096, intermediate_size=1536, num_hidden_layers=3,
                            max_position_embeddings=1024, **SHAPES[shape])  # fmt: skip
    with torch.device("cuda"):
        return tf.LlamaForCausalLM(config).to(torch.bfloat16).eval()


@pytest.fixture(scope="module", params=[("hd64-gqa3", "flashinfer"), ("hd128-gqa4", "flashinfer"),
                                        ("hd128-gqa4", "triton"), ("hd128-gqa4", "xqa")], ids="-".join)  # fmt: skip
def gpu_model(request):
    shape, backend = request.param
    skip_without(backend)
    model = random_llama(shape)
    graphs_before = counters["stats"]["unique_graphs"]
    # Through Dynamo (graph_cache=False): a recompile would show as a second graph (see tests/test_runtime.py).
    cm = compile_model(model, attention_backend=backend, max_batch_size=8, max_seq_len=512, num_kv_blocks=256,
                       cuda_graph_batch_sizes=(1, 2, 4, 8), graph_cache=False)  # fmt: skip
    cm.backend = backend
    return model, cm, graphs_before


def test_report_says_what_runs(gpu_model):
    _, cm, _ = gpu_model
    assert {layer.backend for layer in cm.report.attention} == {cm.backend}
    assert cm.report.cuda_graphs.startswith("decode batch sizes [1, 2, 4, 8]")
    assert "triton kernels" in str(cm.report)  # how they launch (PDL on Hopper)


def test_auto_prefers_flashinfer_then_triton():
    skip_without("triton")
    cm = compile_model(random_llama("hd128-gqa4"), max_batch_size=2, max_seq_len=64, num_kv_blocks=16,
                       cuda_graphs=False, compile_backend="eager")  # fmt: skip
    expected = "flashinfer" if importlib.util.find_spec("flashinfer") else "triton"
    assert {layer.backend for layer in cm.report.attention} == {expected}


def test_logits_match_hf(gpu_model):
    model, cm, _ = gpu_model
    ids = torch.randint(3, 4096, (3, 100), device="cuda")
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits.float()
    assert relative_error(cm(ids).logits.float(), expected) < 2e-2


def decode_step_logits(cm, ids: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy `generate`, and the logits of its decode steps [B, max_new_tokens - 1, V]."""
    step_logits = []
    execute = cm.runner.execute

    def recording(chunks, **kwargs):
        logits = execute(chunks, **kwargs)
        step_logits.append(logits.float().clone())
        return logits

    replays = cm.runner.cuda_graphs.replays
    cm.runner.execute = recording
    try:
        out = cm.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=[], pad_token_id=0)
    finally:
        cm.runner.execute = execute
    assert cm.runner.cuda_graphs.replays - replays == max_new_tokens - 1  # every decode step after the prefill
    return out, torch.stack(step_logits[1:], dim=1)


def test_cuda_graph_decode_matches_a_full_forward(gpu_model):
    """Logits of every decode step (replayed CUDA graphs, paged cache) against one forward of the result."""
    model, cm, _ = gpu_model
    ids = torch.randint(3, 4096, (5, 40), device="cuda")
    out, decoded = decode_step_logits(cm, ids, 24)  # decoded: logits of positions 40..62
    with torch.no_grad():
        full = model(out[:, :-1], use_cache=False).logits.float()  # [5, 63, V]
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_kv_cache(backend):
    """kv_cache_dtype="fp8" through prefill and CUDA-graph decode: within e4m3's rounding (2**-4) of HF."""
    skip_without(backend)
    model = random_llama("hd128-gqa4")
    cm = compile_model(model, attention_backend=backend, kv_cache_dtype="fp8", max_batch_size=4, max_seq_len=256,
                       num_kv_blocks=64, cuda_graph_batch_sizes=(4,))  # fmt: skip
    assert {t.dtype for t in cm.runner.kv_cache.tensors.values()} == {torch.float8_e4m3fn}
    ids = torch.randint(3, 4096, (4, 60), device="cuda")
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits.float()
    assert relative_error(cm(ids).logits.float(), expected) < 2**-4
    out, decoded = decode_step_logits(cm, ids, 16)
    with torch.no_grad():
        full = model(out[:, :-1], use_cache=False).logits.float()
    assert relative_error(decoded, full[:, 60:]) < 2**-4
