"""Capture: an HF causal LM (or a module built from the same parts) -> one FX graph over flat tokens."""

from compiled_llm.capture.attention_routing import CaptureError, route_attention_to_canonical_op
from compiled_llm.capture.export import GRAPH_INPUTS, CapturedModel, capture_model, check_causal_lm, text_config

__all__ = [
    "GRAPH_INPUTS",
    "CaptureError",
    "CapturedModel",
    "capture_model",
    "check_causal_lm",
    "route_attention_to_canonical_op",
    "text_config",
]
