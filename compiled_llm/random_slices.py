"""Random weights made where a rank needs them: a `random:NAME` preset built on the meta device, whose every tensor a
compile reads in slices (checkpoint_slices.py) from `RandomSlices` instead of a checkpoint's files. Each rank of a
tensor-parallel model makes only its shards, directly on its GPU, and an FP8 preset's linears (`random:NAME-fp8`)
are made directly in e4m3 with a scale per output channel: Llama-3.1-70B's shape fits two H200s in FP8 where its
bf16 weights, made whole first, would fit none.

A tensor's values do not depend on how it is cut: they are made in chunks of rows (its first dimension), each from
a generator seeded by the tensor's name and the chunk, and a slice makes the chunks it covers and cuts them. So two
ranks' shards are parts of one model, the one a single process reads whole, which the tests hold them to. The values
depend on the device that makes them (CPU and CUDA generators differ, and CUDA's randn layout follows the GPU's SM
count): ranks on GPUs of one kind agree; another kind of GPU makes another model of the same shapes.
Values: norm weights 1 (LlamaRMSNorm's; a (1 + w) norm would want 0), every `*bias` 0, the rest normal with
`initializer_range`; FP8 weights e4m3 codes of about N(0, 64^2) times a scale of initializer_range / 64.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from compiled_llm.checkpoint_slices import CheckpointSlices, Fp8Weight, named_tensors
from compiled_llm.fp8_checkpoint import Fp8Checkpoint
from compiled_llm.meta_model import mark_fp8_weight, move_buffer_to_meta, parameters_on_meta, rank_device, tied_names
from custom_ops.linear.fp8 import FP8

CHUNK_ELEMENTS = 1 << 22  # a chunk's temporaries: 16 MB of float32
CODE_STD = 64.0  # FP8 codes' standard deviation: e4m3's 3 mantissa bits at every magnitude to 448 (7 sigma)
RANDOM_FP8 = Fp8Checkpoint("fp8", "weight_scale", "random e4m3 weights, a scale per output channel")


class RandomTensor:
    """A tensor of `shape` made on demand, as safetensors' slice is read: `t[index]` (a tuple of slices, `()` for
    all) makes the rows `index` covers on `device`, in `dtype`. `kind`: "normal" (times `std`), "ones", "zeros",
    "e4m3" (codes, FP8), "scale" (the codes' scale, float32)."""

    def __init__(self, name: str, shape: list[int], kind: str, dtype: torch.dtype, device: torch.device, std: float):
        self.name, self.shape, self.kind, self.dtype, self.std = name, list(shape), kind, dtype, std
        self.device = torch.device(device)
        self.rows = max(1, CHUNK_ELEMENTS // max(1, math.prod(self.shape[1:])))  # a chunk's rows
        self.seed = zlib.crc32(name.encode())

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        if not all(isinstance(i, slice) for i in index):
            raise TypeError(f"{self.name}: random slices are read with slices (CheckpointSlices' reads), not {index}")
        if not self.shape:  # a scalar
            return self._chunk(0, [])
        index = index + (slice(None),) * (len(self.shape) - len(index))
        first, end, step = index[0].indices(self.shape[0])
        if step != 1:
            raise ValueError(f"{self.name}: random slices are read in steps of 1, not {step}")
        pieces = []
        for chunk in range(first // self.rows, -(-end // self.rows) if end > first else first // self.rows):
            start = chunk * self.rows
            rows = self._chunk(chunk, [min(self.rows, self.shape[0] - start), *self.shape[1:]])
            pieces.append(rows[max(first - start, 0) : end - start][(slice(None), *index[1:])])
        if not pieces:
            return torch.empty([0, *self.shape[1:]], dtype=self.dtype, device=self.device)[(slice(None), *index[1:])]
        return torch.cat(pieces).contiguous()

    def _chunk(self, chunk: int, shape: list[int]) -> torch.Tensor:
        if self.kind == "ones":
            return torch.ones(shape, dtype=self.dtype, device=self.device)
        if self.kind == "zeros":
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.kind == "scale":
            return torch.full(shape, self.std / CODE_STD, dtype=self.dtype, device=self.device)
        generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + chunk)
        values = torch.randn(shape, generator=generator, device=self.device)
        if self.kind == "e4m3":
            return (values * CODE_STD).clamp(-448.0, 448.0).to(FP8)
        return (values * self.std).to(self.dtype)


class RandomSlices(CheckpointSlices):
    """CheckpointSlices whose every tensor is a RandomTensor: `tensors` maps a key (what `keys` names) to one."""

    def __init__(self, source: str, tensors: dict[str, RandomTensor], keys: dict[str, tuple], buffers: dict,
                 dtype: torch.dtype, device: torch.device):  # fmt: skip
        super().__init__(source, keys, buffers, dtype, device)  # its "directory" names the preset in logs
        self.tensors = tensors

    def _slice(self, name: str) -> RandomTensor:
        return self.tensors[self.keys[name][1]]


def random_meta_model(source: str, config, dtype: torch.dtype, device: str | torch.device, fp8: bool) -> nn.Module:
    """The model of `config` with its parameters on meta and `checkpoint_slices` (RandomSlices) attached; `fp8`: its
    decoder linears' weights (every nn.Linear under `.layers.`) made in e4m3, as an FP8 checkpoint with a scale per
    channel loads (compiled_llm_quantization "fp8"). `source` names it in logs (`random:NAME`)."""
    import transformers as tf

    device = rank_device(torch.device(device))
    # the buffers computed at init (RoPE's) on the device, where random_model has them
    with parameters_on_meta(), torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    std = getattr(config, "initializer_range", None) or 0.02
    norms = {name for name, module in model.named_modules() if "Norm" in type(module).__name__}
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear) and ".layers." in name}
    keys, tensors, fp8_weights = {}, {}, {}
    for names in tied_names(model):  # tied parameters: one tensor, under the first name
        key, param = names[0], model.get_parameter(names[0])
        owner, leaf = key.rpartition(".")[0], key.rpartition(".")[2]
        kind = "zeros" if leaf.endswith("bias") else "ones" if owner in norms else "normal"
        if fp8 and owner in linears and leaf == "weight":
            scale = f"{owner}.{RANDOM_FP8.scale_name}"
            tensors[key] = RandomTensor(key, list(param.shape), "e4m3", FP8, device, std)
            tensors[scale] = RandomTensor(scale, [param.shape[0]], "scale", torch.float32, device, std)
            keys[scale] = ("random", scale)
            fp8_weights[key] = Fp8Weight(scale, "channel", RANDOM_FP8)
            mark_fp8_weight(param, [param.shape[0]])
        else:
            tensors[key] = RandomTensor(key, list(param.shape), kind, param.dtype, device, std)
        keys |= dict.fromkeys(names, ("random", key))
    buffers = {}
    for name, buffer in model.named_buffers(remove_duplicate=False):
        buffers[name] = buffer
        move_buffer_to_meta(model, name, buffer)
    slices = RandomSlices(source, tensors, keys, buffers, dtype, device)
    slices.dtypes = {name: t.dtype for name, t in named_tensors(model)}
    slices.dtypes |= {key: torch.float32 for key, t in tensors.items() if t.kind == "scale"}
    slices.fp8 = fp8_weights
    slices.stored_bytes = sum(math.prod(t.shape) * t.dtype.itemsize for t in tensors.values())
    model.checkpoint_slices = slices
    if fp8:
        model.compiled_llm_quantization = "fp8"
    return model
