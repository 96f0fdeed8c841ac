"""FP8 checkpoints written by the compressed-tensors library itself (format "float-quantized"), as test
fixtures for our reader: if the writer were ours too, a shared misreading of the format would go unseen.

Only the statistics gathering is ours. compressed-tensors (0.20.1) ships no observers: llm-compressor owns
them, and it pins another compressed-tensors and pulls in datasets, auto-round, ... . Its min-max observers are
only "amin/amax over the strategy's groups, then compressed_tensors' calculate_qparams", so `_minmax_qparams`
does the same: the groups are laid out as llm-compressor's `flatten_for_calibration` lays them, and the scale
itself (absmax / 448, zero guarded) comes from `calculate_qparams`. The library does the rest: the schemes,
`apply_quantization_config` (which registers the scale parameters in the shapes it means), the fp8 cast
(`ModelCompressor.compress_model`), and config.json's quantization_config (`ModelCompressor.update_config`),
in the order of llm-compressor's save_pretrained_wrapper.

`python tests/fp8_checkpoints.py` writes each strategy and checks the layout with plain torch.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import torch
import transformers
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    apply_quantization_config,
)
from compressed_tensors.quantization.utils import calculate_qparams, maybe_pad_tensor_for_block_quant
from safetensors import safe_open

STRATEGIES = ("channel", "tensor", "block")
BLOCK = [128, 128]
FP8_MAX = 448.0


def _fp8(**kwargs) -> QuantizationArgs:
    return QuantizationArgs(num_bits=8, type="float", symmetric=True, **kwargs)


def _scheme(strategy: str) -> QuantizationScheme:
    """Weights per `strategy`; activations dynamic per token, except static per tensor with "tensor" weights
    (the library's FP8_DYNAMIC and FP8 presets; its FP8_BLOCK preset has dynamic 1x128 activation groups)."""
    if strategy == "channel":
        weights, inputs = _fp8(strategy="channel"), _fp8(strategy="token", dynamic=True)
    elif strategy == "tensor":
        weights, inputs = _fp8(strategy="tensor"), _fp8(strategy="tensor", observer="static_minmax")
    elif strategy == "block":
        weights, inputs = _fp8(strategy="block", block_structure=BLOCK), _fp8(strategy="token", dynamic=True)
    else:
        raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)


def _minmax_qparams(value: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """A min-max observer: min/max over each group the strategy gives a scale, laid out in the scale's shape."""
    if args.strategy == "tensor":
        groups = value.reshape(1, -1)  # any shape, one group
    elif args.strategy == "channel":
        groups = value  # (out, in): one group per output row -> scale (out, 1)
    elif args.strategy == "block":
        # zero padding up to whole blocks, as the library pads when it quantizes; it cannot move an absmax
        padded = maybe_pad_tensor_for_block_quant(value, args.block_structure)
        (bh, bw), (rows, cols) = args.block_structure, padded.shape
        groups = padded.reshape(rows // bh, bh, cols // bw, bw).transpose(1, 2).flatten(-2)  # (rows/bh, cols/bw, -)
    else:
        raise ValueError(f"no observer for strategy {args.strategy}")
    scale, _ = calculate_qparams(groups.amin(-1, keepdim=args.strategy == "channel"),
                                 groups.amax(-1, keepdim=args.strategy == "channel"), args)  # fmt: skip
    return scale


def _target_linears(model: torch.nn.Module, ignore=("lm_head",)) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in ignore}


@torch.no_grad()
def _observe_inputs(model: torch.nn.Module, batches: int = 4, seq_len: int = 16) -> dict[str, list[torch.Tensor]]:
    """Static-minmax statistics (min, max) of every target linear's input over a few batches of random tokens
    (there is no dataset here). Taken on the float model, before quantization, where llm-compressor would
    calibrate through the weight-fake-quantized one: the scale differs a little, the format not at all."""
    seen: dict[str, list[torch.Tensor]] = {}

    def hook(name):
        def record(_module, args):
            x = args[0].detach()
            lo, hi = seen.setdefault(name, [x.amin(), x.amax()])
            seen[name] = [torch.minimum(lo, x.amin()), torch.maximum(hi, x.amax())]

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in _target_linears(model).items()]
    try:
        generator = torch.Generator().manual_seed(0)
        for _ in range(batches):
            model(torch.randint(model.config.vocab_size, (2, seq_len), generator=generator))
    finally:
        for handle in handles:
            handle.remove()
    return seen


