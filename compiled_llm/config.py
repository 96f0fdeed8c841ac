"""`CompileConfig`: every knob of `compile_model`, validated in one place.

Fields whose values name features that later milestones add (fp8 weights, tensor parallelism,
autotuning) already accept the planned names, so user code written against the documented
API fails with "not supported yet" instead of "unknown value".
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ATTENTION_BACKENDS = ("auto", "flashinfer", "triton", "xqa", "sdpa", "reference")

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "compiled_llm"

# Values the field type accepts but this version cannot run yet: field -> values that run today.
_SUPPORTED_NOW = {
    "quantization": ("auto", "none", "fp8", "fp8_block", "mxfp4", "int4_awq", "int4_gptq", "int8_sq", "nvfp4", "gguf"),
    "activation_scheme": ("dynamic", "static"),
}


def unknown_fields(fields) -> str | None:
    """What is wrong with the names in `fields` that are not CompileConfig fields (each with the closest
    field, where one is close), or None."""
    known = CompileConfig.model_fields
    unknown = sorted(str(name) for name in fields if name not in known)
    if not unknown:
        return None
    guesses = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        guesses.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    return f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(guesses)}; CompileConfig fields: {', '.join(known)}"


class CompileConfig(BaseModel):
    """How to capture, rewrite, compile and run a model. Every default works on CPU and GPU.

    Example:
        >>> CompileConfig(max_batch_size=8, max_seq_len=512).block_size
        16
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    attention_backend: str = "auto"
    """Kernel behind the paged-attention op: auto, flashinfer, triton, xqa, sdpa, reference, or one per step phase.
    `auto` picks, per layer, the first backend that is installed, runs on the model's device and supports the
    layer's features, in the order flashinfer, triton (CUDA), sdpa (CUDA and CPU: PyTorch's fused attention; no
    soft-cap, sinks or fp8 cache), reference (any layer); on a CPU that is `sdpa`, or `reference` for the layers
    it cannot run; the autotuner may then choose another per phase (see README, Tuned kernels). Per phase, by
    rules that the first match of a step applies: `decode<=8:triton,decode:flashinfer,prefill:flashinfer` (decode
    steps of up to 8 sequences, other decode steps, prefill and mixed steps). `xqa` (CUDA, named only: auto does
    not pick it yet) runs decode steps through FlashInfer's XQA kernel, TensorRT-LLM's, and other steps through
    triton's. The compile report says which layer got which backend and why."""

    linear_backend: Literal["auto", "triton", "onednn", "torch"] = "auto"
    """Kernel behind the linear layers. `torch` leaves them to Inductor (cuBLAS, or the CPU BLAS);
    `triton` routes them through the `compiled_llm.linear` op, which runs a Triton GEMV for one-token
    calls (batch-1 decode) on the shapes where it beats cuBLAS, and cuBLAS for the rest; `onednn` runs a
    CPU model's float32 linears through oneDNN's matmul where it beats the CPU BLAS (weights wider than
    deep, or of 8 MiB and more). `auto` is `triton` for a CUDA model when triton is installed, `onednn`
    for a CPU model on x86-64, else `torch`."""

    norm_backend: Literal["auto", "triton", "torch"] = "auto"
    """Kernel behind RMSNorm. `triton` makes each RMSNorm, with the residual add in front of it, one
    `compiled_llm.add_rms_norm` kernel, and an attention layer's per-head q and k norms (Qwen3's) one
    `compiled_llm.qk_rms_norm` kernel; `torch` leaves norms to Inductor. `auto` is `triton` for a CUDA
    model when triton is installed, else `torch`."""

    moe_backend: Literal["auto", "triton", "torch"] = "auto"
    """Kernel behind a mixture-of-experts layer's experts (`compiled_llm.moe_experts`, one per MoE layer). `triton`:
    grouped GEMMs over the tokens sorted by expert, which read only the experts a step's tokens picked; `torch`: the
    reference, a loop over those experts, which reads the routing on the host and so cannot be captured in a CUDA
    graph. `auto` is `triton` for a CUDA model when triton is installed, else `torch`."""

    quantization: Literal[
        "auto", "none", "fp8", "fp8_block", "mxfp4", "int8_sq", "int4_awq", "int4_gptq", "nvfp4", "gguf"
    ] = "auto"
    """Weight quantization of the decoder's linear layers. `auto`: the checkpoint's (an FP8 checkpoint's format,
    compiled_llm/fp8_checkpoint.py), `none` for a float one; a value that contradicts the checkpoint is an error.
    `fp8`: float8 e4m3 weights with a scale per output
    channel, converted at compile time, and activations quantized to float8 too (`activation_scheme`);
    `compiled_llm.fp8_linear` defines the numerics (custom_ops/linear/fp8.py). `fp8_block`: a scale per 128 x 128
    weight block and per token and 128 activation columns, as DeepSeek-V3 runs (custom_ops/linear/fp8_block.py);
    its activation scales are always dynamic. `mxfp4`: an MXFP4 checkpoint's MoE experts (GPT-OSS's) kept in their
    format and dequantized in the kernel (custom_ops/moe/mxfp4.py), the rest in the model's dtype; what `auto` picks
    for such a checkpoint. `int4_awq`: 4-bit weights with a scale and zero point per 128 input columns and AWQ's
    activation-aware scales, searched at compile time over calibration text (the model's tokenizer: LLM passes it,
    `compile_model(..., tokenizer=)`) and cached under `cache_dir`; activations stay in the model's dtype (W4A16);
    `compiled_llm.int4_linear` defines the numerics (custom_ops/linear/int4.py); an AutoAWQ checkpoint runs its
    stored weights under it. `int4_gptq`: a GPTQ checkpoint's stored 4-bit weights (compiled_llm/int4_checkpoint.py),
    what `auto` picks for one. `int8_sq`: SmoothQuant W8A8, int8 weights with a scale per output channel and
    activations quantized per token at run time, after SmoothQuant's scaling (`smoothquant_alpha`) calibrated at
    compile time as int4_awq's is (custom_ops/linear/int8.py). `nvfp4`: E2M1 weights with an e4m3 scale per 16 input
    columns and a float32 global scale, dequantized in the kernel (weight-only: Hopper has no FP4 tensor cores),
    rounded at compile time by ModelOpt's recipe after AWQ's search (as int4_awq's, over NVFP4's rounding), or a
    ModelOpt or compressed-tensors NVFP4 checkpoint's as stored (what `auto` picks for one;
    custom_ops/linear/nvfp4.py, compiled_llm/nvfp4_checkpoint.py). `gguf`: a .gguf file's Q4_0/Q4_1/Q4_K linears
    run from their blocks through int4_linear, its Q5_K/Q6_K/Q8_0 ones through int8_weight_linear
    (compiled_llm/gguf_blocks.py), what `auto` picks for such a file on CUDA; `none` runs its dequantized weights."""

    activation_scheme: Literal["dynamic", "static"] = "dynamic"
    """How `fp8` quantizes activations: `dynamic`, a scale per token computed at run time; `static`, one scale per
    linear, max|x| / 448 over calibration text (fx_passes/calibration.py; cached under `cache_dir`), larger values
    saturating at run time. `fp8` only, on one rank."""

    quantize_lm_head: bool = False
    """Quantize the LM head too (the last linear); by default it keeps the model's dtype, as most FP8
    checkpoints keep it."""

    smoothquant_alpha: float = Field(0.5, ge=0.0, le=1.0)
    """`int8_sq`'s migration strength, 0 to 1: how much of the activations' outlier range SmoothQuant moves into the
    weights (s = max|x|^alpha / max|W|^(1 - alpha) per input channel). 0.5 suits most models (the paper's default);
    larger moves more, for models whose activations have stronger outliers."""

    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    """dtype of the paged KV cache; `auto` uses the dtype of the model's keys and values, `fp8` stores
    float8_e4m3fn (half the bytes of bf16, so twice the tokens and half the attention reads), with a scale
    of 1: values beyond +-448 saturate, and each is rounded to 3 mantissa bits."""

    tensor_parallel_size: int = Field(1, ge=1)
    """Ranks the model is sharded over (tensor parallelism, fx_passes/shard_tensor_parallel.py): above 1, each
    process of a torch.distributed group of exactly this size (torchrun; gloo on CPU, NCCL on GPUs) compiles the
    model for its rank, sharded as the model's transformers tensor-parallel plan says, with the embedding and the
    LM head split by vocabulary rows (fx_passes/shard_vocabulary.py) and, unless expert_parallel_size splits whole
    experts, each MoE expert by its intermediate features (fx_passes/shard_experts.py)."""

    expert_parallel_size: int = Field(1, ge=1)
    """Ranks each mixture-of-experts layer's experts are split over (expert parallelism, fx_passes/shard_experts.py):
    each rank keeps E / n of them, routes every token as the model does, computes the pairs routed to its own experts,
    and an all-reduce sums the ranks' parts. It runs over the tensor-parallel group, as vLLM's does: with
    tensor_parallel_size equal to it, attention and the dense linears are tensor-parallel over the same ranks; with
    tensor_parallel_size=1 they are replicated, computed whole on every rank. No other combination is supported.
    torch.distributed's world size is the larger of the two."""

    cuda_graphs: bool = True
    """Replay decode steps as CUDA graphs (no effect on CPU)."""

    cuda_graph_batch_sizes: tuple[int, ...] | None = None
    """Decode batch sizes to capture, each at most `max_batch_size`; a step of b sequences replays the
    smallest one >= b. None: 1, 2, 4, multiples of 8 up to 256, then 8 sizes per doubling (288, 320, ...,
    512, 576, ..., 1024, 1152, ...) up to `max_batch_size`: a step pads at most 7 rows up to 256 and at
    most 1/8 of its batch above."""

    max_batch_size: int = Field(64, ge=1)
    """Most sequences in one engine step (a `generate` batch may not exceed it); at most `max_num_tokens`
    and the number of KV-cache blocks (each running sequence holds one at least)."""

    max_seq_len: int | None = Field(None, ge=2)
    """Longest sequence (prompt + generated tokens). None: the model's `max_position_embeddings`."""

    max_num_tokens: int = Field(8192, ge=16)
    """Most tokens in one engine step; longer prompts are prefilled in chunks of this size."""

    block_size: int = Field(16, ge=1, le=1024)
    """Tokens per KV-cache block (page)."""

    num_kv_blocks: int | None = Field(None, ge=1)
    """KV-cache blocks to allocate. None: enough for `max_batch_size` sequences of `max_seq_len`,
    capped by `kv_cache_memory_fraction` of the GPU memory left free after a profiling step of
    `max_num_tokens` tokens, minus 1 GiB for CUDA graphs (on CPU: of min(1 GiB, an eighth of the available
    RAM), as a CPU decodes few sequences at a time). The compile report says which applied."""

    enable_prefix_caching: bool = True
    """Reuse the KV blocks of earlier requests' identical prompt prefixes (full blocks only; `LLM` and the
    server). `CompiledModel.__call__`/`generate` compute every token."""

    kv_cache_memory_fraction: float = Field(0.9, gt=0.0, le=1.0)
    """Share of free memory the KV cache may take when `num_kv_blocks` is None."""

    verify: bool | None = None
    """Hold the compiled model against the module itself before `compile_model` returns: two short random
    prompts, in one step and decoded token by token over the paged KV cache, every position's logits
    within a tolerance of the module's own forward (1e-3 of the largest logit in float32, 6e-2 in
    bfloat16, 1e-2 in float16) and the same greedy tokens; a mismatch raises `SelfCheckError` naming
    where. None: on for modules that are not Hugging Face models (their rewrite relies on recognising
    their code), off for Hugging Face models (their attention is routed by transformers itself)."""

    autotune: Literal["off", "cache", "full"] = "cache"
    """Kernel selection per op and shape (autotune.select_kernels; the report lists each choice): `off` asks
    nothing, each op runs its heuristic (or what this process tuned for the shape before); `cache` the winner
    stored in the kernel cache under `cache_dir`, the heuristic on a miss, never timing anything; `full` tunes a
    miss on the GPU (each candidate checked against the reference op, then timed) and stores it."""

    cache_dir: Path = Field(default_factory=lambda: Path(os.environ.get("COMPILED_LLM_CACHE_DIR") or DEFAULT_CACHE_DIR))
    """Where compiled artifacts and the kernel cache live: `$COMPILED_LLM_CACHE_DIR` where set, else
    `~/.cache/compiled_llm`."""

    graph_cache: bool = True
    """Store the captured graph under `cache_dir/graphs` and reuse it, skipping torch.export, when a later compile
    has the same model code, config, parameter shapes, max_num_tokens and library versions (Hugging Face models;
    weights are never stored: a model with other weights hits and computes with its own). See
    compiled_llm/capture/graph_cache.py. With Inductor, also store Inductor's compiled graph under
    `cache_dir/compiled` and load it on a warm start, skipping Dynamo (compiled_llm/compiled_artifact.py)."""

    passes: tuple[str, ...] | None = None
    """Graph passes to run, in order. None: `fx_passes.DEFAULT_PIPELINE`."""

    compile_backend: Literal["inductor", "eager"] = "inductor"
    """`inductor` compiles the rewritten graph with TorchInductor; `eager` runs it uncompiled
    (for debugging a pass: same numerics as the reference, no compile time)."""

    inductor_options: dict[str, bool | int | float | str] = Field(default_factory=dict)
    """TorchInductor settings for this compile, by their `torch._inductor.config` names (for example
    `{"coordinate_descent_tuning": true}`), over compiled-llm's own (`compile.DEFAULT_CUDA_INDUCTOR_OPTIONS`);
    on the command line, a JSON object."""

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data):
        problem = unknown_fields(data) if isinstance(data, dict) else None
        if problem:  # pydantic's own message would not say which field was meant
            raise ValueError(problem)
        return data

    @field_validator("quantization", "activation_scheme")
    @classmethod
    def _runs_today(cls, value: str, info) -> str:
        supported = _SUPPORTED_NOW[info.field_name]
        if value not in supported:
            raise ValueError(
                f"{info.field_name}={value!r} is planned but not supported yet; "
                f"supported now: {', '.join(repr(v) for v in supported)}"
            )
        return value

    @field_validator("attention_backend")
    @classmethod
    def _known_attention_backend(cls, value: str) -> str:
        from custom_ops.attention.phased import is_phased, members, parse_rules

        if is_phased(value):
            parse_rules(value)  # a ValueError that quotes the rule
        allowed = ATTENTION_BACKENDS[1:] if is_phased(value) else ATTENTION_BACKENDS  # a rule names a backend
        unknown = [name for name in members(value) if name not in allowed]
        if unknown:
            raise ValueError(
                f"attention_backend={value!r}: unknown backend {unknown[0]!r}; allowed: {', '.join(ATTENTION_BACKENDS)}, "
                "or rules per phase such as 'decode<=8:triton,decode:flashinfer,prefill:flashinfer'"
            )
        return value

    @model_validator(mode="after")
    def _quantization_options_need_quantization(self) -> CompileConfig:
        if self.quantize_lm_head and self.quantization == "none":
            raise ValueError("quantize_lm_head=True needs a quantization (e.g. quantization='fp8'); with "
                             "quantization='none' nothing is quantized")  # fmt: skip
        if self.quantization == "mxfp4" and (self.quantize_lm_head or self.activation_scheme != "dynamic"):
            field = "quantize_lm_head=True" if self.quantize_lm_head else f"activation_scheme={self.activation_scheme!r}"
            raise ValueError(f"{field} does not apply to quantization='mxfp4', which keeps a checkpoint's MoE experts in "
                             "MXFP4 (weights only) and every linear in the model's dtype")  # fmt: skip
        if self.quantization in ("int4_awq", "int4_gptq", "int8_sq", "nvfp4", "gguf") and self.parallel_ranks > 1:
            raise ValueError(f"quantization={self.quantization!r} runs on one rank only for now (tensor_parallel_size="
                             f"{self.tensor_parallel_size}, expert_parallel_size={self.expert_parallel_size}); "
                             "quantizations that run over ranks: 'fp8', 'fp8_block'")  # fmt: skip
        if self.smoothquant_alpha != 0.5 and self.quantization != "int8_sq":
            raise ValueError(f"smoothquant_alpha={self.smoothquant_alpha} applies to quantization='int8_sq' only "
                             f"(quantization={self.quantization!r})")  # fmt: skip
        if self.quantization == "fp8_block" and self.activation_scheme != "dynamic":
            raise ValueError(f"activation_scheme={self.activation_scheme!r} does not apply to quantization='fp8_block', "
                             "whose activation scales are per token and 128 columns, computed at run time; allowed: "
                             "'dynamic'")  # fmt: skip
        if self.activation_scheme == "static" and self.quantization not in ("fp8", "auto"):
            raise ValueError(f"activation_scheme='static' applies to quantization='fp8' only (quantization="
                             f"{self.quantization!r}); allowed with {self.quantization!r}: 'dynamic'")  # fmt: skip
        if self.activation_scheme == "static" and self.parallel_ranks > 1:
            raise ValueError(f"activation_scheme='static' calibrates on one rank only for now (tensor_parallel_size="
                             f"{self.tensor_parallel_size}, expert_parallel_size={self.expert_parallel_size}); "
                             "over ranks: 'dynamic'")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _parallel_sizes_share_one_group(self) -> CompileConfig:
        tp, ep = self.tensor_parallel_size, self.expert_parallel_size
        if tp > 1 and ep > 1 and tp != ep:
            raise ValueError(
                f"tensor_parallel_size={tp} with expert_parallel_size={ep}: expert parallelism runs over the "
                f"tensor-parallel group, so the two must be equal (attention tensor-parallel over the same ranks), or "
                f"tensor_parallel_size=1 (attention replicated on each of the expert_parallel_size ranks)"
            )
        return self

    @property
    def parallel_ranks(self) -> int:
        """Processes the model runs over (torch.distributed's world size): the larger parallel size."""
        return max(self.tensor_parallel_size, self.expert_parallel_size)

    @model_validator(mode="after")
    def _batch_fits_a_step(self) -> CompileConfig:
        if self.max_batch_size > self.max_num_tokens:
            raise ValueError(
                f"max_batch_size={self.max_batch_size} exceeds max_num_tokens={self.max_num_tokens}: a decode step "
                "of every sequence would not fit in one step; raise max_num_tokens or lower max_batch_size"
            )
        if self.num_kv_blocks is not None and self.max_batch_size > self.num_kv_blocks:
            raise ValueError(
                f"max_batch_size={self.max_batch_size} exceeds num_kv_blocks={self.num_kv_blocks}: each running "
                f"sequence holds a KV block at least, so the largest max_batch_size that works is {self.num_kv_blocks}"
            )
        too_large = [size for size in self.cuda_graph_batch_sizes or () if size > self.max_batch_size]
        if too_large:
            raise ValueError(
                f"cuda_graph_batch_sizes {too_large} exceed max_batch_size={self.max_batch_size}: no step has more "
                f"sequences, so the largest size that works is {self.max_batch_size}"
            )
        return self

    @field_validator("cuda_graph_batch_sizes")
    @classmethod
    def _positive_sizes(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and (not value or min(value) < 1):
            raise ValueError(f"cuda_graph_batch_sizes must be positive batch sizes, got {value}")
        return value

    @field_validator("inductor_options", mode="before")
    @classmethod
    def _known_inductor_options(cls, value):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"inductor_options must be a JSON object, got {value!r}: {error}") from None
        if isinstance(value, dict):
            import torch._inductor.config as inductor_config

            unknown = sorted(name for name in value if not hasattr(inductor_config, name))
            if unknown:
                raise ValueError(f"inductor_options: {unknown} are not torch._inductor.config settings")
            for name, setting in value.items():
                expected = inductor_config.get_type(name)
                if isinstance(expected, type) and not isinstance(setting, expected):  # as torch.compile checks
                    raise ValueError(
                        f"inductor_options: {name}={setting!r} has type {type(setting).__name__}; "
                        f"torch._inductor.config.{name} takes {expected.__name__} values"
                    )
        return value

    @field_validator("passes")
    @classmethod
    def _known_passes(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return value
        from fx_passes import REQUIRED_PASSES, registered_passes

        known = registered_passes()
        unknown = [name for name in value if name not in known]
        if unknown:
            raise ValueError(f"unknown pass(es) {unknown}; registered passes: {sorted(known)}")
        missing = [name for name in REQUIRED_PASSES if name not in value]
        if missing:
            raise ValueError(f"passes must include {missing}: the runtime needs the paged KV cache it adds")
        return value
