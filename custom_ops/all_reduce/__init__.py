"""All-reduce ops: a row-parallel linear's sum over the ranks fused with what reads it (op.py), and the one-shot
all-reduce over symmetric memory that sums small messages in one kernel (one_shot.py)."""

from custom_ops.all_reduce import op  # noqa: F401  (registers the op)
