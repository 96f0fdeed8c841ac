"""Greedy decoding's argmax over the vocabulary (`argmax_rows`, triton_argmax.py): a function, not a
torch.library op."""

from custom_ops.argmax.triton_argmax import argmax_rows

__all__ = ["argmax_rows"]