@torch.no_grad()
def write_compressed_tensors_fp8(model: torch.nn.Module, directory: str, strategy: str,
                                 ignore: tuple[str, ...] = ("lm_head",)) -> None:  # fmt: skip
    """Write `model` (a Hugging Face causal LM, changed in place: its linears end up compressed) to `directory`
    as a compressed-tensors FP8 e4m3 checkpoint: every nn.Linear but those named in `ignore` (stored in float),
    weights per `strategy` ("channel", "tensor" or "block" 128x128), inputs dynamic per token or (strategy
    "tensor") static per tensor."""
    scheme = _scheme(strategy)
    model.eval()
    stats = _observe_inputs(model) if not scheme.input_activations.dynamic else {}

    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(ignore))
    apply_quantization_config(model, config, show_progress=False)  # registers weight_scale (input_scale) empty
    for name, module in _target_linears(model, ignore).items():
        module.weight_scale.copy_(_minmax_qparams(module.weight, scheme.weights))
        if name in stats:
            module.input_scale.copy_(calculate_qparams(*stats[name], scheme.input_activations)[0])
        module.quantization_status = QuantizationStatus.FROZEN  # calibrated, as llm-compressor leaves it

    compressor = ModelCompressor.from_pretrained_model(model)  # infers format "float-quantized"
    compressor.compress_model(model)  # weight -> float8_e4m3fn by the library's quantize(); drops zero points
    model.save_pretrained(directory)
    compressor.update_config(directory)  # config.json's quantization_config, as the library writes it


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block: list[int] | None = None) -> torch.Tensor:
    """Plain torch, independent of the library: the float weight is fp8 value times scale (multiply), with a
    (1,) scale for the tensor, (out, 1) per output row, or (ceil(out/128), ceil(in/128)) per 128x128 block."""
    if block is not None:  # each scale covers a block; the last row/column of blocks may be partial
        rows, cols = weight.shape
        scale = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale.float()


def tiny_llama(intermediate_size: int = 384) -> torch.nn.Module:
    """Large enough for several 128x128 blocks per weight, with a k/v projection of 64 rows: a partial block row."""
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=intermediate_size, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, vocab_size=256)  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).float()


def self_test() -> None:
    for strategy in STRATEGIES:
        model = tiny_llama()
        original = {n + ".weight": m.weight.detach().clone() for n, m in _target_linears(model).items()}
        with tempfile.TemporaryDirectory() as directory:
            start = time.perf_counter()
            write_compressed_tensors_fp8(model, directory, strategy)
            seconds = time.perf_counter() - start
            with open(f"{directory}/config.json") as f:
                qconfig = json.load(f)["quantization_config"]
            print(f"=== {strategy}: written in {seconds:.2f} s\n{json.dumps(qconfig, indent=2)}")
            with safe_open(f"{directory}/model.safetensors", "pt") as f:
                names = set(f.keys())
                for name in sorted(n for n in names if n.startswith("model.layers.0.")):
                    if "proj" in name:
                        t = f.get_tensor(name)
                        print(f"  {name}: {t.dtype} {tuple(t.shape)}")
                assert "lm_head.weight" in names and f.get_tensor("lm_head.weight").dtype == torch.float32
                for key, want in original.items():
                    prefix = key.removesuffix("weight")
                    weight, scale = f.get_tensor(key), f.get_tensor(prefix + "weight_scale")
                    assert weight.dtype == torch.float8_e4m3fn, (key, weight.dtype)
                    assert (prefix + "input_scale" in names) == (strategy == "tensor"), key
                    assert not any(n.startswith(prefix) and "zero_point" in n for n in names), key
                    got = dequantize(weight, scale, BLOCK if strategy == "block" else None)
                    error = ((got - want).norm() / want.norm()).item()
                    assert error < 0.07, (strategy, key, error)
                    # each scale group's absmax lands on the e4m3 maximum: the scale is per group, as laid out
                    groups = weight.float().abs()
                    if strategy == "block":
                        groups = maybe_pad_tensor_for_block_quant(groups, BLOCK)
                        groups = groups.unflatten(0, (-1, 128)).unflatten(2, (-1, 128)).amax((1, 3))
                    else:
                        groups = groups.amax(-1, keepdim=True) if strategy == "channel" else groups.amax().reshape(1)
                    assert groups.shape == scale.shape and torch.all(groups == FP8_MAX), (key, groups)
                if strategy == "tensor":
                    input_scale = f.get_tensor("model.layers.0.self_attn.q_proj.input_scale")
                    assert input_scale.shape == (1,) and 0 < input_scale.item() < 1, input_scale
                # the library's own reader (transformers' compressed-tensors loader) decompresses on the first
                # forward; its float weights must be exactly the plain-torch `dequantize` above
                loaded = transformers.AutoModelForCausalLM.from_pretrained(directory)
                loaded(torch.zeros(1, 1, dtype=torch.long))
                block = BLOCK if strategy == "block" else None
                for name, module in _target_linears(loaded).items():
                    mine = dequantize(f.get_tensor(name + ".weight"), f.get_tensor(name + ".weight_scale"), block)
                    assert torch.equal(module.weight, mine), name
        print("  ok: weight.float() * weight_scale is within 7% of each float weight and equals the library's")


if __name__ == "__main__":
    sys.exit(self_test())
