"""`compile_model()` and `CompiledModel`: a drop-in, compiled replacement for an HF causal LM's forward and
`generate`, running over a paged KV cache."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from autotune.select import graph_value, select_kernels
from compiled_llm.capture import capture_model
from compiled_llm.capture.forward_signature import compute_dtype, forward_signature
from compiled_llm.capture.graph_cache import GraphCache
from compiled_llm.capture.module_state import release_replaced_caches
from compiled_llm.capture.rewritten_graph import RewrittenGraphCache, removed_on_failure
from compiled_llm.causal_lm_calls import CausalLMCalls
from compiled_llm.compile import CompiledGraph
from compiled_llm.compiler_caches import use_cache_dir
from compiled_llm.config import CompileConfig
from compiled_llm.first_difference import captured_copy
from compiled_llm.fp8_checkpoint import resolve_quantization
from compiled_llm.parallel_ranks import check_one_gpu_per_rank, over_ranks, parallel_rank
from compiled_llm.progress import StageProgress
from compiled_llm.report import CompileReport
from compiled_llm.runtime import (
    DecodeCudaGraphs,
    ModelRunner,
    PagedKVCache,
    ScheduledChunk,
    Sequence,
    caused_by_out_of_memory,
    check_kv_cache_fits,
    default_batch_sizes,
    default_num_kv_blocks,
)
from compiled_llm.sequence_limits import bounded_by_position_tables, max_seq_len_for
from compiled_llm.verify import self_check, self_check_wanted
from custom_ops import get_attention_backend, planners_for
from custom_ops.triton_runtime import kernel_launch_mode
from fx_passes import run_passes
from fx_passes.quantized_reference import release_roundings

log = logging.getLogger("compiled_llm")

# Memory kept free for decode CUDA graphs and attention planners when the KV cache is sized from free
# memory: they are captured after the cache exists (the graphs bake its address in).
CUDA_GRAPH_RESERVE_BYTES = 1 << 30


def compile_model(model: nn.Module, config: CompileConfig | dict | None = None, tokenizer=None,
                  **fields) -> CompiledModel:  # fmt: skip
    """Capture, rewrite and compile a causal LM. Keyword arguments are `CompileConfig` fields; `tokenizer` (the
    model's) is read only by quantizations that calibrate on text (`int4_awq`, `int8_sq`), which use random token ids
    without it.

    Example:
        >>> cm = compile_model(hf_model, max_batch_size=8)
        >>> cm(input_ids).logits          # [batch, seq, vocab], as hf_model(input_ids, use_cache=False)
        >>> cm.generate(input_ids, max_new_tokens=32)
        >>> print(cm.report)
    """
    if config is not None and fields:
        raise ValueError("pass either config=CompileConfig(...) or its fields as keyword arguments, not both")
    if isinstance(config, dict):
        config = CompileConfig(**config)
    elif config is not None and not isinstance(config, CompileConfig):
        raise ValueError(f"config must be a CompileConfig or a dict of its fields, got {type(config).__name__}")
    return CompiledModel(model, config or CompileConfig(**fields), tokenizer)


def graph_weight_bytes(gm: torch.fx.GraphModule, reads=None) -> int:
    """Bytes of the parameters and buffers the rewritten graph reads (each storage once): what a step reads of
    the weights, after the passes (quantized weights at their size, the float ones they replace not at all).
    `reads`: only these get_attr nodes."""
    seen, total = set(), 0
    for node in gm.graph.nodes if reads is None else reads:
        if node.op != "get_attr":
            continue
        value = graph_value(gm, node)
        if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in seen:
            seen.add(value.untyped_storage().data_ptr())
            total += value.untyped_storage().nbytes()
    return total


class CompiledModel(CausalLMCalls):
    """A model compiled by `compile_model`: its rewritten graph compiled, over a paged KV cache, called as the HF
    causal LM was (CausalLMCalls: `__call__`/`forward` for logits, `generate`)."""

    def __init__(self, model: nn.Module, config: CompileConfig, tokenizer=None):
        self.model = model
        quantization, why = resolve_quantization(config.quantization, model, config.quantize_lm_head)
        if quantization != config.quantization:
            log.info("quantization=%r (%s)", quantization, why)
            # Validated again: the resolved format's own checks (one rank only, ...) hold for what runs.
            config = type(config).model_validate({**dict(config), "quantization": quantization})
        self.config = config
        _, world = parallel_rank(config)  # a missing or mismatched process group fails before any work
        # A rank that reads only its slices of the checkpoint (checkpoint_slices.py) has its model on meta.
        self._slices = slices = getattr(model, "checkpoint_slices", None)
        if slices is not None and config.verify:
            raise ValueError("verify=True: a rank that reads only its slices of the checkpoint has no whole module to "
                             "check its graph against; load the whole model (LLM does where verify=True) or pass "
                             "verify=None")  # fmt: skip
        self.device = slices.device if slices is not None else next(model.parameters()).device
        if world > 1:
            check_one_gpu_per_rank(self.device)
        self.max_seq_len = max_seq_len_for(model, config.max_seq_len)
        timings = {}
        self_check_share = None  # the self-check's largest difference as a share of its bound, where it ran
        caches = f"kernel choices under {config.cache_dir}"
        if config.compile_backend == "inductor":  # first: a second cache_dir in one process fails before any work
            caches = use_cache_dir(config.cache_dir)
        # Stages: capture, rewrite, compile, and CUDA-graph capture where it can happen.
        rewritten = None  # this compile's rewritten-graph entry (made once the graph cache is known)
        # A graph loaded from the cache that fails anywhere before the first token takes its entry with it.
        with removed_on_failure(lambda: rewritten):
            with StageProgress("compile_model", total=3 + (self._cuda_graphs_off(None) is None)) as progress:
                with progress.stage("capturing the graph (torch.export)"):
                    # A graph from the cache is always self-checked; the check holds logits to the module's within
                    # rounding, which an fp8 KV cache's rounding exceeds.
                    unreadable = (
                        "the self-check cannot hold an fp8 KV cache" if config.kv_cache_dtype == "fp8" else None
                    )
                    if slices is not None:  # its graph is keyed by nothing that tells the slices apart (yet)
                        unreadable = "each rank reads only its slices of the checkpoint"
                    graph_cache = GraphCache(config.cache_dir, unreadable) if config.graph_cache else None
                    rewritten = RewrittenGraphCache(model, config, self.max_seq_len, self.device, graph_cache)
                    captured = rewritten.load() or capture_model(model, config.max_num_tokens, graph_cache)
                    if slices is not None:
                        slices.retarget(captured.gm)
                timings["capture_s"] = captured.seconds

                with progress.stage("rewriting the graph"):
                    if rewritten.loaded:  # the passes' results, as they were
                        captured_graph, pass_results = None, rewritten.pass_results
                    else:
                        # the self-check's reference for a diagnosis (none without weights)
                        captured_graph = captured_copy(captured.gm) if slices is None else None
                        tracing_constants = rewritten.tracing_constants(captured.gm)
                        captured.gm.meta["max_seq_len"] = self.max_seq_len  # how far causal_mask.py proves a mask
                        start = time.perf_counter()
                        # What a calibrating pass reads (fx_passes/calibration.py); the tokenizer is not the graph's to keep
                        captured.gm.meta.update(tokenizer=tokenizer, vocab_size=captured.vocab_size)
                        pass_results = run_passes(captured.gm, config)
                        captured.gm.meta.pop("tokenizer", None)
                        timings["passes_s"] = time.perf_counter() - start
                        rewritten.store(captured, tracing_constants, pass_results)
                if slices is not None:
                    start = time.perf_counter()
                    slices.load(captured.gm)
                    timings["load_slices_s"] = time.perf_counter() - start
                    captured.source = (
                        f"torch.export on the meta device, then {slices.bytes_read / 2**20:.1f} MiB read of the "
                        f"checkpoint's {slices.stored_bytes / 2**20:.1f} MiB (this rank's slices) in "
                        f"{timings['load_slices_s']:.2f} s; no graph cache"
                    )
                self.max_seq_len = bounded_by_position_tables(self.max_seq_len, config.max_seq_len, captured.gm)
                start = time.perf_counter()
                # What the tunings read beside the graph: the step shapes the runtime will run it at.
                captured.gm.meta.update(device=self.device, block_size=config.block_size, max_seq_len=self.max_seq_len,
                                        decode_batch_sizes=self._decode_batch_sizes(),
                                        weight_bytes=graph_weight_bytes(captured.gm))  # fmt: skip
                kernels = select_kernels(captured.gm, config.autotune, config.cache_dir, self.device,
                                         compute_dtype(model))  # fmt: skip
                timings["autotune_s"] = time.perf_counter() - start

                layers = captured.gm.meta["paged_attention"]
                weight_bytes = captured.gm.meta["weight_bytes"]
                self.vocab_size = captured.vocab_size
                self.logits_dtype = captured.logits_dtype
                with progress.stage(_compile_label(config.compile_backend, self.device)):
                    start = time.perf_counter()
                    self.runner, activation_bytes = self._compile_and_profile(captured.gm, layers)
                    timings["compile_s"] = time.perf_counter() - start

                num_blocks, kv_sizing = self._kv_cache_blocks(layers, activation_bytes)
                self.runner.kv_cache = PagedKVCache(layers, num_blocks, config.block_size, self.device,
                                                    config.enable_prefix_caching)  # fmt: skip
                graphs = self._cuda_graphs_off(layers)
                if graphs is None:
                    with progress.stage("capturing CUDA graphs"):
                        graphs = self._capture_cuda_graphs()
                    timings["cuda_graphs_s"] = self.runner.cuda_graphs.capture_s
                else:
                    progress.set_total(3)

            stored_code = self.runner.graph.source == "stored artifact"
            if slices is not None:
                # Never from the graph cache nor stored code (both off for it): only a drop-in rewrite asks for it.
                if config.verify is None and self_check_wanted(None, model, pass_results, False):
                    raise ValueError(
                        "the passes rewrote how this model computes positions, logits or its cache, which the "
                        "self-check must confirm, and a rank that reads only its slices has no whole module to "
                        "check against: load the whole model, or pass verify=False to run it unchecked"
                    )
                log.info("self-check: not run (this rank read only its slices of %s)", slices.directory)
            elif self_check_wanted(config.verify, model, pass_results, captured.cache_key is not None, stored_code):
                start = time.perf_counter()
                self_check_share = self_check(self, model, forward_signature(model), captured_graph,
                                              captured.cache_key)  # fmt: skip
                timings["self_check_s"] = time.perf_counter() - start
        # After the self-check, which runs the module with its cache.
        del captured_graph
        released_cache = release_replaced_caches(model, captured.gm)
        release_roundings(captured.gm.meta)

        dtype = str(compute_dtype(model)).removeprefix("torch.")
        self.report = CompileReport(
            architecture=captured.architecture,
            device=str(self.device),
            dtype=dtype,
            compile_backend=config.compile_backend + _COMPILE_SOURCES.get(self.runner.graph.source, ""),
            passes=pass_results,
            attention=layers,
            kv_cache=f"{len(layers)} layers x {num_blocks} blocks x {config.block_size} tokens, "
            f"{str(layers[0].dtype).removeprefix('torch.')} ({self.runner.kv_cache.nbytes / 2**20:.1f} MiB), "
            f"max_seq_len {self.max_seq_len}; {kv_sizing}",
            cuda_graphs=graphs,
            kernel_launch=kernel_launch_mode(self.device),
            weight_bytes=weight_bytes,
            autotune=config.autotune,
            kernels=kernels,
            caches=caches,
            capture=captured.source,
            timings=timings,
            self_check_share=self_check_share,
            released_cache=released_cache,
        )
        log.info("compiled %s:\n%s", captured.architecture, self.report)

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The rewritten graph (before Inductor)."""
        return self.runner.graph.gm

    def _kv_cache_blocks(self, layers, activation_bytes: int) -> tuple[int, str]:
        """KV-cache blocks and why that many (for the report)."""
        config = self.config
        if config.num_kv_blocks is not None:
            check_kv_cache_fits(layers, config.num_kv_blocks, config.block_size, self.device, activation_bytes)
            return config.num_kv_blocks, "num_kv_blocks"
        blocks, why = default_num_kv_blocks(layers, config.block_size, config.max_batch_size, self.max_seq_len,
                                            config.kv_cache_memory_fraction, self.device, reserved_bytes=activation_bytes)  # fmt: skip
        if config.parallel_ranks > 1:  # the ranks schedule in lockstep: one cache size, the smallest rank's
            fewest = over_ranks(blocks, self.device, "min")
            if fewest < blocks:
                blocks, why = fewest, f"{why}; the smallest of the {config.parallel_ranks} ranks'"
        if blocks < config.max_batch_size:
            raise ValueError(
                f"max_batch_size={config.max_batch_size}: the KV cache holds {blocks} blocks ({why}) and each running "
                f"sequence holds one at least, so the largest max_batch_size that works is {blocks}"
            )
        return blocks, why

    def _compile_and_profile(self, gm: torch.fx.GraphModule, layers) -> tuple[ModelRunner, int]:
        """Compile the graph by running a prefill and a decode step on a small KV cache; on CUDA the
        prefill is a full step of max_num_tokens, whose peak memory is kept free when sizing the cache.
        Running both also loads every attention kernel before the first request."""
        config = self.config
        planners = planners_for(layers, config.block_size, self.device)
        on_cuda = self.device.type == "cuda"
        # On CUDA the largest step there can be: max_num_tokens tokens, every logit asked for (a forward of
        # the full batch does that), in as few sequences as max_seq_len allows. On CPU: 2 tokens.
        total = config.max_num_tokens if on_cuda else 2
        per_seq = max(1, min(total, self.max_seq_len - 1))  # leave room for the decode token
        tokens = [per_seq] * (total // per_seq) + ([total % per_seq] if total % per_seq else [])
        blocks = sum(-(-(n + 1) // config.block_size) for n in tokens)
        runner = ModelRunner(
            # No stored compiled code for a rank reading its slices: it could not self-check it (verify.py).
            CompiledGraph(gm, config.compile_backend, config.inductor_options, self.device.type,
                          config.cache_dir if config.graph_cache and self._slices is None else None),  # fmt: skip
            PagedKVCache(layers, blocks, config.block_size, self.device),
            planners, self.max_seq_len, self.device,
        )  # fmt: skip
        if on_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            baseline = torch.cuda.memory_allocated(self.device)
        seqs = [Sequence([0] * n) for n in tokens]
        try:
            runner.execute([ScheduledChunk(seq, len(seq), "all" if on_cuda else "last") for seq in seqs])
            for seq in seqs:
                seq.token_ids.append(0)
            runner.execute([ScheduledChunk(seq, 1, "last") for seq in seqs])
        except Exception as error:
            if not caused_by_out_of_memory(error):
                raise
            raise ValueError(
                f"a step of max_num_tokens={config.max_num_tokens} tokens (every logit asked for, as a forward of "
                f"the whole batch does) ran out of GPU memory before the KV cache was allocated: lower max_num_tokens"
            ) from error
        finally:
            for seq in seqs:
                runner.release(seq)
        activation_bytes = 0
        if on_cuda:
            torch.cuda.synchronize(self.device)
            # + room for the CUDA-graph pool and the attention planners' buffers, captured after the cache
            activation_bytes = torch.cuda.max_memory_allocated(self.device) - baseline + CUDA_GRAPH_RESERVE_BYTES
            runner.kv_cache = None  # the real cache replaces it; free this one first
            torch.cuda.empty_cache()
        return runner, activation_bytes

    def _cuda_graphs_off(self, layers) -> str | None:
        """Why decode steps will not replay CUDA graphs (what the report says), or None if they will.
        `layers` None: what can be told before the passes chose the attention backends."""
        if not self.config.cuda_graphs:
            return "off (cuda_graphs=False)"
        if self.device.type != "cuda":
            return f"off (model on {self.device.type})"
        if self.config.compile_backend != "inductor":
            return "off (compile_backend='eager')"
        unsafe = sorted({l.backend for l in layers or () if not get_attention_backend(l.backend).cuda_graph_safe})
        if unsafe:
            return f"off (attention backend {unsafe} syncs with the host)"
        return None

    def _decode_batch_sizes(self) -> list[int]:
        """The decode batch sizes CUDA graphs are captured for (a step of b sequences is padded to the next)."""
        return sorted(self.config.cuda_graph_batch_sizes or default_batch_sizes(self.config.max_batch_size))

    def _capture_cuda_graphs(self) -> str:
        """Capture the decode CUDA graphs; returns what the report should say."""
        sizes = self._decode_batch_sizes()
        graphs = DecodeCudaGraphs(self.runner, sizes)
        graphs.capture()
        self.runner.cuda_graphs = graphs
        sizes = graphs.batch_sizes
        listed = str(sizes)
        if len(sizes) > 8:
            listed = f"[{', '.join(map(str, sizes[:4]))}, ..., {sizes[-2]}, {sizes[-1]}] ({len(sizes)} sizes)"
        return (
            f"decode batch sizes {listed}: captured in {graphs.capture_s:.1f} s, {graphs.memory_bytes / 2**20:.0f} MiB"
        )


# Where the compiled code came from (CompiledGraph.source), after the backend on the report's compile line.
_COMPILE_SOURCES = {"stored artifact": " (stored compiled graph, no Dynamo)", "compiled": " (compiled graph stored)"}


def _compile_label(backend: str, device: torch.device) -> str:
    if backend != "inductor":
        return "running the graph uncompiled (compile_backend='eager')"
    kernels = "C++" if device.type == "cpu" else "Triton"
    return f"compiling with Inductor ({kernels} kernels; cached for later runs)"
