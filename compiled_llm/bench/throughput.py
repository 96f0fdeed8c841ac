"""`compiled-llm bench --mode throughput`: many requests submitted at once, run to completion by the
engine (continuous batching), against HF `generate` in static batches on the same prompts, in one process.

Every request generates exactly `output_len` tokens (EOS ignored), so both systems do the same work (the
baseline may run on the first requests only, in batches of another size: rates compare, not totals). Over several
ranks (`tensor_parallel_size` / `expert_parallel_size`), this process is rank 0 of an `LLM` that starts the others
(rank_workers.py) from the model's name; there is no baseline then, and the ceilings count every rank's GPU.
Reported: output tokens/s, total (prompt + output) tokens/s, requests/s, and percentiles of time to first
token (from submission) and of inter-token latency (per request: (finish - first token) / (tokens - 1)).
"""

from __future__ import annotations

import gc
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from compiled_llm.bench.ceilings import embedding_rows_on_a_rank, measured_gemm_flops, throughput_ceilings
from compiled_llm.bench.measure import check_baselines, copy_bandwidth, synchronize
from compiled_llm.config import CompileConfig

log = logging.getLogger("compiled_llm")

BASELINES = ("hf-eager",)
PERCENTILES = (50, 90, 99)
# The engine's limits where neither the caller nor a --config file sets them: CompileConfig's defaults (64 sequences,
# 8,192 tokens a step) are a latency setting, and a throughput figure is taken at the batch a serving deployment
# would run. On an H200, FP8 Llama-3.1-8B at 128/128 gave 13,150 output tok/s at the defaults (1,000 requests) and
# 25,814 at these (3,000 requests; BENCHMARKS.md, session 38). The KV cache stays sized by the GPU's free memory.
THROUGHPUT_LIMITS = {"max_batch_size": 512, "max_num_tokens": 16384}


def load_prompts(num_requests: int, input_len: int, vocab_size: int, dataset: str | None = None,
                 tokenizer=None, seed: int = 0) -> list[list[int]]:  # fmt: skip
    """`num_requests` prompts: random tokens of `input_len` (from `seed`), or the first lines of a JSONL file
    with `prompt_token_ids` (a list of ids) or `prompt` (text, needs the model's tokenizer)."""
    if dataset is None:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(3, vocab_size, (num_requests, input_len), generator=generator).tolist()
    prompts = []
    with Path(dataset).open() as lines:
        for number, line in enumerate(lines, 1):
            if len(prompts) == num_requests:
                break
            if not line.strip():
                continue
            record = json.loads(line)
            if "prompt_token_ids" in record:
                prompts.append([int(t) for t in record["prompt_token_ids"]])
            elif "prompt" in record and tokenizer is not None:
                prompts.append(tokenizer(record["prompt"])["input_ids"])
            else:
                raise ValueError(
                    f"{dataset}:{number}: each line needs 'prompt_token_ids', or 'prompt' with a model directory "
                    "that has a tokenizer"
                )
    if len(prompts) < num_requests:
        raise ValueError(f"{dataset} has {len(prompts)} prompts, fewer than --num-requests {num_requests}")
    return prompts


def _percentiles(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {f"p{p}": values[0] if values else float("nan") for p in PERCENTILES}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {f"p{p}": cuts[p - 1] for p in PERCENTILES}


def _run_engine(llm, prompts: list[list[int]], output_len: int) -> dict:
    from compiled_llm.engine import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    engine = llm.engine
    synchronize(llm.compiled.device)
    start = time.time()
    requests = [engine.add_request(p, params) for p in prompts]
    while engine.has_work:
        engine.step()
    synchronize(llm.compiled.device)
    elapsed = time.time() - start
    outputs = sum(len(r.output_token_ids) for r in requests)
    ttft = [r.first_token_time - start for r in requests]
    itl = [(r.finish_time - r.first_token_time) / (len(r.output_token_ids) - 1) for r in requests if output_len > 1]
    return {
        "system": "compiled-llm",
        "elapsed_s": elapsed,
        "output_tokens": outputs,
        "output_tokens_per_s": outputs / elapsed,
        "total_tokens_per_s": (outputs + sum(map(len, prompts))) / elapsed,
        "requests_per_s": len(prompts) / elapsed,
        "ttft_s": _percentiles(ttft),
        "itl_s": _percentiles(itl),
        "preemptions": engine.scheduler.num_preemptions,
        "prefix_cache_hit_tokens": engine.scheduler.pool.hit_tokens,
    }


def _run_hf_eager(model, prompts: list[list[int]], output_len: int, batch_size: int) -> dict:
    """HF `generate` over the prompts in static batches (left-padded to the batch's longest prompt)."""
    device = next(model.parameters()).device
    synchronize(device)
    start = time.time()
    outputs = 0
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first : first + batch_size]
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(batch):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        with torch.no_grad():
            out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=output_len,
                                 min_new_tokens=output_len, do_sample=False, pad_token_id=0)  # fmt: skip
        outputs += (out.shape[1] - width) * len(batch)
    synchronize(device)
    elapsed = time.time() - start
    return {
        "system": "hf-eager",
        "batch_size": batch_size,
        "num_requests": len(prompts),
        "elapsed_s": elapsed,
        "output_tokens": outputs,
        "output_tokens_per_s": outputs / elapsed,
        "total_tokens_per_s": (outputs + sum(map(len, prompts))) / elapsed,
        "requests_per_s": len(prompts) / elapsed,
    }


