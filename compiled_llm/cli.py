"""`compiled-llm` command line: one entry point with subcommands.

    compiled-llm build MODEL [--max-batch-size 8 ...]   compile a model, print the compile report
    compiled-llm bench MODEL --mode latency ...          decode speed against HF baselines, same process
    compiled-llm bench MODEL --mode throughput ...       many requests through the engine against HF batches

MODEL is a local Hugging Face directory or a random-weight preset (`random:llama-3.1-8b`, ...).

Every `CompileConfig` field is a flag (`--max-seq-len 2048`, `--passes graph_cleanup,insert_paged_attention`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from compiled_llm.config import CompileConfig


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("compile config (CompileConfig fields)")
    for name, field in CompileConfig.model_fields.items():
        default = field.get_default(call_default_factory=True)
        help_text = f"{(field.description or '').split('.')[0]} (default: {default})"
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar="VALUE", help=help_text)


def _config_from_args(args: argparse.Namespace) -> CompileConfig:
    fields = {name: getattr(args, name) for name in CompileConfig.model_fields if getattr(args, name) is not None}
    if "passes" in fields:
        fields["passes"] = tuple(p.strip() for p in fields["passes"].split(",") if p.strip())
    return CompileConfig(**fields)


def _dtype(name: str | None):
    import torch

    if name is None:
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"--dtype must name a torch dtype (bfloat16, float16, float32), got {name!r}")
    return dtype


def build(args: argparse.Namespace) -> int:
    from compiled_llm.compiled_model import compile_model
    from compiled_llm.presets import load_model

    config = _config_from_args(args)
    cm = compile_model(load_model(args.model, _dtype(args.dtype)), config)
    print(cm.report)
    return 0


def bench(args: argparse.Namespace) -> int:
    from compiled_llm.bench.latency import format_table, run_latency_benchmark, write_json
    from compiled_llm.bench.throughput import format_throughput_table, run_throughput_benchmark
    from compiled_llm.presets import load_model

    if args.mode not in ("latency", "throughput"):
        raise ValueError(f"--mode {args.mode!r} is not available yet; available: latency, throughput")
    config = _config_from_args(args)
    default_baselines = "hf-eager,hf-compile" if args.mode == "latency" else "hf-eager"
    baselines = tuple(b for b in (args.baselines or default_baselines).split(",") if b and b != "none")
    model = load_model(args.model, _dtype(args.dtype))
    if args.mode == "throughput":
        tokenizer = None  # for text prompts of a dataset: the model directory's tokenizer, if it has one
        if args.dataset and any((Path(args.model) / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.model)
        result = run_throughput_benchmark(
            model, args.model, args.num_requests, args.input_len, args.output_len,
            baselines, config, args.dataset, tokenizer, args.baseline_batch_size, args.baseline_num_requests,
        )  # fmt: skip
        print(format_throughput_table(result))
        if args.json:
            write_json(result, args.json)
        return 0
    result = run_latency_benchmark(
        model, args.model, args.batch_size, args.input_len, args.output_len, baselines,
        repeats=args.repeats, config=config, profile=args.profile,
    )  # fmt: skip
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compiled-llm", description=__doc__.split("\n")[0])
    parser.add_argument("--log-level", default="WARNING", help="logging level (default: WARNING)")
    commands = parser.add_subparsers(dest="command", required=True)
    model_help = "local Hugging Face model directory, or random:NAME (llama-3.1-8b, qwen3-8b, smollm2-135m, tiny-llama)"
    build_parser = commands.add_parser("build", help="compile a model and print the compile report")
    build_parser.add_argument("model", help=model_help)
    build_parser.add_argument("--dtype", help="load the model in this dtype (default: the checkpoint's; presets: bfloat16)")
    _add_config_flags(build_parser)
    build_parser.set_defaults(run=build)

    bench_parser = commands.add_parser(
        "bench", help="measure speed against baselines in the same process",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    bench_parser.add_argument("model", help=model_help)
    bench_parser.add_argument("--mode", default="latency", choices=["latency", "throughput", "serving"])
    bench_parser.add_argument("--batch-size", type=int, default=1, help="latency: sequences per generate")
    bench_parser.add_argument("--num-requests", type=int, default=1000, help="throughput: requests submitted at once")
    bench_parser.add_argument("--dataset", help="throughput: JSONL of prompts ('prompt_token_ids' or 'prompt')")
    bench_parser.add_argument("--input-len", type=int, default=128)
    bench_parser.add_argument("--output-len", type=int, default=128)
    bench_parser.add_argument("--baselines", help="comma-separated, or none (default: latency hf-eager,hf-compile; "
                              "throughput hf-eager)")
    bench_parser.add_argument("--baseline-batch-size", type=int,
                              help="throughput: HF generate's static batch (default: --max-batch-size)")
    bench_parser.add_argument("--baseline-num-requests", type=int,
                              help="throughput: run the HF baseline on the first N requests only (default: all)")
    bench_parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    bench_parser.add_argument("--profile", action="store_true", help="add a kernel profile of decode steps")
    bench_parser.add_argument("--json", help="write the results to this file")
    bench_parser.add_argument("--dtype", help="model dtype (default: the checkpoint's; presets: bfloat16)")
    _add_config_flags(bench_parser)
    bench_parser.set_defaults(run=bench)

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except ValueError as error:  # bad input: one clear line, no traceback
        print(f"compiled-llm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
