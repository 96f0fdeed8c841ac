"""insert_paged_attention: swap each canonical attention op for the paged-KV attention op.

    o = compiled_llm.attention(q, k, v, layer, scale, window, softcap, sinks)
    ->
    o = compiled_llm.paged_attention(q, k, v, kv_cache_<layer>, slot_mapping, block_table,
                                     query_start_loc, seq_lens, layer, scale, window, softcap, sinks, backend)

A layer whose values are its keys (`v` is `k`: multi-head latent attention in its absorbed form,
compiled_llm/capture/latent_attention.py) gets a cache of one plane; any other pair of widths, one of two planes.

The KV cache of each layer and the step's attention metadata become graph inputs (placeholders named as
above, in `PAGED_INPUTS` order, then one `kv_cache_<layer>` per layer). The backend of each layer is
chosen here, once, and recorded in the graph and in `gm.meta["paged_attention"]`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx

import custom_ops  # noqa: F401  (registers torch.ops.compiled_llm)
from custom_ops import LayerAttentionFeatures, select_attention_backend
from fx_passes.causal_mask import user_line
from fx_passes.match_sdpa_attention import CANONICAL_ATTENTION, SDPA, sdpa_arguments, unsupported_sdpa_reason
from fx_passes.node_match import calls
from fx_passes.node_meta import insert_call
from fx_passes.registry import PassResult, register_pass

PAGED_ATTENTION = torch.ops.compiled_llm.paged_attention.default
aten = torch.ops.aten

# Per-step attention metadata, as graph inputs (see custom_ops/attention/paged.py for their meaning).
PAGED_INPUTS = ("slot_mapping", "block_table", "query_start_loc", "seq_lens")


@dataclass(frozen=True)
class PagedLayer:
    """One paged attention layer: what its KV cache holds and which backend runs it."""

    layer_idx: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype  # of its KV cache
    features: LayerAttentionFeatures
    backend: str
    why: str

    @property
    def cache_input(self) -> str:
        return f"kv_cache_{self.layer_idx}"

    @property
    def kv_planes(self) -> int:
        """Tensors a token keeps in the cache: keys and values, or the keys alone where they are the values."""
        return 1 if self.features.values_in_keys else 2


KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn}  # CompileConfig.kv_cache_dtype -> dtype; "auto": the keys' dtype


def _features(node: torch.fx.Node, kv_cache_dtype: str) -> LayerAttentionFeatures:
    q, k, v = (arg.meta["val"] for arg in node.args[:3])
    _, _, _, _, scale, window, softcap, sinks = node.args
    return LayerAttentionFeatures(
        head_dim=max(int(k.shape[-1]), int(v.shape[-1])),  # the narrower of k and v is padded to it (_pad_head_dims)
        num_q_heads=int(q.shape[1]),
        num_kv_heads=int(k.shape[1]),
        scale=float(scale),
        sliding_window=int(window),
        softcap=float(softcap),
        has_sinks=sinks is not None,
        dtype=k.dtype,
        cache_dtype=KV_CACHE_DTYPES.get(kv_cache_dtype, k.dtype),
        values_in_keys=node.args[2] is node.args[1],
    )


def _add_placeholders(graph: torch.fx.Graph, names: list[str]) -> dict[str, torch.fx.Node]:
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    added = {}
    with graph.inserting_after(last):
        for name in reversed(names):  # each insert lands right after `last`
            added[name] = graph.placeholder(name)
    return added


@register_pass("insert_paged_attention")
def insert_paged_attention(gm: torch.fx.GraphModule, config) -> PassResult:
    graph = gm.graph
    written = [name.removeprefix("model.") for name in gm.meta.get("written_state", ())]
    if written:
        raise ValueError(
            f"the module's forward writes buffers {written}: state kept between calls (a KV cache other than "
            "gpt-fast's index_put at the positions, a recurrent state) that the paged runtime cannot keep per "
            "sequence; give it a forward that computes from the token ids and positions alone"
        )
    sites = calls(graph, CANONICAL_ATTENTION)
    leftover_sdpa = [
        f"{n.name}: {unsupported_sdpa_reason(sdpa_arguments(n)) or 'not matched'} ({user_line(n)})" for n in calls(graph, SDPA)
    ]
    if leftover_sdpa:
        raise ValueError(
            f"the graph still has scaled_dot_product_attention calls the paged cache cannot serve: "
            f"{'; '.join(leftover_sdpa)} (only causal SDPA without an explicit mask or dropout is supported)"
        )
    if not sites:
        raise ValueError("found no attention op to page: the captured graph has no compiled_llm.attention call")
    repeated = [layer for layer, count in Counter(n.args[3] for n in sites).items() if count > 1]
    if repeated:
        raise ValueError(f"layer indices {repeated} have several attention calls; each layer needs its own KV cache")

    device_type = sites[0].args[0].meta["val"].device.type
    layers = []
    for node in sites:
        features = _features(node, config.kv_cache_dtype)
        backend, why = select_attention_backend(config.attention_backend, device_type, features)
        cache = (features.num_kv_heads, features.head_dim, features.cache_dtype)
        layers.append(PagedLayer(node.args[3], *cache, features, backend, why))

    inputs = _add_placeholders(graph, [*PAGED_INPUTS, *(layer.cache_input for layer in layers)])
    padded = 0
    for node, layer in zip(sites, layers):
        q, k, v, layer_idx, scale, window, softcap, sinks = node.args
        with graph.inserting_before(node):
            q, k, v, value_dim = _pad_head_dims(graph, q, k, v)  # nothing to pad where v is k
            paged = graph.call_function(
                PAGED_ATTENTION,
                (q, k, v, inputs[layer.cache_input], *(inputs[name] for name in PAGED_INPUTS),
                 layer_idx, scale, window, softcap, sinks, layer.backend),
            )  # fmt: skip
            paged.meta["val"] = v.meta["val"].new_empty(*node.meta["val"].shape[:-1], v.meta["val"].shape[-1])
            out = paged
            if value_dim != layer.head_dim:  # the padded value columns: zeros, sliced off
                out = insert_call(graph, aten.slice.Tensor, (paged, -1, 0, value_dim))
                padded += 1
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    gm.meta["paged_attention"] = layers
    backends = Counter(layer.backend for layer in layers)
    detail = ", ".join(f"{b}: {n} layers" for b, n in backends.items())
    if padded:
        detail += f"; {padded} layers' narrower keys or values zero-padded to one head width in the cache"
    one_plane = sum(layer.kv_planes == 1 for layer in layers)
    if one_plane:
        detail += f"; {one_plane} layers' values are their keys (latent attention): one cache plane"
    return PassResult("insert_paged_attention", len(sites), detail)


def _pad_head_dims(graph: torch.fx.Graph, q, k, v) -> tuple:
    """(q, k, v, the value width) with the narrower of k and v zero-padded to the wider (q with k): the cache holds
    both in one tensor. Zero columns add nothing to q.k (the scale is the op's argument, not the width's) and give
    zero output columns. DeepSeek's multi-head latent attention, expanded: keys 192 wide, values 128."""
    key_dim, value_dim = k.meta["val"].shape[-1], v.meta["val"].shape[-1]
    width = max(key_dim, value_dim)
    if key_dim < width:
        q, k = (insert_call(graph, aten.constant_pad_nd.default, (x, [0, width - key_dim])) for x in (q, k))
    if value_dim < width:
        v = insert_call(graph, aten.constant_pad_nd.default, (v, [0, width - value_dim]))
    return q, k, v, value_dim
