"""Paged attention's candidates for the autotuner (autotune.tuner.OpTuning): the backend per step phase, per
decode batch size and per layer kind.

A bucket is one kind of layer (heads, KV heads, head_dim, sliding window, soft-cap, sinks, dtypes, how many
layers of the model are of that kind, the model's weight MiB) in one phase: decode at each batch size the model captures a CUDA graph
for, each sequence attending to TUNING_CONTEXT keys (max_seq_len - 1 where shorter: the kernels' order changes
with the length, and a model served for short sequences should run what is fastest for those), or prefill
(sequences of PREFILL_CHUNK new tokens, at most max_seq_len). Only layers whose backend `attention_backend="auto"` picked take part: a backend the
user named is what runs. The candidates are the backends that can run the layer, that one (the heuristic and
the fallback) first, never the reference (it syncs with the host); on a GPU decode takes only backends a CUDA
graph can replay, and Triton's decode kernel also in triton_decode_tuning's variants (`triton-splits4`,
`triton-keys64-warps4-stages3`: the layer's backend is `triton`, and the count or launch goes to the table its launches
read for that shape). A backend with a planner pays its
plan() on the host once a step for all layers of a kind: the part of that time a step's weight reads cannot hide,
over the kind's layers, is added to each call's (autotune.tuner.Candidate.host_us).

The choices of a kind become its layers' backend name after every bucket is chosen (`finish`): one backend
where all phases and sizes chose it, else the rules of a phased backend (phased.py), e.g.
`decode<=8:triton,decode:flashinfer,prefill:flashinfer`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from autotune.kernel_cache import source_hash
from autotune.select import device_index, register
from autotune.tuner import Candidate, input_copies
from custom_ops.attention import triton as triton_backend
from custom_ops.attention import triton_decode_tuning
from custom_ops.attention.backends import (
    AUTO_ORDER,
    LayerAttentionFeatures,
    StepAttentionMetadata,
    get_attention_backend,
    planned_step,
    registered_attention_backend,
)
from custom_ops.attention.phased import PhaseRule, phased_name

OP = "paged_attention"
TUNING_CONTEXT = 1024  # keys per decode sequence while tuning, at most: a chat turn's, between short and long
# contexts (BENCHMARKS.md: Triton's decode kernel wins at 256 keys, FlashInfer's from 2048 at most batch sizes)
PREFILL_CHUNK = 512  # new tokens per prefill sequence while tuning
PREFILL_SEQS = 4
STEP_KEYS = ("phase", "batch", "context", "seqs", "chunk")  # a bucket's step; the rest is its kind of layer


def _layer_kind(features: LayerAttentionFeatures, block_size: int, layers: int, weight_mib: int) -> dict:
    """The bucket fields of a kind of layer, with the KV cache's block size, how many layers are of it and the MiB
    of weights a step reads (how much host time a step hides: _plan_us)."""
    return {"heads": features.num_q_heads, "kv_heads": features.num_kv_heads, "head_dim": features.head_dim,
            "window": features.sliding_window, "softcap": features.softcap, "sinks": features.has_sinks,
            "dtype": _dtype_name(features.dtype), "kv_cache": _dtype_name(features.cache_dtype), "block": block_size,
            "layers": layers, "weight_mib": weight_mib,
            **({"values_in_keys": True} if features.values_in_keys else {})}  # fmt: skip  (older keys unchanged)


def _kind_key(device: torch.device, kind: dict) -> tuple:
    return (device_index(device), *(kind[key] for key in sorted(kind)))


def _features(bucket: dict) -> LayerAttentionFeatures:
    return LayerAttentionFeatures(
        head_dim=bucket["head_dim"], num_q_heads=bucket["heads"], num_kv_heads=bucket["kv_heads"],
        scale=bucket["head_dim"] ** -0.5, sliding_window=bucket["window"], softcap=bucket["softcap"],
        has_sinks=bucket["sinks"], dtype=getattr(torch, bucket["dtype"]), cache_dtype=getattr(torch, bucket["kv_cache"]),
        values_in_keys=bucket.get("values_in_keys", False),
    )  # fmt: skip


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.cache
def _backend_source(name: str) -> str:
    """A hash of the backend's code: its module and the kernels it imports from this package (the kernel cache's
    device key holds the torch, triton and FlashInfer versions)."""
    module = Path(sys.modules[get_attention_backend(name).run.__module__].__file__)
    siblings = sorted(p for p in module.parent.glob(f"{module.stem}*.py")) + [module.parent / "kv_cache_write.py"]
    return source_hash(*(p.read_text() for p in siblings))


class PagedAttentionTuning:
    """autotune.tuner.OpTuning of paged attention (see the module docstring)."""

    op = OP
    reference_is_a_candidate = False  # tests make it one, to tune a CPU model (where sdpa is the only other)

    def __init__(self):
        self._chosen: dict[tuple, dict[tuple, str]] = {}  # kind -> {("decode", batch) | ("prefill", 0): backend}
        self._planners: dict[tuple, object] = {}  # (backend, id(metadata)) -> a planner planned for it
        self._device = torch.device("cuda")  # the compiled model's (buckets() reads it from the graph)

    # -- the buckets of a graph, and what is chosen for them ----------------------------------------------------

    def buckets(self, gm: torch.fx.GraphModule) -> list[dict]:
        """A decode bucket per captured batch size and a prefill bucket, per kind of `auto`-chosen layer on a GPU
        that more than one backend can run."""
        self._chosen.clear()  # what an earlier select_kernels left, if it stopped before finish()
        self._planners.clear()
        layers = [layer for layer in gm.meta.get("paged_attention", ()) if layer.why.startswith("auto")]
        if not layers:
            return []
        self._device = torch.device(gm.meta["device"])
        found = []
        context, chunk = min(TUNING_CONTEXT, gm.meta["max_seq_len"] - 1), min(PREFILL_CHUNK, gm.meta["max_seq_len"])
        for features, count in _count_kinds(layers).items():
            kind = _layer_kind(features, gm.meta["block_size"], count, gm.meta["weight_bytes"] >> 20)
            for batch in gm.meta["decode_batch_sizes"]:
                bucket = {"phase": "decode", "batch": batch, "context": context, **kind}
                if len(self.candidates(bucket)) > 1:
                    found.append(bucket)
            bucket = {"phase": "prefill", "seqs": PREFILL_SEQS, "chunk": chunk, **kind}
            if len(self.candidates(bucket)) > 1:
                found.append(bucket)
        return found

    def install(self, bucket: dict, candidate: Candidate, device: torch.device) -> None:
        key = ("decode", bucket["batch"]) if bucket["phase"] == "decode" else ("prefill", 0)
        kind = {name: value for name, value in bucket.items() if name not in STEP_KEYS}
        backend = "triton" if {"splits", "launch"} & set(candidate.config) else candidate.name
        self._chosen.setdefault(_kind_key(device, kind), {})[key] = backend
        if bucket["phase"] == "decode":
            f = _features(bucket)
            split = triton_backend.split_key(device_index(device), bucket["batch"], f.num_q_heads, f.num_kv_heads,
                                             f.head_dim, f.sliding_window, f.cache_dtype)  # fmt: skip
            for tuned, field in ((triton_backend.TUNED_DECODE_SPLITS, "splits"),
                                 (triton_backend.TUNED_DECODE_LAUNCHES, "launch")):  # fmt: skip
                if field in candidate.config:
                    tuned[split] = candidate.config[field]
                else:  # the heuristic's
                    tuned.pop(split, None)

    def finish(self, gm: torch.fx.GraphModule, device: torch.device, choices: list | None = None) -> None:
        """Write the chosen backends into the graph's paged-attention calls and its layer list. A decode batch size
        that only the heuristic chose (no cached choice) takes the backend of the nearest size that was tuned: the
        sizes of one run may not be those of another (`tune --batch-sizes`), and neighbours choose alike."""
        layers = gm.meta.get("paged_attention", [])
        chosen, self._chosen = self._chosen, {}
        self._planners.clear()
        _take_nearest_tuned(chosen, choices or [], device)
        counts = _count_kinds([layer for layer in layers if layer.why.startswith("auto")])
        names = {}
        for i, layer in enumerate(layers):
            if not layer.why.startswith("auto"):
                continue
            features, weight_mib = layer.features, gm.meta["weight_bytes"] >> 20
            kind = _kind_key(device, _layer_kind(features, gm.meta["block_size"], counts[features], weight_mib))
            if kind not in chosen:
                continue
            name = phased_name(_rules(chosen[kind], layer.backend))
            if name != layer.backend:
                layers[i] = dataclasses.replace(layer, backend=name, why=f"tuned; {layer.why}")
                names[layer.layer_idx] = name
        if not names:
            return
        for node in gm.graph.nodes:
            paged = node.op == "call_function" and node.target is torch.ops.compiled_llm.paged_attention.default
            if paged and node.args[8] in names:  # layer_idx
                node.args = (*node.args[:-1], names[node.args[8]])
        gm.recompile()

    # -- the runner interface (autotune.tuner.OpTuning) ----------------------------------------------------------

    def candidates(self, bucket: dict) -> list[Candidate]:
        features = _features(bucket)
        usable = []
        on_cuda = self._device.type == "cuda"
        for name in AUTO_ORDER:
            backend = registered_attention_backend(name)
            if backend is None or self._device.type not in backend.devices or backend.unsupported(features):
                continue
            if name == "reference" and not self.reference_is_a_candidate:
                continue  # it syncs with the host every call, and on a CPU sdpa is faster
            if on_cuda and bucket["phase"] == "decode" and not backend.cuda_graph_safe:
                continue  # decode steps replay CUDA graphs
            usable.append(name)
        heuristic = None  # Triton's own split count (not one an earlier tuning installed for the shape)
        if bucket["phase"] == "decode":
            heuristic = triton_backend.heuristic_decode_splits(bucket["batch"], bucket["heads"], bucket["kv_heads"],
                                                               bucket["head_dim"], self._device)  # fmt: skip
        found = []
        for name in usable:
            host_us = None
            if get_attention_backend(name).make_planner is not None:
                host_us = functools.partial(self._plan_us, name, bucket)
            run = functools.partial(self._run, name, bucket, splits=heuristic if name == "triton" else None)
            # Prefill steps are never replayed from a CUDA graph: they are timed with their launches.
            capturable = bucket["phase"] == "decode" and get_attention_backend(name).cuda_graph_safe
            found.append(Candidate(name, run, _backend_source(name), capturable=capturable, host_us=host_us))
        if "triton" in usable and heuristic is not None:
            for name, config in triton_decode_tuning.variants(bucket, heuristic, self._device):
                run = functools.partial(self._run, "triton", bucket, splits=config.get("splits", heuristic),
                                        launch=config.get("launch"))  # fmt: skip
                found.append(Candidate(name, run, _backend_source("triton"), config))
        return found

    def heuristic(self, bucket: dict) -> str:
        return self.candidates(bucket)[0].name  # what `auto` picks: the first of AUTO_ORDER that runs the layer

    def inputs(self, bucket: dict, dtype: torch.dtype, copies: int) -> list[tuple]:
        """Input sets that share one step (block table, lengths: one plan serves them all), each with its own
        queries and KV cache."""
        self._planners.clear()  # the last bucket's (a FlashInfer planner holds a 256 MiB workspace)
        features, dtype = _features(bucket), getattr(torch, bucket["dtype"])
        block = bucket["block"]
        if bucket["phase"] == "decode":
            new = [1] * bucket["batch"]
            lengths = [bucket["context"] + 1] * bucket["batch"]
        else:
            new = [bucket["chunk"]] * bucket["seqs"]
            lengths = list(new)
        width = math.ceil(max(lengths) / block)
        num_blocks = 1 + len(lengths) * width
        planes = 1 if features.values_in_keys else 2
        cache_shape = (num_blocks, planes, block, features.num_kv_heads, features.head_dim)
        table = (1 + torch.arange(len(lengths) * width, dtype=torch.int32)).view(len(lengths), width)
        query_start_loc = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
        seq_lens = torch.tensor(lengths, dtype=torch.int32)
        slots = [int(table[s, p // block]) * block + p % block for s in range(len(lengths))
                 for p in range(lengths[s] - new[s], lengths[s])]  # fmt: skip
        metadata = StepAttentionMetadata(table, query_start_loc, seq_lens, block, width, bucket["phase"] == "decode")
        device = self._device
        step = (torch.tensor(slots, device=device), table.to(device), query_start_loc.to(device), seq_lens.to(device))
        tokens = len(slots)
        cache_bytes = math.prod(cache_shape) * features.cache_dtype.itemsize
        sinks = torch.randn(features.num_q_heads, device=device) if features.has_sinks else None
        layer = (0, features.scale, features.sliding_window, features.softcap, sinks)  # layer_idx 0: the planner's
        sets = []
        for _ in range(input_copies(cache_bytes)):
            q = torch.randn(tokens, features.num_q_heads, features.head_dim, device=device, dtype=dtype)
            k = torch.randn(tokens, features.num_kv_heads, features.head_dim, device=device, dtype=dtype)
            v = k if features.values_in_keys else torch.randn_like(k)
            cache = torch.randn(cache_shape, device=device, dtype=dtype).to(features.cache_dtype)
            # Its one-launch split counters now: made inside the timer's CUDA-graph capture, they would not exist and
            # the launch would merge in a second kernel
            triton_backend.merge_counters(cache, 0)
            sets.append((q, k, v, cache, *step, metadata, layer))
        return sets

    def reference(self, q, k, v, cache, slots, table, query_start_loc, seq_lens, metadata, layer) -> torch.Tensor:
        out = torch.empty_like(q)
        get_attention_backend("reference").run(out, q, k, v, cache, slots, table, query_start_loc, seq_lens, *layer)
        return out

    def tolerance(self, dtype: torch.dtype) -> tuple[float, float]:
        return 2.0**-6, 2.0**-6  # softmax-weighted sums rounded to the output dtype, in kernels' own order

    # -- candidates ---------------------------------------------------------------------------------------------

    def _planned(self, name: str, bucket: dict, metadata: StepAttentionMetadata) -> dict:
        """{name: its planner, planned for `metadata`} (made and planned once per input sets), or {}."""
        make_planner = get_attention_backend(name).make_planner
        if make_planner is None:
            return {}
        key = (name, id(metadata))
        if key not in self._planners:
            planner = make_planner({0: _features(bucket)}, bucket["block"], self._device)
            planner.plan(metadata, cuda_graph_key=("autotune", bucket["batch"]) if metadata.is_decode else None)
            self._planners[key] = planner
        return {name: self._planners[key]}

    def _run(self, name: str, bucket: dict, q, k, v, cache, slots, table, query_start_loc, seq_lens, metadata, layer,
             splits: int | None = None, launch: dict | None = None):  # fmt: skip
        out = torch.empty_like(q)
        if splits is not None:  # Triton's decode at this count and launch (the default's), never what is installed
            num_tokens, num_heads, head_dim = q.shape
            one_warp = triton_backend.decode_one_warp(num_tokens, num_heads, cache.shape[3], head_dim, splits, q.device)
            launch = launch or triton_backend.default_decode_launch(cache.dtype, splits, one_warp)
            triton_backend.triton_paged_attention(out, q, k, v, cache, slots, table, query_start_loc, seq_lens, *layer,
                                                  splits=splits, launch=launch)  # fmt: skip
            return out
        with planned_step(self._planned(name, bucket, metadata)):
            get_attention_backend(name).run(out, q, k, v, cache, slots, table, query_start_loc, seq_lens, *layer)
        return out

    def _plan_us(self, name: str, bucket: dict, input_sets) -> float:
        """The part of a step's plan() on the host that the step's GPU work cannot hide, shared by the kind's layers:
        microseconds per layer. The host plans step n + 1 while the GPU runs step n, which takes at least the time
        of reading the weights (at the GPU's copy bandwidth): a large model's planning costs nothing, a small one's
        the time it runs past that (on a CPU, all of it)."""
        metadata = input_sets[0][8]
        planner = self._planned(name, bucket, metadata)[name]
        key = ("autotune", bucket["batch"]) if metadata.is_decode else None
        times = []
        for _ in range(10):
            start = time.perf_counter()
            planner.plan(metadata, cuda_graph_key=key)
            times.append(time.perf_counter() - start)
        read_bandwidth = None  # on a CPU the host runs the step itself: nothing hides the planning
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            read_bandwidth = _copy_bandwidth(device_index(self._device))
        return unhidden_host_us(statistics.median(times), bucket["weight_mib"] << 20, read_bandwidth, bucket["layers"])


def _take_nearest_tuned(chosen: dict[tuple, dict[tuple, str]], choices: list, device: torch.device) -> None:
    """Give each decode bucket of `choices` whose source is the heuristic the backend of the nearest tuned or
    cached batch size of its kind (the smaller of two as near), in `chosen` and in the choice (source "nearest")."""
    decode = [c for c in choices if c.bucket["phase"] == "decode"]
    for choice in decode:
        if choice.source != "heuristic":
            continue
        kind = {name: value for name, value in choice.bucket.items() if name not in STEP_KEYS}
        measured = [c for c in decode if c.source != "heuristic" and _kind_key(device, kind) ==
                    _kind_key(device, {n: v for n, v in c.bucket.items() if n not in STEP_KEYS})]  # fmt: skip
        if not measured:
            continue
        batch = choice.bucket["batch"]
        nearest = min(measured, key=lambda c: (abs(c.bucket["batch"] - batch), c.bucket["batch"]))
        backend = "triton" if nearest.winner.startswith("triton-") else nearest.winner
        chosen.setdefault(_kind_key(device, kind), {})[("decode", batch)] = backend
        choice.winner, choice.source = backend, "nearest"


def unhidden_host_us(host_s: float, weight_bytes: int, read_bandwidth: float | None, layers: int) -> float:
    """Microseconds a layer of a step's host time that the step's weight reads (at `read_bandwidth` bytes a second;
    None: nothing runs beside the host) do not hide."""
    hidden_s = weight_bytes / read_bandwidth if read_bandwidth else 0.0
    return max(0.0, host_s - hidden_s) * 1e6 / layers


@functools.cache
def _copy_bandwidth(index: int) -> float:
    """Bytes a second the GPU moves (its device-to-device copy bandwidth, reads and writes counted): the rate a step
    reads its weights at, as the bandwidth limits in BENCHMARKS.md take it."""
    from compiled_llm.bench.measure import copy_bandwidth  # here: compiled_llm imports custom_ops

    return copy_bandwidth(torch.device("cuda", index), nbytes=256 << 20)


def _count_kinds(layers) -> dict[LayerAttentionFeatures, int]:
    counts: dict[LayerAttentionFeatures, int] = {}
    for layer in layers:
        counts[layer.features] = counts.get(layer.features, 0) + 1
    return counts


def _rules(chosen: dict[tuple, str], fallback: str) -> list[PhaseRule]:
    """Phase rules from the choices of one kind: decode by batch size, runs of one backend merged, the largest
    size's backend for any larger batch; prefill's. A phase nothing was chosen for keeps `fallback`."""
    rules = []
    decode = sorted((batch, name) for (phase, batch), name in chosen.items() if phase == "decode")
    for i, (batch, name) in enumerate(decode):
        last = i == len(decode) - 1
        if last or decode[i + 1][1] != name:
            rules.append(PhaseRule("decode", None if last else batch, name))
    if not decode:
        rules.append(PhaseRule("decode", None, fallback))
    rules.append(PhaseRule("prefill", None, chosen.get(("prefill", 0), fallback)))
    return rules


register(PagedAttentionTuning())