def throughput_config(config: CompileConfig, num_requests: int) -> CompileConfig:
    """`config` with THROUGHPUT_LIMITS for the fields it leaves at their defaults (never lower than those, never more
    sequences than requests or KV blocks), logged."""
    unset = {name: value for name, value in THROUGHPUT_LIMITS.items() if name not in config.model_fields_set}
    if "max_num_tokens" in unset:
        unset["max_num_tokens"] = max(config.max_num_tokens, unset["max_num_tokens"])
    if "max_batch_size" in unset:
        cap = min(unset["max_batch_size"], num_requests, unset.get("max_num_tokens", config.max_num_tokens),
                  config.num_kv_blocks or num_requests)  # fmt: skip
        unset["max_batch_size"] = max(config.max_batch_size, cap)
    if not unset:
        return config
    log.info("throughput: %s (the engine's limits for a throughput run; set them to override)",
             ", ".join(f"{name}={value}" for name, value in unset.items()))  # fmt: skip
    return CompileConfig(**(config.model_dump() | unset))


def run_throughput_benchmark(
    model,
    model_name: str,
    num_requests: int,
    input_len: int,
    output_len: int,
    baselines: tuple[str, ...] = BASELINES,
    config: CompileConfig | None = None,
    dataset: str | None = None,
    tokenizer=None,
    baseline_batch_size: int | None = None,
    baseline_num_requests: int | None = None,
    dtype: torch.dtype | None = None,
) -> dict:
    """`model`: the model, or over several ranks its name (what each rank loads: `model_source.load_model`)."""
    from compiled_llm.llm import LLM

    config = config or CompileConfig()
    # HF's static batch stays at the caller's limit: at 512 sequences its whole-length KV cache may not fit the GPU
    baseline_batch_size = baseline_batch_size or config.max_batch_size
    config = throughput_config(config, num_requests)
    ranks = config.parallel_ranks
    check_baselines(baselines, BASELINES, "throughput", ranks)
    if num_requests < 1 or input_len < 1 or output_len < 1:
        raise ValueError("num_requests, input_len and output_len must be >= 1")
    if (baseline_batch_size or 1) < 1 or (baseline_num_requests or 1) < 1:
        raise ValueError("baseline_batch_size and baseline_num_requests must be >= 1")
    start = time.perf_counter()
    llm = (
        LLM(model, tokenizer, dtype, **config.model_dump())
        if isinstance(model, str)
        else LLM(model, **config.model_dump())
    )
    compile_s = time.perf_counter() - start
    model, device = llm.model, llm.compiled.device  # rank 0's (its parameters may be on meta: checkpoint_slices.py)
    prompts = load_prompts(num_requests, input_len, model.config.vocab_size, dataset, tokenizer or llm.tokenizer)
    # Warm-up on reversed prompts: the same shapes, none of the measured prompts' blocks in the prefix cache.
    _run_engine(llm, [p[::-1] for p in prompts[: config.max_batch_size]], min(output_len, 4))
    results = [{**_run_engine(llm, prompts, output_len), "compile_s": compile_s}]
    cache = llm.compiled.runner.kv_cache
    weight_bytes, kv_bytes_per_token = llm.compiled.report.weight_bytes, cache.bytes_per_block(cache.layers, 1)
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings()
    if head is None or head.weight is not embedding:  # a step reads the batch's rows of it only (a rank: of its share)
        rows = embedding_rows_on_a_rank(embedding, config)
        weight_bytes -= max(0, rows - config.max_batch_size) * embedding.shape[1] * embedding.element_size()
    fp8 = llm.compiled.config.quantization.startswith("fp8")  # "auto" resolved from the checkpoint by now
    llm.close()  # the other ranks, if it started them
    del llm  # its KV cache takes most of the free memory: give it to the baseline
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if "hf-eager" in baselines:
        _run_hf_eager(model, prompts[:1], min(output_len, 4), 1)  # warm-up
        subset = prompts[:baseline_num_requests] if baseline_num_requests else prompts
        results.append(_run_hf_eager(model, subset, output_len, baseline_batch_size))
    ceilings = {}
    if device.type == "cuda" and dataset is None:
        # Each rank reads its share of the weights and KV cache on its own GPU, and does 1/ranks of the FLOPs.
        ceilings = throughput_ceilings(
            model, weight_bytes, kv_bytes_per_token, input_len, output_len, config.max_batch_size,
            ranks * measured_gemm_flops(device, fp8=fp8), copy_bandwidth(device),
        )  # fmt: skip
        ceilings["ranks"] = ranks
        ceilings["fp8_gemm"] = fp8
        ours = results[0]["output_tokens_per_s"]
        results[0]["fraction_of_flop_ceiling"] = ours / ceilings["flop_ceiling_output_tokens_per_s"]
        results[0]["fraction_of_byte_ceiling"] = ours / ceilings["byte_ceiling_output_tokens_per_s"]
    return {
        "mode": "throughput",
        "model": model_name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "num_requests": num_requests,
        "input_len": input_len if dataset is None else None,
        "output_len": output_len,
        "dataset": dataset,
        "torch": torch.__version__,
        "ranks": ranks,
        "results": results,
        "ceilings": ceilings,
    }


