"""Capture a causal LM as one FX graph over a flat list of tokens.

    graph(input_ids[T], position_ids[T], logits_indices[N]) -> logits[N, vocab]

T tokens from any number of sequences, concatenated; only attention needs to know where sequences start,
and it learns that from the metadata that `insert_paged_attention` adds. Logits are computed only for the
N tokens that need them (hidden states are gathered before the LM head).
"""

from __future__ import annotations

import inspect
import logging
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx
from torch import nn

from compiled_llm.capture.attention_routing import CaptureError, route_attention_to_canonical_op
from compiled_llm.capture.expert_routing import route_experts_to_canonical_op
from compiled_llm.capture.grouped_routing import route_grouped_routers
from compiled_llm.capture.forward_signature import forward_signature, output_logits
from compiled_llm.capture.graph_cache import GraphCache, UndescribedValue, graph_key, why_uncacheable
from compiled_llm.capture.latent_attention import route_latent_attention
from compiled_llm.capture.module_state import check_caches_present, written_state
from fx_passes.match_sdpa_attention import CANONICAL_ATTENTION

GRAPH_INPUTS = ("input_ids", "position_ids", "logits_indices")

log = logging.getLogger("compiled_llm.capture")


@dataclass
class CapturedModel:
    gm: torch.fx.GraphModule  # plain positional signature: GRAPH_INPUTS, weights as its parameters
    architecture: str
    num_layers: int | None  # None for non-HF modules
    vocab_size: int
    logits_dtype: torch.dtype
    seconds: float
    source: str = "torch.export, flat tokens"  # or from the graph cache (graph_cache.py): what the report says
    cache_key: str | None = None  # the graph cache entry it came from, if it did


class FlatTokenForward(nn.Module):
    """Adapts a `[batch, seq]` causal LM to flat tokens: batch 1, explicit positions, selected logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.signature = forward_signature(model)
        self.selects_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def forward(self, input_ids, position_ids, logits_indices):  # [T], [T], [N] -> [N, V]
        if self.selects_logits:  # HF: gather hidden states before the LM head
            out = self.signature.call(self.model, input_ids, position_ids, use_cache=False, logits_to_keep=logits_indices)
            return out.logits[0]
        logits = output_logits(self.signature.call(self.model, input_ids, position_ids), self.model)
        if isinstance(logits.shape[1], int) and logits.shape[1] == 1:
            # Logits of the last position only, over T > 1 tokens (nanoGPT at inference): the
            # select_logits_rows pass makes the graph compute the rows logits_indices asks for instead.
            return logits[0]
        return logits[0, logits_indices]


def text_config(model: nn.Module):
    """The config that describes the decoder (the text config of multimodal models), or None."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def architecture_name(model: nn.Module) -> str:
    architectures = getattr(getattr(model, "config", None), "architectures", None)
    return architectures[0] if architectures else type(model).__name__


def check_causal_lm(model: nn.Module) -> None:
    """Raise ValueError unless `model` is a decoder-only causal LM we can call with flat tokens."""
    name = type(model).__name__
    try:
        from transformers import PreTrainedModel
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - transformers is a dependency
        PreTrainedModel, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES = (), {}
    if isinstance(model, PreTrainedModel):
        causal_lm_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        if getattr(model.config, "is_encoder_decoder", False) or (
            name not in causal_lm_classes and not name.endswith("ForCausalLM")
        ):
            raise ValueError(
                f"{name} is not a causal language model: compile_model needs a decoder-only *ForCausalLM "
                "model (e.g. AutoModelForCausalLM.from_pretrained(...))"
            )
        return
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module causal LM, got {type(model).__name__}")
    forward_signature(model)


def _culprit(error: BaseException) -> str:
    """The innermost model module (and source line) the traceback passes through."""
    for frame, lineno in reversed(list(traceback.walk_tb(error.__traceback__))):
        module = frame.f_locals.get("self")
        if isinstance(module, nn.Module) and not isinstance(module, (FlatTokenForward, torch.fx.GraphModule)):
            where = f"{Path(frame.f_code.co_filename).name}:{lineno}"
            return f"{type(module).__name__}.{frame.f_code.co_name} ({where})"
    return "the model's forward"


