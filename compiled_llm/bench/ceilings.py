"""The most output tokens/s a throughput workload allows on this GPU, from what it must compute and what it must read.

- FLOP ceiling: the workload's floating-point work at the GEMM rate measured on this GPU (a large GEMM of the
  kind the decoder's linears run: bf16 F.linear, or for FP8 models cuBLASLt's FP8 GEMM with row scales). Work per
  request: 2 FLOPs per weight of the decoder's linears for every token computed (prompt and output but the last),
  2 per LM-head weight for every token whose logits are sampled (the prompt's last and each output but the
  last), and attention's 4 x layers x heads x head_dim per cached position each token attends to (QK^T and PV,
  causal); MoE experts count as their share of active experts (top-k of n).
- Byte ceiling: decode steps of `max_batch_size` sequences, each step reading the weights once (of an untied input
  embedding only the batch's rows: the caller passes the bytes a step reads) and each sequence's KV cache, at the
  measured copy bandwidth (prompts, compute-bound, are left out).

Both are upper bounds that ignore each other and every overhead: a figure is judged by the lower one.
"""

from __future__ import annotations

import torch

from compiled_llm.bench.measure import event_median_s


def measured_gemm_flops(device: torch.device, fp8: bool, size: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of a size^3 GEMM on `device`: bf16 F.linear, or (fp8) torch._scaled_mm with row and column scales."""
    a = torch.randn(size, size, device=device).to(torch.bfloat16)
    b = torch.randn(size, size, device=device).to(torch.bfloat16)
    if fp8:
        a, b = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        scale_a = torch.ones(size, 1, device=device)
        scale_b = torch.ones(1, size, device=device)

        def gemm():
            return torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
    else:

        def gemm():
            return torch.nn.functional.linear(a, b)

    gemm()
    return 2 * size**3 / event_median_s(gemm, repeats)


def expert_routing(config) -> tuple[int, int] | None:
    """(experts a token is routed to, experts a layer has) of an MoE model's config; None for a dense one."""
    active = getattr(config, "num_experts_per_tok", None)
    experts = next((getattr(config, key) for key in ("num_experts", "num_local_experts", "n_routed_experts")
                    if getattr(config, key, None)), None)  # Qwen, Mixtral and GPT-OSS, DeepSeek  # fmt: skip
    return (active, experts) if active and experts else None


def active_expert_share(config, tokens: int) -> float:
    """The share of a layer's experts a step of `tokens` tokens reads: k of E for one token, which is exact; for more,
    the expected share if each token picked its k experts uniformly, 1 - (1 - k/E)^tokens (a trained router is not
    uniform, so this is an estimate). 1.0 for a dense model."""
    routing = expert_routing(config)
    if routing is None:
        return 1.0
    active, experts = routing
    return 1.0 - (1.0 - active / experts) ** max(1, tokens)


def _linear_weights(model) -> tuple[float, int]:
    """(weights of the decoder's linears a token multiplies, MoE experts by their active share; LM-head weights)."""
    config = model.config
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_weights = head.weight.numel() if head is not None else embedding.numel()
    expert_share = active_expert_share(config, 1)
    decoder = 0.0
    for name, parameter in model.named_parameters():
        if parameter.dim() < 2 or parameter is embedding or (head is not None and parameter is head.weight):
            continue
        share = expert_share if ".experts." in name else 1.0
        decoder += parameter.numel() * share
    return decoder, head_weights


def workload_flops(model, input_len: int, output_len: int) -> float:
    """FLOPs one request of input_len prompt and output_len output tokens takes (see the module docstring)."""
    config = model.config
    decoder, head = _linear_weights(model)
    computed = input_len + output_len - 1  # the last output token is sampled, never fed back
    sampled = output_len  # the prompt's last position, then each output but the last
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    attended = sum(range(1, computed + 1))  # token t attends to positions 0..t
    return 2 * decoder * computed + 2 * head * sampled + 4 * config.num_hidden_layers * heads * head_dim * attended


def throughput_ceilings(model, weight_bytes: int, kv_bytes_per_token: float, input_len: int, output_len: int,
                        max_batch_size: int, gemm_flops: float, bandwidth: float) -> dict:  # fmt: skip
    """Output tokens/s the FLOP and byte ceilings allow (see the module docstring)."""
    flops_per_output = workload_flops(model, input_len, output_len) / output_len
    average_context = input_len + output_len / 2
    bytes_per_output = weight_bytes / max_batch_size + kv_bytes_per_token * average_context
    return {
        "gemm_flops_per_s": gemm_flops,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "flops_per_output_token": flops_per_output,
        "bytes_per_output_token": bytes_per_output,
        "flop_ceiling_output_tokens_per_s": gemm_flops / flops_per_output,
        "byte_ceiling_output_tokens_per_s": bandwidth / bytes_per_output,
    }
