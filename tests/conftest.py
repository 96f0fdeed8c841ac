"""Tiny random-weight models of every supported architecture, built from transformers config classes
(no downloads), and compiled versions of them shared by all tests of a session: compiles are the slow part."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import transformers as tf

# Tests never read or write the user's caches (CompileConfig.cache_dir's default follows this variable): the
# kernel choices, Inductor's and Triton's, in a directory of the session's own.
os.environ["COMPILED_LLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="compiled_llm_test_cache_")
atexit.register(shutil.rmtree, os.environ["COMPILED_LLM_CACHE_DIR"], ignore_errors=True)

VOCAB = 256
SLIDING_WINDOW = 8  # shorter than the test prompts, so the window matters

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

ARCHITECTURES = {
    "llama": lambda: tf.LlamaConfig(**_COMMON, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}),  # fmt: skip
    "qwen3": lambda: tf.Qwen3Config(**_COMMON, head_dim=16),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(
        **_COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1
    ),
    "mistral": lambda: tf.MistralConfig(**_COMMON, sliding_window=SLIDING_WINDOW),
    "mixtral": lambda: tf.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "gemma2": lambda: tf.Gemma2Config(
        **_COMMON, head_dim=16, sliding_window=SLIDING_WINDOW, attn_logit_softcapping=50.0, final_logit_softcapping=30.0
    ),
    # Multi-head latent attention (keys 24 wide, values 16), sigmoid routing over 2 groups with bias correction, a
    # shared expert, the first layer dense.
    "deepseek_v3": lambda: tf.DeepseekV3Config(
        **{**_COMMON, "num_key_value_heads": 4}, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, rope_scaling=None,
    ),
    # DeepSeek-V2-Lite's kind: no query compression, softmax routing without groups or renormalisation.
    "deepseek_v2": lambda: tf.DeepseekV2Config(
        **{**_COMMON, "num_key_value_heads": 4}, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
    ),
    "gpt_oss": lambda: tf.GptOssConfig(
        **_COMMON, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "gemma3": lambda: tf.Gemma3TextConfig(
        **_COMMON, head_dim=16, sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention"]
    ),
}


def tiny_model(arch: str, seed: int = 0, **config_overrides) -> torch.nn.Module:
    """ARCHITECTURES[arch] (with `config_overrides` set on its config), random weights of `seed`."""
    torch.manual_seed(seed)
    config = ARCHITECTURES[arch]()
    for name, value in config_overrides.items():
        setattr(config, name, value)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Wider weights than the default init make the logits' top choices clearly separated, so greedy
    # decoding compares computations, not float rounding between near-tied tokens.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.normal_(0.0, 0.08)
    return model


def whole_random_model(config, fp8: bool) -> torch.nn.Module:
    """The model random_slices.random_meta_model makes by slices, made whole (each tensor read in one piece) as an
    ordinary module: float32, its FP8 linears carrying their e4m3 weights and scales as an FP8 checkpoint's do."""
    from compiled_llm.random_slices import random_meta_model

    slices = random_meta_model("random:test", config, torch.float32, "cpu", fp8).checkpoint_slices
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    for name, param in list(model.named_parameters()):
        module, _, leaf = name.rpartition(".")
        if name in slices.fp8:
            setattr(model.get_submodule(module), leaf, slices.read_fp8(name))
        else:
            with torch.no_grad():
                param.copy_(slices.read(name))
    if fp8:
        model.compiled_llm_quantization = "fp8"
    return model


def llama_with_biases() -> torch.nn.Module:
    """tiny_model("llama") with random biases on every linear and a vocabulary of 257 tokens (odd: not divisible by
    ranks, so a rank's vocabulary shard is padded)."""
    model = tiny_model("llama", attention_bias=True, mlp_bias=True, vocab_size=257)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and "norm" not in name:
                param.normal_(0.0, 0.08)
    return model


def paged_layers(count: int, num_kv_heads: int, head_dim: int, dtype=torch.float32, num_heads: int = 32) -> list:
    """`count` paged attention layers (fx_passes.PagedLayer) of one shape, as insert_paged_attention records them."""
    from custom_ops import LayerAttentionFeatures
    from fx_passes import PagedLayer

    features = LayerAttentionFeatures(head_dim, num_heads, num_kv_heads, head_dim**-0.5, 0, 0.0, False, dtype, dtype)
    return [PagedLayer(i, num_kv_heads, head_dim, dtype, features, "sdpa", "") for i in range(count)]


_COMPILED: dict = {}


@pytest.fixture(scope="session")
def compiled():
    """compiled(arch) -> (hf_model, CompiledModel), compiled once per session."""
    from compiled_llm import compile_model

    def get(arch: str):
        if arch not in _COMPILED:
            model = tiny_model(arch)
            _COMPILED[arch] = (model, compile_model(model, max_batch_size=8))
        return _COMPILED[arch]

    return get


@pytest.fixture
def own_cache_dir(tmp_path, monkeypatch):
    """A cache_dir of the test's own (kernel choices, graphs) for a compile with Inductor: Inductor's and Triton's
    caches are process-wide and stay in the session's directory, which compiler_caches would otherwise hold against
    a second directory in one process."""
    from compiled_llm import compiler_caches

    compiler_caches.use_cache_dir(os.environ["COMPILED_LLM_CACHE_DIR"])
    monkeypatch.setattr(compiler_caches, "_chosen", tmp_path.resolve())
    return tmp_path


def random_prompt(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)  # avoid pad/bos/eos ids


def run_in_interpreter(code: str) -> None:
    """Run `code` in a Python of its own under TRITON_INTERPRET=1 (Triton kernels on CPU tensors), from the repository
    root; fail with its stderr."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory):
    """tests/test_llm_text.py's tiny text model with its trained tokenizer and chat template, saved as a Hugging
    Face directory (what a server or an engine-core process loads)."""
    from tests.test_llm_text import text_model

    path = tmp_path_factory.mktemp("tiny-text-model")
    model, tokenizer = text_model()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(fn, world: int, args: tuple, timeout_s: float) -> None:
    """Run fn(rank, *args) in `world` spawned processes; a rank that fails (the others ended) or runs past
    `timeout_s` (all killed) fails the test, never CI."""
    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=5):  # raises if a rank failed
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks still running after {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
