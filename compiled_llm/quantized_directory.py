"""What every quantized checkpoint loader shares (fp8_checkpoint.py, int4_checkpoint.py): the plain model its
config.json describes, the directory's safetensors read whole, and the state loaded with its ties checked."""

from __future__ import annotations

from pathlib import Path

import torch


def plain_model(path: Path, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The model of config.json without its quantization_config (the loader marks the quantized linears), on
    `device` in `dtype`, with generation_config.json's EOS tokens and defaults as from_pretrained reads them."""
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    if (path / "generation_config.json").exists():
        model.generation_config = tf.GenerationConfig.from_pretrained(path)
    return model


def read_tensors(path: Path, device: str, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors files, on `device`; `what` names the format for the error."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no .safetensors files ({what} checkpoints load from safetensors only)")
    tensors = {}
    for file in files:
        with safe_open(file, framework="pt", device=device) as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118  (a safe_open handle is not a dict)
    return tensors


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, quantized: set[str],
               what: str) -> None:  # fmt: skip
    """Load `state` (names as the model's) into `model`, ties kept; a tied pair stored with different values, or
    names that do not match the model, are ValueErrors naming them. `quantized`: the names the loader dequantized
    (experts among the unexpected ones get their own message)."""
    names = {}  # a tied parameter's names (lm_head.weight and embed_tokens.weight): loaded under any of them
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    for tied in names.values():  # each stored: one copy over the other would silently run the wrong one
        stored = [n for n in tied if n in state]
        if any(not torch.equal(state[stored[0]], state[n]) for n in stored[1:]):
            raise ValueError(f"{path}: {' and '.join(stored)} are tied (config.json's tie_word_embeddings), yet the "
                             "files hold different values for them, which transformers loads untied; set "
                             "tie_word_embeddings to false in config.json")  # fmt: skip
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    missing = [m for m in missing if not any(n in state for n in names.get(id(model.get_parameter(m)), []))]
    per_expert = [name for name in unexpected if ".experts." in name and name in quantized]
    if per_expert:  # transformers merges per-expert tensors at load; these loaders read each tensor as it is stored
        raise ValueError(f"{path}: {per_expert[0]} (and {len(per_expert) - 1} more) are MoE experts stored one {what} "
                         f"tensor an expert, which {what} checkpoints do not load yet")  # fmt: skip
    if missing or unexpected:
        raise ValueError(f"{path}: the checkpoint does not match {type(model).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")  # fmt: skip
