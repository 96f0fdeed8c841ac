"""Bad input gets a clear ValueError naming the argument, before any work starts."""

from __future__ import annotations

import re

import pytest
import torch
import transformers as tf
from torch import nn

from compiled_llm import CaptureError, CompileConfig, compile_model
from conftest import VOCAB, paged_layers, random_prompt, tiny_model


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"attention_backend": "cudnn"}, "attention_backend"),
        ({"linear_backend": "cublas"}, "linear_backend"),
        ({"norm_backend": "apex"}, "norm_backend"),
        ({"moe_backend": "cutlass"}, "moe_backend"),
        ({"quantization": "int4_awq", "tensor_parallel_size": 2}, "quantization='int4_awq' runs on one rank only"),
        ({"activation_scheme": "static", "quantization": "none"}, "'static' applies to quantization='fp8' only"),
        ({"activation_scheme": "static", "quantization": "fp8_block"}, "does not apply to quantization='fp8_block'"),
        ({"activation_scheme": "static", "quantization": "fp8", "tensor_parallel_size": 2}, "calibrates on one rank"),
        ({"quantization": "nvfp4", "tensor_parallel_size": 2}, "quantization='nvfp4' runs on one rank only"),
        ({"quantization": "int8_sq", "smoothquant_alpha": 1.5}, "smoothquant_alpha"),
        ({"smoothquant_alpha": 0.8}, "applies to quantization='int8_sq' only"),
        ({"quantization": "int3"}, "quantization"),
        ({"quantize_lm_head": True, "quantization": "none"}, "quantize_lm_head=True needs a quantization"),
        ({"kv_cache_dtype": "fp16"}, "kv_cache_dtype"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"kv_cache_memory_fraction": 1.5}, "kv_cache_memory_fraction"),
        ({"compile_backend": "tvm"}, "compile_backend"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"max_batch_size": 64, "max_num_tokens": 32}, "max_batch_size=64 exceeds max_num_tokens=32"),
        ({"cuda_graph_batch_sizes": (0, 4)}, "cuda_graph_batch_sizes"),
        ({"inductor_options": {"no_such_setting": True}}, r"inductor_options: \['no_such_setting'\]"),
        ({"inductor_options": "{not json"}, "inductor_options must be a JSON object"),
    ],
)
def test_bad_config_values(fields, message):
    with pytest.raises(ValueError, match=message):
        CompileConfig(**fields)


def test_triton_backends_need_triton(monkeypatch):
    import fx_passes.kernel_backend as kernel_backend

    monkeypatch.setattr(kernel_backend, "triton_available", lambda: False)
    for field in ("linear_backend", "norm_backend"):
        with pytest.raises(ValueError, match=f"{field}='triton' needs triton"):
            compile_model(tiny_model("llama"), compile_backend="eager", **{field: "triton"})
    with pytest.raises(ValueError, match="moe_backend='triton' needs triton"):
        compile_model(tiny_model("qwen3_moe"), compile_backend="eager", moe_backend="triton")


def test_a_mistyped_field_gets_the_closest_name():
    with pytest.raises(ValueError, match=r"unknown field 'max_batch_sise' \(did you mean 'max_batch_size'\?\)"):
        compile_model(tiny_model("llama"), max_batch_sise=2)
    with pytest.raises(ValueError) as error:
        CompileConfig(attention_backnd="sdpa", zzz=1)
    assert "'attention_backnd' (did you mean 'attention_backend'?)" in str(error.value)
    assert "'zzz';" in str(error.value)  # nothing close: no guess


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_onednn_linears_where_onednn_runs(monkeypatch):
    """`auto` takes oneDNN for a CPU model's linears only where it was measured and is built; asked for
    where it cannot run, it is refused with the reason."""
    import platform

    from fx_passes.kernel_backend import resolve_linear_backend

    assert resolve_linear_backend("torch", "cpu") == ("torch", "requested")
    with pytest.raises(ValueError, match="linear_backend='onednn' runs on CPU models, and this one is on cuda"):
        resolve_linear_backend("onednn", "cuda")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert resolve_linear_backend("auto", "cpu") == ("torch", "auto: not measured on aarch64 CPUs")
    assert resolve_linear_backend("onednn", "cpu") == ("onednn", "requested")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert resolve_linear_backend("auto", "cpu") == ("torch", "auto: this torch build has no oneDNN (mkldnn)")
    with pytest.raises(ValueError, match="linear_backend='onednn' this torch build has no oneDNN"):
        compile_model(tiny_model("llama"), compile_backend="eager", linear_backend="onednn")


