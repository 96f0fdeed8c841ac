"""One engine step's sampling: penalties from each request's history, the batched sampler over the
requests' own parameters, the log-probabilities asked for, and their copy to the host, started at once
and read later (while the GPU already runs the next step)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from compiled_llm.engine.request import Request
from compiled_llm.runtime.transfer import HostCopy, to_device
from compiled_llm.sampling import SamplingTensors, sample


def _padded_rows(lists: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(map(len, lists)))
    return to_device([row + [pad] * (width - len(row)) for row in lists], torch.long, device)


def apply_penalties(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens (HF's and vLLM's), presence and frequency
    penalties over output tokens (OpenAI's), each row with its request's values; float32 logits.

    Only the rows of penalized requests are gathered, and only those with a repetition penalty read
    their prompt: one penalized request among hundreds of long prompts must not pad them all."""
    logits = logits.float()
    penalized = [i for i, r in enumerate(requests) if r.params.penalized]
    if not penalized:
        return logits
    everything = len(penalized) == len(requests)
    index = None if everything else to_device(penalized, torch.long, logits.device)
    rows = logits if everything else logits[index]
    chosen = [requests[i] for i in penalized]
    vocab, device = logits.shape[-1], logits.device
    # Padding scatters into an extra column, dropped after.
    outputs = _padded_rows([r.output_token_ids for r in chosen], vocab, device)
    counts = torch.zeros(len(chosen), vocab + 1, device=device)
    counts = counts.scatter_add_(1, outputs, torch.ones(outputs.shape, device=device))[:, :vocab]
    seen = counts > 0
    if any(r.params.repetition_penalty != 1.0 for r in chosen):
        prompts = _padded_rows([r.prompt_token_ids if r.params.repetition_penalty != 1.0 else [] for r in chosen], vocab, device)
        seen |= torch.zeros(len(chosen), vocab + 1, dtype=torch.bool, device=device).scatter_(1, prompts, True)[:, :vocab]

    def column(name: str) -> torch.Tensor:
        return to_device([getattr(r.params, name) for r in chosen], torch.float32, device)[:, None]

    repetition = column("repetition_penalty")
    rows = torch.where(seen, torch.where(rows < 0, rows * repetition, rows / repetition), rows)
    rows = rows - column("frequency_penalty") * counts - column("presence_penalty") * (counts > 0)
    return rows if everything else logits.index_copy(0, index, rows)  # not in place: the caller keeps `logits`


class SampledStep:
    """The tokens one step sampled (row i for `requests[i]`), on the device and on their way to the host."""

    def __init__(self, requests: list[Request], logits: torch.Tensor, vocab_size: int):
        self.requests = requests
        self.rows = {request: row for row, request in enumerate(requests)}
        raw = logits
        if any(r.params.penalized for r in requests):
            logits = apply_penalties(logits, requests)
        params = SamplingTensors.build([r.params for r in requests], logits.device, vocab_size,
                                       [r.generator for r in requests])  # fmt: skip
        self.tokens = sample(logits, params)
        self._logprob_rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        extra = ()
        if self._logprob_rows:
            index = to_device(self._logprob_rows, torch.long, raw.device)
            logprobs = raw[index].float().log_softmax(dim=-1)
            chosen = logprobs.gather(1, self.tokens[index][:, None])
            top = logprobs.topk(max(requests[i].params.logprobs for i in self._logprob_rows), dim=-1)
            extra = (chosen, top.values, top.indices)
        self._host = HostCopy(self.tokens, *extra)

    def results(self) -> list[tuple[int, dict[int, float] | None]]:
        """Per row: the token and, where asked for, {token: logprob} of it and the top tokens (waits for
        this step's copy only)."""
        tokens, *extra = self._host.get()
        logprobs: list[dict[int, float] | None] = [None] * len(tokens)
        if extra:
            chosen, top_values, top_indices = extra
            for k, row in enumerate(self._logprob_rows):
                n = self.requests[row].params.logprobs
                logprobs[row] = {tokens[row]: chosen[k][0], **dict(zip(top_indices[k][:n], top_values[k][:n]))}
        return list(zip(tokens, logprobs))
