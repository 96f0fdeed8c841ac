"""shard_vocabulary: split the token embedding and the LM head over `tensor_parallel_size` ranks by vocabulary rows
(vocabulary parallelism): rank r keeps rows [r * V/n, (r + 1) * V/n) of each; the embedding's rows are summed over
the ranks, the LM head's logits gathered, so every rank ends with the unsharded values.

    x = embedding(E, ids)         # E [V, H]          inside = (ids >= r*V/n) & (ids < (r+1)*V/n)
                                                      x = embedding(E_r, where(inside, ids - r*V/n, 0))
                                                      x = where(unsqueeze(inside, -1), x, 0)    # other ranks' rows
                                               ->     x = wait_tensor(all_reduce(x, "sum", group))
    ...
    y = linear(h, W)              # W [V, H]          y = linear(h, W_r)                        # [.., V/n]
                                                      y = contiguous(permute(y, [-1, 0, ..]))   # [V/n, ..]
                                                      y = wait_tensor(all_gather_into_tensor(y, n, group))  # [V, ..]
                                                      y = contiguous(permute(y, [1, .., 0]))    # [.., V]

Exact by construction, whatever the model: each id's row lives on one rank, the others add zeros; a column-parallel
linear's output columns are the unsharded linear's, and all_gather concatenates the ranks' parts in rank order along
dim 0 (hence the vocabulary moved there and back). What reads the logits (Gemma's soft-cap, a final scaling) reads
them whole, as before. Tied embeddings (the embedding and the LM head read one parameter) are cut the same way, into
one shard both read.

Which nodes: every aten.embedding over a parameter of V rows, V the width of the graph's logits (a position embedding
stays whole), and the LM head, the last linear of the graph when its weight is a parameter of V rows (transformers'
plan calls it "colwise_gather_output" or "colwise_rep", or leaves it out). Others stay replicated, and the report says.

V not divisible by the ranks: each rank keeps ceil(V/n) rows, the last padded with zero rows (no id reaches them;
their logits are sliced off after the gather). One shard size keeps all_gather_into_tensor's equal parts and the
same graph shapes on every rank, where refusing would lose TP for a model with an odd vocabulary.

Runs after shard_tensor_parallel (which leaves the embedding's output and the LM head's input whole: a linear the
plan does not name that reads a split value is refused there) and before quantize_fp8 (which keeps the LM head, the
last linear, in the model's dtype, or quantizes its shard under quantize_lm_head).
"""

from __future__ import annotations

import logging

import torch
import torch.fx

from compiled_llm.parallel_ranks import parallel_rank
from fx_passes.node_meta import insert_call, insert_chain
from fx_passes.registry import PassResult, register_pass
from fx_passes.sharding import ALL_GATHER, LINEAR, WAIT, checkpoint_format, shard_attr, sum_over_ranks, use_shard

aten = torch.ops.aten
log = logging.getLogger("compiled_llm.passes")


