"""Settings of `CompiledModel.generate`: explicit arguments over the model's `generation_config`, as in HF."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    eos_token_ids: frozenset[int]
    pad_token_id: int | None

    @classmethod
    def resolve(cls, generation_config, prompt_len: int, **given) -> GenerationSettings:
        """`given` holds generate()'s arguments; None falls back to `generation_config` (may be None)."""

        def pick(name, default=None):
            if given.get(name) is not None:
                return given[name]
            value = getattr(generation_config, name, None)
            return default if value is None else value

        max_new_tokens = given.get("max_new_tokens")
        if max_new_tokens is None:
            max_new_tokens = getattr(generation_config, "max_new_tokens", None)
        if max_new_tokens is None:  # HF: max_length (default 20) counts the prompt
            max_new_tokens = pick("max_length", 20) - prompt_len
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")

        do_sample = bool(pick("do_sample", False))
        temperature = float(pick("temperature", 1.0))
        top_k, top_p = pick("top_k"), pick("top_p")
        if do_sample:
            if temperature <= 0:
                raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature}")
            if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
                raise ValueError(f"top_k must be an integer >= 0, got {top_k!r}")
            if top_p is not None and not 0 < top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")

        eos = pick("eos_token_id")
        eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        pad = pick("pad_token_id")
        if pad is None and eos_ids:  # what HF does, with a warning
            pad = eos if isinstance(eos, int) else list(eos)[0]
        return cls(max_new_tokens, do_sample, temperature, top_k, top_p, eos_ids, pad)