def _plain_graph_module(exported: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A plain GraphModule over the exported graph, without export's pytree wrapping, input-checking
    hooks and guard module: passes add inputs, and the runner calls it positionally."""
    graph = exported.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    graph._codegen = torch.fx.graph.CodeGen()
    return torch.fx.GraphModule(exported, graph)  # shares the model's parameters, copies nothing


def _export_to_the_modules_bound(flat: FlatTokenForward, example: tuple, arch: str) -> torch.export.ExportedProgram:
    auto = torch.export.Dim.AUTO
    program = torch.export.export(flat, example, dynamic_shapes=({0: auto}, {0: auto}, {0: auto}), strict=False)
    token_count = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "input_ids").meta["val"]
    if not isinstance(token_count.shape[0], torch.SymInt):
        raise CaptureError(f"cannot capture {arch}: its forward works for {token_count.shape[0]} tokens only")
    bound = program.range_constraints.get(token_count.shape[0].node.expr)
    log.info("%s bounds a forward to %s tokens: the runtime bounds each sequence instead", arch, bound)
    return program


def capture_model(model: nn.Module, max_num_tokens: int = 8192, graph_cache: GraphCache | None = None) -> CapturedModel:
    """Export `model` (a causal LM) into one aten-level FX graph with flat, dynamic token inputs; with a
    `graph_cache`, load the graph an earlier capture of the same code and config stored instead (graph_cache.py)."""
    check_causal_lm(model)
    check_caches_present(model)
    arch = architecture_name(model)
    start = time.perf_counter()
    flat = FlatTokenForward(model)
    program, key, source = None, None, "torch.export, flat tokens"
    if graph_cache is not None:
        why = why_uncacheable(model)
        if why is None:
            try:
                key = graph_key(model, max_num_tokens)
            except Exception as error:  # noqa: BLE001  (a value it cannot describe, a config that will not serialize)
                why = str(error) if isinstance(error, UndescribedValue) else f"no key ({type(error).__name__}: {error})"
        if why is None and graph_cache.unreadable:
            source = f"{source} (graph cache not read: {graph_cache.unreadable})"
        elif why is None:
            program = graph_cache.load(key, flat)
            if program is not None:
                source = "from the graph cache (no torch.export)"
        else:
            source = f"{source} (no graph cache: {why})"
    if program is None:
        program = _export(model, flat, arch, max_num_tokens)
        described = {"architecture": arch, "max_num_tokens": max_num_tokens}
        if key is not None and graph_cache.store(key, program, described):
            source += " (stored in the graph cache)"
    captured = _captured(program, model, arch, time.perf_counter() - start, source)
    captured.cache_key = key if source.startswith("from the graph cache") else None
    return captured


def _export(model: nn.Module, flat: FlatTokenForward, arch: str, max_num_tokens: int) -> torch.export.ExportedProgram:
    device = next(model.parameters()).device
    tokens = torch.export.Dim("tokens", min=1, max=max_num_tokens)
    num_logits = torch.export.Dim("num_logits", min=1, max=max_num_tokens)
    # 3 tokens, 2 logits: sizes 0 and 1 would be specialized by export.
    example = (torch.tensor([1, 2, 3], device=device), torch.arange(3, device=device), torch.tensor([1, 2], device=device))
    was_training = model.training
    model.eval()
    try:
        with route_attention_to_canonical_op(model), route_latent_attention(model), route_experts_to_canonical_op(model), \
                route_grouped_routers(model), torch.no_grad(), warnings.catch_warnings():
            # Tensors a forward assigns to itself (Meta's `self.cache_k = self.cache_k.to(xq)`) are state the
            # passes handle (module_kv_cache) or refuse (written_state), not something to register as buffers.
            warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
            try:
                program = torch.export.export(
                    flat, example, dynamic_shapes=({0: tokens}, {0: tokens}, {0: num_logits}), strict=False
                )
            except torch._dynamo.exc.UserError as error:
                if "Constraints violated" not in str(error):
                    raise
                # The forward bounds its sequence length (nanoGPT asserts t <= block_size; a position table has
                # that many rows). A step's tokens are not one sequence: export to the bound, and bound the
                # sequences instead (runtime_positions records the tables; the self-check holds the result).
                program = _export_to_the_modules_bound(flat, example, arch)
    except CaptureError as error:
        raise CaptureError(f"cannot capture {arch}: {error}") from error
    except Exception as error:  # torch.export reports many kinds; name the module that failed
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CaptureError(
            f"cannot capture {arch}: torch.export failed in {_culprit(error)}: {type(error).__name__}: {first_line}"
        ) from error
    finally:
        model.train(was_training)
    return program


def _captured(program: torch.export.ExportedProgram, model: nn.Module, arch: str, seconds: float,
              source: str) -> CapturedModel:  # fmt: skip
    gm = _plain_graph_module(program.module())
    # State the forward keeps between calls: the module_kv_cache pass replaces a KV cache it recognises;
    # insert_paged_attention refuses what is left.
    gm.meta["written_state"] = written_state(gm)
    sites = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is CANONICAL_ATTENTION)
    num_layers = getattr(text_config(model), "num_hidden_layers", None)
    if num_layers is not None and sites != num_layers:
        raise CaptureError(
            f"cannot capture {arch}: found {sites} attention calls for {num_layers} layers; its attention does not "
            "go through transformers' AttentionInterface"
        )
    output = next(iter(n for n in gm.graph.nodes if n.op == "output")).args[0][0]
    logits = output.meta["val"]
    num_logits = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "logits_indices").meta["val"]
    # One row whatever logits_indices asks for: the module computes its last position only (see forward).
    gm.meta["last_position_only"] = str(logits.shape[0]) != str(num_logits.shape[0])
    # transformers' tensor-parallel plan ("model.layers.*.self_attn.q_proj" -> "colwise"), by the graph's attribute
    # names (FlatTokenForward holds the model as `model`): what shard_tensor_parallel shards by.
    gm.meta["tp_plan"] = {f"model.{name}": style for name, style in (getattr(model, "tp_plan", None) or {}).items()}
    return CapturedModel(gm, arch, num_layers, int(logits.shape[-1]), logits.dtype, seconds, source)