class _VocabularySharder:
    def __init__(self, gm: torch.fx.GraphModule, rank: int, world: int, group: str):
        self.gm, self.graph, self.rank, self.world, self.group = gm, gm.graph, rank, world, group
        output = next(n for n in self.graph.nodes if n.op == "output")
        self.vocab = int(output.args[0][0].meta["val"].shape[-1])
        self.size = -(-self.vocab // world)  # ceil: the last rank's shard padded
        self.start = rank * self.size

    def vocab_rows(self, weight) -> bool:
        """Whether `weight` is a parameter with a row per token of the vocabulary, in the model's dtype (the copy
        would drop an FP8 or MXFP4 checkpoint's tensors: such a weight stays replicated)."""
        if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
            return False
        try:
            param = self.gm.get_parameter(weight.target)
        except AttributeError:  # a buffer
            return False
        return param.dim() >= 1 and param.shape[0] == self.vocab and checkpoint_format(param) is None

    def _use_shard(self, node: torch.fx.Node, weight: torch.fx.Node) -> None:
        use_shard(node, weight, shard_attr(self.gm, weight, 0, self.start, self.size, node))

    def embedding(self, node: torch.fx.Node) -> None:
        weight, ids = node.args[:2]
        users = list(node.users)
        graph = self.graph
        with graph.inserting_before(node):
            inside = insert_call(graph, aten.bitwise_and.Tensor, (insert_call(graph, aten.ge.Scalar, (ids, self.start)),
                                 insert_call(graph, aten.lt.Scalar, (ids, self.start + self.size))))  # fmt: skip
            local = insert_call(graph, aten.sub.Tensor, (ids, self.start))
            node.update_arg(1, insert_call(graph, aten.where.ScalarOther, (inside, local, 0)))
        self._use_shard(node, weight)
        with graph.inserting_after(node):
            mask = insert_call(graph, aten.unsqueeze.default, (inside, -1))
        with graph.inserting_after(mask):
            rows = insert_call(graph, aten.where.ScalarOther, (mask, node, 0.0))
        summed = sum_over_ranks(graph, rows, self.group)
        for user in users:
            user.replace_input_with(node, summed)

    def lm_head(self, node: torch.fx.Node) -> None:
        if len(node.args) > 2 and node.args[2] is not None:
            self._use_shard(node, node.args[2])  # the bias: its rows go with the weight's
        self._use_shard(node, node.args[1])
        val = node.meta["val"]
        node.meta["val"] = val.new_empty(*val.shape[:-1], self.size)
        last = val.dim() - 1
        users = list(node.users)
        graph = self.graph
        contiguous = {"memory_format": torch.contiguous_format}
        padded = self.size * self.world != self.vocab
        out = insert_chain(graph, node, [
            (aten.permute.default, (node, [last, *range(last)]), {}),  # [V/n, ..]
            (aten.clone.default, (None,), contiguous),
            (ALL_GATHER, (None, self.world, self.group), {}),  # [n * V/n, ..], rank 0's rows first
            (WAIT, (None,), {}),
            *([(aten.slice.Tensor, (None, 0, 0, self.vocab), {})] if padded else []),  # [V, ..]
            (aten.permute.default, (None, [*range(1, last + 1), 0]), {}),  # [.., V]
            (aten.clone.default, (None,), contiguous),
        ])  # fmt: skip
        for user in users:
            user.replace_input_with(node, out)


def shard(gm: torch.fx.GraphModule, rank: int, world: int, group: str) -> tuple[int, int]:
    """Shard `gm`'s vocabulary in place for `rank` of `world`; returns (embeddings, LM heads) rewritten."""
    sharder = _VocabularySharder(gm, rank, world, group)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    embeddings = [n for n in nodes if n.target is aten.embedding.default and sharder.vocab_rows(n.args[0])]
    linears = [n for n in nodes if n.target is LINEAR]
    heads = linears[-1:] if linears and sharder.vocab_rows(linears[-1].args[1]) else []
    for node in embeddings:
        sharder.embedding(node)
    for node in heads:
        sharder.lm_head(node)
    gm.recompile()
    return len(embeddings), len(heads)


@register_pass("shard_vocabulary")
def shard_vocabulary(gm: torch.fx.GraphModule, config) -> PassResult:
    if config.tensor_parallel_size == 1:
        return PassResult("shard_vocabulary", 0)
    rank, world = parallel_rank(config)
    import torch.distributed as dist

    embeddings, heads = shard(gm, rank, world, dist.group.WORLD.group_name)
    detail = (f"rank {rank} of {world}: {embeddings} embeddings (+{embeddings} all-reduces), {heads} LM heads "
              f"(+{heads} all-gathers) split by vocabulary rows")  # fmt: skip
    if not heads:
        detail += "; the last linear does not read a parameter of the vocabulary's rows: left replicated"
    if not embeddings:
        detail += "; no embedding reads a parameter of the vocabulary's rows: left replicated"
    log.info("shard_vocabulary: %s", detail)
    return PassResult("shard_vocabulary", embeddings + heads, detail)
