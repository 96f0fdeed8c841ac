"""A wrong quantization, for the tests that the self-check catches one: a pass that runs right after a quantizing pass
and multiplies one quantized linear's scale tensor by 1.1."""

from __future__ import annotations

from fx_passes import DEFAULT_PIPELINE, PassResult, register_pass, registered_passes


def pipeline_misscaling(op, scales_arg: int, after: str) -> tuple[str, ...]:
    """The default pipeline with a pass, right after `after`, that scales the tensor which the first call of `op`
    (a quantized linear's op overload) reads as its argument `scales_arg` 10% too large."""
    name = f"test_misscale_{op.name().replace('::', '_').replace('.', '_')}_{scales_arg}"
    if name not in registered_passes():

        @register_pass(name)
        def misscale(gm, config):
            target = next(n.args[scales_arg].target for n in gm.graph.nodes if n.target is op)
            getattr(gm, target).data *= 1.1
            return PassResult(name, 1)

    index = DEFAULT_PIPELINE.index(after) + 1
    return (*DEFAULT_PIPELINE[:index], name, *DEFAULT_PIPELINE[index:])