def test_config_as_dict_or_object_but_not_both():
    with pytest.raises(ValueError, match="not both"):
        compile_model(tiny_model("llama"), config=CompileConfig(), max_batch_size=2)
    with pytest.raises(ValueError, match="max_batch_size"):
        compile_model(tiny_model("llama"), config={"max_batch_size": 0})


def test_gpu_attention_backends_are_refused_on_cpu():
    with pytest.raises(ValueError, match=r"attention_backend='triton' runs on \['cuda'\], but the model is on 'cpu'"):
        compile_model(tiny_model("llama"), attention_backend="triton", compile_backend="eager")
    with pytest.raises(ValueError, match=r"attention_backend='flashinfer' runs on \['cuda'\], but the model is on 'cpu'"):
        compile_model(tiny_model("llama"), attention_backend="flashinfer", compile_backend="eager")


@pytest.fixture
def cm(compiled):
    """The shared compiled llama, with a check that a refused call did no work."""
    _, cm = compiled("llama")
    free_before = cm.runner.kv_cache.allocator.num_free
    calls = []
    original = cm.runner.execute
    cm.runner.execute = lambda chunks: calls.append(chunks) or original(chunks)
    yield cm
    cm.runner.execute = original
    assert not calls, "the model ran before the error"
    assert cm.runner.kv_cache.allocator.num_free == free_before


def call_and_generate(cm, ids, **kwargs):
    with pytest.raises(ValueError) as call_error:
        cm(ids, **kwargs)
    with pytest.raises(ValueError) as generate_error:
        cm.generate(ids, max_new_tokens=4, **kwargs)
    return str(call_error.value), str(generate_error.value)


def test_prompt_longer_than_max_seq_len(cm):
    for message in call_and_generate(cm, random_prompt(cm.max_seq_len + 1)):
        assert "input_ids" in message and f"max_seq_len={cm.max_seq_len}" in message


def test_prompt_plus_new_tokens_longer_than_max_seq_len(cm):
    with pytest.raises(ValueError, match="max_new_tokens=10 .* exceeds max_seq_len"):
        cm.generate(random_prompt(cm.max_seq_len - 5), max_new_tokens=10)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "5"])
def test_max_new_tokens_below_one_or_not_an_integer(cm, bad):
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        cm.generate(random_prompt(4), max_new_tokens=bad)


def test_max_new_tokens_defaults_like_hf_and_says_where_it_came_from(cm):
    with pytest.raises(ValueError, match=r"generation_config.max_length=20 minus a 24-token prompt\) must be"):
        cm.generate(random_prompt(24))


def test_right_padding_is_refused_by_generate(cm):
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match=r"attention_mask pads rows \[0\] on the right; generate\(\) needs left"):
        cm.generate(random_prompt(5), attention_mask=mask, max_new_tokens=3)


def test_unsupported_generation_config_field_is_refused(cm):
    model = cm.model
    model.generation_config.no_repeat_ngram_size = 3
    try:
        with pytest.raises(ValueError, match="generation_config sets {'no_repeat_ngram_size': 3}"):
            cm.generate(random_prompt(4), max_new_tokens=3)
    finally:
        model.generation_config.no_repeat_ngram_size = None


