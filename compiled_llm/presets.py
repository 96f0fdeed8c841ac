"""Random-weight models of known architectures (`random:NAME`), for benchmarks without downloads.

Speed does not depend on weight values; these build the exact shapes of real checkpoints, directly on
the target device.
"""

from __future__ import annotations

import torch
import transformers as tf

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}  # fmt: skip

RANDOM_PRESETS = {
    "llama-3.1-8b": lambda: tf.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
        rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False,
    ),
    "llama-3.1-70b": lambda: tf.LlamaConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
        rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False,
    ),
    "qwen3-8b": lambda: tf.Qwen3Config(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    # Mixtures of experts (issue 25): the shapes of Qwen/Qwen3-30B-A3B and mistralai/Mixtral-8x7B-v0.1.
    "qwen3-30b-a3b": lambda: tf.Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, max_position_embeddings=40960, rope_theta=1000000.0,
        rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False,
    ),
    "mixtral-8x7b": lambda: tf.MixtralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    ),
    # deepseek-ai/DeepSeek-V2-Lite: MLA (a 512-wide latent, no q compression), 64 routed experts (6 a token) and 2
    # shared, the first layer dense.
    "deepseek-v2-lite": lambda: tf.DeepseekV2Config(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
        first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, v_head_dim=128,
        qk_nope_head_dim=128, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
        routed_scaling_factor=1.0, max_position_embeddings=163840, rope_theta=10000.0, rms_norm_eps=1e-6,
        bos_token_id=100000, eos_token_id=100001, tie_word_embeddings=False,
    ),
    # openai/gpt-oss-20b: 32 experts (4 a token) with biases and the clamped SwiGLU, sinks, alternating 128-token
    # sliding window; bf16 experts here, MXFP4 ones (as the checkpoint ships them) in gpt-oss-20b-mxfp4.
    "gpt-oss-20b": lambda: tf.GptOssConfig(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * 12, max_position_embeddings=131072,
        rope_theta=150000.0, rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": False, "original_max_position_embeddings": 4096}, attention_bias=True, swiglu_limit=7.0,
        rms_norm_eps=1e-5, eos_token_id=200002, pad_token_id=199999, tie_word_embeddings=False,
    ),
    "smollm2-135m": lambda: tf.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    ),
    "tiny-llama": lambda: tf.LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
    ),
}  # fmt: skip
# Presets whose MoE experts are random MXFP4 weights, as an MXFP4 checkpoint loads (random_mxfp4_experts): -> base preset.
MXFP4_PRESETS = {"gpt-oss-20b-mxfp4": "gpt-oss-20b"}
# Presets whose decoder linears are random GGUF Q4_K blocks, as a .gguf file loads (random_q4_k_linears): -> base preset.
Q4_K_PRESETS = {"llama-3.1-8b-q4_k": "llama-3.1-8b"}
# Presets whose decoder linears are random e4m3 weights with a scale per channel, made by slices where they are read
# (random_slices.py; never whole in bf16 first: the 70B's do not fit a GPU): -> base preset.
FP8_PRESETS = {"llama-3.1-8b-fp8": "llama-3.1-8b", "llama-3.1-70b-fp8": "llama-3.1-70b"}


def preset_names() -> list[str]:
    """Every NAME of `random:NAME`."""
    return [*RANDOM_PRESETS, *MXFP4_PRESETS, *Q4_K_PRESETS, *FP8_PRESETS]


def preset_config(name: str):
    """The transformers config of `random:NAME` (a ValueError listing the known names for another)."""
    if name not in preset_names():
        raise ValueError(f"unknown preset 'random:{name}'; known: {', '.join('random:' + n for n in preset_names())}")
    return RANDOM_PRESETS[{**MXFP4_PRESETS, **Q4_K_PRESETS, **FP8_PRESETS}.get(name, name)]()


def random_model(name: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda"):
    """A randomly initialised `random:NAME` model, in eval mode, built on `device`."""
    config = preset_config(name)
    if name in FP8_PRESETS:
        raise ValueError(f"random:{name} is made by slices where a compile reads it, never whole: load it with "
                         "model_source.load_model")  # fmt: skip
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    if name in MXFP4_PRESETS:
        random_mxfp4_experts(model)
    if name in Q4_K_PRESETS:
        random_q4_k_linears(model)
    return model.eval()


def random_q4_k_blocks(n: int, k: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """[n, k / 256, 144] uint8: random valid Q4_K super-blocks (module docstring of random_q4_k_linears)."""
    rows = torch.randint(0, 256, (n, k // 256, 144), dtype=torch.uint8, device=device, generator=generator)
    halves = (torch.rand(n, k // 256, 2, device=device, generator=generator) + 0.5) * 1e-4
    rows[..., 0:4] = halves.half().view(torch.uint8)  # d and dmin
    return rows


@torch.no_grad()
def random_q4_k_linears(model: torch.nn.Module, generator: torch.Generator | None = None) -> int:
    """Give every decoder linear whose input width is a multiple of 256 random valid GGUF Q4_K super-blocks, as
    compiled_llm/gguf_blocks.py attaches a file's: the weight holds their exact dequantization and carries the
    blocks in int4_linear's form (`int4_tensors`: codes, scales d sc and offsets -dmin mn per 32 columns); how many.
    The blocks' bytes are uniformly random (any 6-bit scale and 4-bit code is valid) but for d and dmin, float16
    values that give weights of about 0.02 (an 8B model's initialisation), so the model's activations stay finite."""
    from compiled_llm.gguf_blocks import BLOCK, q4_k_tensors
    from custom_ops.linear.int4 import dequantize

    done = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".layers." not in name or module.weight.shape[1] % 256:
            continue
        weight = module.weight
        stored = q4_k_tensors(random_q4_k_blocks(*weight.shape, weight.device, generator))
        weight.copy_(dequantize(*stored, BLOCK).to(weight.dtype))
        weight.int4_tensors = (*stored, BLOCK, "gguf")
        done += 1
    model.compiled_llm_quantization = "gguf"
    return done


@torch.no_grad()
def random_mxfp4_experts(model: torch.nn.Module, generator: torch.Generator | None = None) -> None:
    """Give every experts module random valid MXFP4 weights as compiled_llm/mxfp4_checkpoint.py loads a checkpoint's:
    each parameter holds their exact dequantization, and carries the bytes and exponents (`mxfp4_blocks` [E, N, K / 2],
    `mxfp4_scales` [E, N, K / 32], in the [E, N, K] orientation whatever the storage's)."""
    from custom_ops.moe.mxfp4 import dequantize_mxfp4, random_mxfp4

    for module in model.modules():
        if not (hasattr(module, "has_gate") and hasattr(module, "gate_up_proj")):  # transformers' experts classes
            continue
        transposed = getattr(module, "is_transposed", False)
        for name in ("gate_up_proj", "down_proj"):
            parameter = getattr(module, name)
            logical = parameter.transpose(1, 2) if transposed else parameter  # [E, N, K]
            blocks, scales = random_mxfp4(*logical.shape, device=parameter.device, generator=generator)
            for expert in range(logical.shape[0]):  # one expert at a time: the dequantization's temporaries are large
                logical[expert].copy_(dequantize_mxfp4(blocks[expert], scales[expert], parameter.dtype))
            parameter.mxfp4_blocks, parameter.mxfp4_scales = blocks, scales
    model.compiled_llm_quantization = "mxfp4"
