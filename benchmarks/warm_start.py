"""Warm start (issue 23): seconds from the `LLM(model)` call to the first generated token, each start in a fresh
process, the model's weights created before the clock starts. Run 1 starts with an empty cache_dir (cold), and
the later runs read what it stored: the captured graph, Inductor's and Triton's code, the kernel choices.

    python benchmarks/warm_start.py random:llama-3.1-8b [--runs 3] [--json out.json] [--fields '{"max_batch_size": 8}']

Each run prints the compile report's stage times (capture, passes, autotune, compile, CUDA graphs) beside the
total. `--cache-dir` defaults to a new temporary directory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = """
import json, sys, time
import torch
from compiled_llm import LLM, SamplingParams
from compiled_llm.model_source import load_model

source, cache_dir, fields, dtype = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), getattr(torch, sys.argv[4])
loaded = load_model(source, dtype)  # the weights: not counted
if torch.cuda.is_available():
    torch.cuda.synchronize()
start = time.perf_counter()
llm = LLM(loaded.model, tokenizer=loaded.tokenizer, cache_dir=cache_dir, **fields)
first = llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
total = time.perf_counter() - start
report = llm.compiled.report
print("RESULT " + json.dumps({"first_token_s": total, "stages_s": report.timings, "capture": report.capture,
                               "tokens": first[0].outputs[0].token_ids}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--json")
    parser.add_argument("--fields", default="{}", help="CompileConfig fields as a JSON object")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="compiled_llm_warm_start_")
    results = []
    for run in range(args.runs):
        out = subprocess.run([sys.executable, "-c", CHILD, args.model, cache_dir, args.fields, args.dtype], capture_output=True,
                             text=True)  # fmt: skip
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"run {run + 1} failed:\n{out.stderr[-4000:]}")
        result = json.loads(line.removeprefix("RESULT "))
        result["run"] = "cold" if run == 0 and args.cache_dir is None else f"warm {run}"
        results.append(result)
        stages = ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in result["stages_s"].items())
        print(f"{result['run']:>7}: first token after {result['first_token_s']:.2f} s ({stages}; {result['capture']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "cache_dir": cache_dir, "runs": results}, f, indent=2)


if __name__ == "__main__":
    main()
