"""The decode loop of `CompiledModel.generate`: sample, feed the tokens back, stop at EOS or the limit.

While step n runs on the GPU, the host already prepares and launches step n+1 (when it replays a CUDA
graph, see runtime/cuda_graphs.py): the sampled tokens go from step n to step n+1 on the device, and the
host reads them only afterwards, to check for EOS. A sequence that stopped at step n is computed once more
by step n+1 and that result is dropped. The GPU thus never waits for the host between decode steps.
"""

from __future__ import annotations

import torch
from torch.profiler import record_function

from compiled_llm.generation import GenerationSettings
from compiled_llm.runtime import ModelRunner, ScheduledChunk, Sequence
from compiled_llm.runtime.transfer import HostCopy, to_device
from compiled_llm.sampling import apply_repetition_penalty, next_tokens


def decode(
    runner: ModelRunner,
    seqs: list[Sequence],
    logits: torch.Tensor,  # [len(seqs), vocab]: each sequence's next-token logits after its prompt
    settings: GenerationSettings,
    seen: torch.Tensor,  # [len(seqs), L] ids the repetition penalty counts (prompt rows, padding included)
) -> list[list[int]]:
    """Generate for every sequence; returns the new tokens of each (up to and including its EOS)."""
    generated: list[list[int]] = [[] for _ in seqs]
    active = list(range(len(seqs)))  # sequences whose row of `logits` is next
    penalize = settings.repetition_penalty != 1.0
    for step in range(settings.max_new_tokens):
        with record_function("compiled_llm.sample"):
            if penalize:
                active_rows = to_device(active, torch.long, seen.device)
                logits = apply_repetition_penalty(logits, seen[active_rows], settings.repetition_penalty)
            tokens_on_device = next_tokens(logits, settings.do_sample, settings.temperature, settings.top_k, settings.top_p)
            if penalize:
                column = torch.full((len(seqs), 1), settings.pad_token_id or 0, dtype=torch.long, device=seen.device)
                column[active_rows, 0] = tokens_on_device
                seen = torch.cat([seen, column], dim=1)
            tokens_to_host = HostCopy(tokens_on_device)

        last = step + 1 == settings.max_new_tokens
        launched = None
        if not last:
            for i in active:
                seqs[i].token_ids.append(-1)  # placeholder until the host reads the token
            chunks = [ScheduledChunk(seqs[i], 1, "last", fill_row=row) for row, i in enumerate(active)]
            if runner.replays_as_graph(chunks):
                launched = runner.execute(chunks, device_tokens=tokens_on_device)

        (tokens,) = tokens_to_host.get()
        for i, token in zip(active, tokens):
            generated[i].append(token)
            if not last:
                seqs[i].token_ids[-1] = token
        going = [k for k, token in enumerate(tokens) if token not in settings.eos_token_ids]
        if last or not going:
            break
        going_rows = None if len(going) == len(active) else to_device(going, torch.long, tokens_on_device.device)
        if launched is not None:
            logits = launched if going_rows is None else launched[going_rows]
        else:  # a step that is not a graph replay: run it now (the host has its tokens by now)
            logits = runner.execute([ScheduledChunk(seqs[active[k]], 1, "last") for k in going])
        active = [active[k] for k in going]
    return generated
