"""compiled-llm's CLI with module attributes set first, for A/B runs of a module constant that has no flag:

    SET='{"fx_passes.quantize_int4:FIT_GRIDS": false}' python benchmarks/cli_with_settings.py bench random:llama-3.1-8b ...

MARGIN=1 prints each self-check comparison's share of its bound (and its problem, if any) and never fails the check:
a diagnostic for a graph near its bound, never for a figure that is reported."""
import importlib
import json
import os
import sys

for key, value in json.loads(os.environ.get("SET", "{}")).items():
    module, attr = key.split(":")
    setattr(importlib.import_module(module), attr, value)
    print(f"SET {module}.{attr} = {value!r}", flush=True)
if os.environ.get("MARGIN"):
    from compiled_llm import verify

    original = verify._mismatch

    def _mismatch(actual, expected, tolerance, rms_bound=None, one_flip=False):
        share = verify.share_of_bound(actual, expected, tolerance, rms_bound, one_flip)
        problem = original(actual, expected, tolerance, rms_bound, one_flip)
        print(f"MARGIN share={share:.3f} problem={problem}", flush=True)  # and no problem: the check goes on

    verify._mismatch = _mismatch
from compiled_llm.cli import main

sys.exit(main(sys.argv[1:]))
