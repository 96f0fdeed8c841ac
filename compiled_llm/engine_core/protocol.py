"""The messages between a server's API process and its engine-core process: tuples of plain values, each send
a list of them, pickled through a `multiprocessing` pipe (the IPC that benchmarks/engine_ipc.py measured
fastest of the standard library's, far below a step's time; see BENCHMARKS.md).

API process -> engine core, in order (an abort always follows its request's add):
    (ADD, request_id, prompt_token_ids, SamplingParams, prompt text or None)
    (ABORT, request_id)
    (SHUTDOWN,)
Engine core -> API process:
    (READY, EngineInfo)                      once, when the model is compiled
    (START_FAILED, exception)                instead of READY; the process exits
    (STEP, [RequestDelta, ...], EngineStats, adds received so far)   after each step, and when idle
    (REJECTED, request_id, message)          an add the engine refused (ValueError)
    (FAILED, message)                        a step failed: every request is aborted, the process exits
"""

from __future__ import annotations

from dataclasses import dataclass

from compiled_llm.engine.limits import EngineStats, RequestLimits

ADD, ABORT, SHUTDOWN = "add", "abort", "shutdown"
READY, START_FAILED, STEP, REJECTED, FAILED = "ready", "start_failed", "step", "rejected", "failed"


@dataclass
class EngineInfo:
    """What the API process needs to know of the engine: its tokenizer (pickled: the very same one), the limits
    it checks requests against before sending them, its state at start."""

    tokenizer: object
    limits: RequestLimits
    stats: EngineStats


# What one step added to a request, only what is new, so that a step's message does not grow with the outputs'
# lengths. A plain tuple: pickling named tuples made a step's message 4.5x slower (benchmarks/engine_ipc.py).
#     (request_id, new_token_ids, text_start, new_text, new_logprobs, finish_reason, num_cached_tokens,
#      first_token_time, finish_time)
# text_start: the request's text keeps its first text_start characters, then new_text follows (None without a
# tokenizer); new_logprobs: None unless the request asked for logprobs.
RequestDelta = tuple