def format_throughput_table(result: dict) -> str:
    ranks = f" x {result['ranks']} ranks" if result.get("ranks", 1) > 1 else ""
    lines = [
        f"{result['model']} on {result['device']}{ranks}: {result['num_requests']} requests, "
        f"input {result['input_len'] or result['dataset']}, output {result['output_len']}",
        f"{'system':<14}{'output tok/s':>14}{'total tok/s':>13}{'req/s':>9}{'TTFT p50/p90/p99 s':>24}"
        f"{'ITL p50/p90/p99 ms':>24}",
    ]
    for r in result["results"]:
        ttft = "/".join(f"{r['ttft_s'][f'p{p}']:.3f}" for p in PERCENTILES) if "ttft_s" in r else "-"
        itl = "/".join(f"{1e3 * r['itl_s'][f'p{p}']:.1f}" for p in PERCENTILES) if "itl_s" in r else "-"
        lines.append(f"{r['system']:<14}{r['output_tokens_per_s']:>14.1f}{r['total_tokens_per_s']:>13.1f}"
                     f"{r['requests_per_s']:>9.2f}{ttft:>24}{itl:>24}")  # fmt: skip
    ours = result["results"][0]["output_tokens_per_s"]
    for r in result["results"][1:]:
        lines.append(
            f"compiled-llm / {r['system']} (batches of {r['batch_size']}, {r['num_requests']} requests): "
            f"{ours / r['output_tokens_per_s']:.2f}x output tokens/s"
        )
    ceilings = result.get("ceilings")
    if ceilings:
        gemm = "FP8 GEMM, row scales" if ceilings["fp8_gemm"] else "bf16 GEMM"
        lines.append(
            f"FLOP ceiling {ceilings['flop_ceiling_output_tokens_per_s']:,.0f} output tok/s "
            f"({ceilings['flops_per_output_token'] / 1e9:.1f} GFLOP a token at {ceilings['gemm_flops_per_s'] / 1e12:.0f} "
            f"TFLOP/s, the measured {gemm}): compiled-llm reaches {result['results'][0]['fraction_of_flop_ceiling']:.1%}"
        )
        lines.append(
            f"byte ceiling {ceilings['byte_ceiling_output_tokens_per_s']:,.0f} output tok/s "
            f"({ceilings['bytes_per_output_token'] / 1e6:.1f} MB a token at {ceilings['copy_bandwidth_GBps']:.0f} GB/s): "
            f"compiled-llm reaches {result['results'][0]['fraction_of_byte_ceiling']:.1%}"
        )
    return "\n".join(lines)