@pytest.mark.parametrize(
    "ids, message",
    [
        (torch.rand(1, 5), "input_ids must hold integer token ids, got dtype torch.float32"),
        (torch.ones(1, 5, dtype=torch.bool), "input_ids must hold integer token ids"),
        ([[1, 2, 3]], "input_ids must be a torch.Tensor"),
        (torch.tensor([[3, 4, VOCAB]]), rf"input_ids holds ids outside the vocabulary \[0, {VOCAB}\): e.g. {VOCAB} at \[0, 2\]"),
        (torch.tensor([[3, -1, 4]]), "input_ids holds ids outside the vocabulary"),
        (torch.tensor([3, 4, 5]), r"input_ids must have shape \[batch, seq_len\]"),
        (torch.zeros(1, 0, dtype=torch.long), r"input_ids must have shape \[batch, seq_len\]"),
        (torch.zeros(0, 5, dtype=torch.long), r"with batch >= 1 and seq_len >= 1"),
        (random_prompt(4, batch=9), "batch of 9, more than max_batch_size=8"),
    ],
)
def test_bad_input_ids(cm, ids, message):
    for error in call_and_generate(cm, ids):
        assert re.search(message, error), error


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.ones(1, 3), "attention_mask must be a tensor of input_ids' shape"),
        (torch.tensor([[1, 2, 1, 1, 1]]), "only 0 .* and 1"),
        (torch.tensor([[0, 0, 0, 0, 0]]), "row 0 has no tokens"),
        (torch.tensor([[1, 0, 1, 1, 1]]), "padding between tokens"),
    ],
)
def test_bad_attention_mask(cm, mask, message):
    for error in call_and_generate(cm, random_prompt(5), attention_mask=mask):
        assert re.search(message, error), error


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"do_sample": True, "temperature": 0.0}, "temperature must be > 0"),
        ({"do_sample": True, "temperature": float("nan")}, "temperature must be a finite number"),
        ({"do_sample": True, "temperature": "hot"}, "temperature must be a finite number"),
        ({"repetition_penalty": -1.0}, "repetition_penalty must be > 0"),
        ({"eos_token_id": "x"}, "eos_token_id must be a token id"),
        ({"do_sample": True, "top_p": 1.5}, "top_p must be in"),
        ({"do_sample": True, "top_k": -1}, "top_k must be an integer"),
    ],
)
def test_bad_sampling_arguments(cm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cm.generate(random_prompt(4), max_new_tokens=3, **kwargs)


def test_not_a_causal_lm():
    bert = tf.BertModel(tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64))  # fmt: skip
    with pytest.raises(ValueError, match="BertModel is not a causal language model"):
        compile_model(bert)
    t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="T5ForConditionalGeneration is not a causal language model"):
        compile_model(t5)
    with pytest.raises(CaptureError, match=r"cannot capture Linear: torch.export failed in Linear.forward"):
        compile_model(nn.Linear(4, 4))  # takes the token ids, but is no decoder


class DataDependentGate(nn.Module):
    def forward(self, x):
        if x.sum().item() > 0:  # a Python branch on tensor data: cannot be captured
            return x
        return -x


class GatedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.gate = DataDependentGate()
        self.head = nn.Linear(8, 16)

    def forward(self, input_ids, position_ids):
        return self.head(self.gate(self.embed(input_ids)))


def test_uncapturable_model_names_the_module():
    with pytest.raises(CaptureError, match=r"cannot capture GatedLM: torch.export failed in DataDependentGate.forward"):
        compile_model(GatedLM())


def test_hub_id_errors_say_what_was_tried(monkeypatch, tmp_path):
    import huggingface_hub
    import huggingface_hub.constants as constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    from compiled_llm.model_source import load_model

    def offline_download(repo, revision=None):
        raise LocalEntryNotFoundError("Cannot find the requested files in the local cache (no connection)")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline_download)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ValueError) as error:
        load_model("some-org/some-model")
    message = str(error.value)
    assert "downloading it failed: LocalEntryNotFoundError: Cannot find the requested files" in message
    assert "HF_HUB_OFFLINE" not in message and str(tmp_path) in message and "hf download some-org/some-model" in message
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="is not in the local Hugging Face cache .*, and HF_HUB_OFFLINE is set"):
        load_model("some-org/some-model")


def test_cpu_kv_cache_default_is_capped_and_says_why(monkeypatch):
    import compiled_llm.runtime.kv_cache as kv_cache
    from compiled_llm.runtime.kv_cache import CPU_KV_CACHE_BUDGET, PagedKVCache, default_num_kv_blocks

    monkeypatch.setattr(kv_cache, "_available_host_memory", lambda: 16 << 30)  # the same on every machine

    cpu = torch.device("cpu")
    layers = paged_layers(32, 8, 128)  # Llama-8B's cache
    blocks, why = default_num_kv_blocks(layers, 16, 64, 2048, 0.9, cpu)  # 0.5 GiB a sequence
    assert blocks * PagedKVCache.bytes_per_block(layers, 16) <= 0.9 * CPU_KV_CACHE_BUDGET
    assert why.startswith("capped at 0.9 of min(1 GiB, available RAM / 8) on CPU") and "num_kv_blocks" in why
    assert default_num_kv_blocks(layers, 16, 2, 64, 0.9, cpu) == (8, "sized for max_batch_size=2 sequences of max_seq_len")
    # One sequence needs more than the budget: the cache holds one, where the machine has the memory.
    blocks, why = default_num_kv_blocks(layers, 16, 64, 4096, 0.9, cpu)  # 1 GiB a sequence
    assert blocks == 4096 // 16 and why.startswith("capped at one sequence of max_seq_len on CPU")
    with pytest.raises(ValueError, match=r"\(7\.20 GiB: 0.9 of half the available RAM on CPU\) holds 29488 tokens, "
                       "fewer than one sequence of max_seq_len=1048576000"):
        default_num_kv_blocks(layers, 16, 1, 1048576000, 0.9, cpu)
