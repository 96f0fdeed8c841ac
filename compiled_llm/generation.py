"""Settings of `CompiledModel.generate`: explicit arguments over the model's `generation_config`, as in HF.

A `generation_config` field that would change HF's tokens and that `generate` does not implement is an
error, never silently ignored.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

# generation_config fields generate() does not implement -> their neutral value (None: unset).
_UNSUPPORTED_FIELDS = {
    "num_beams": 1, "num_return_sequences": 1, "min_length": 0, "min_new_tokens": 0, "no_repeat_ngram_size": 0,
    "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "exponential_decay_length_penalty": None,
    "stop_strings": None, "guidance_scale": 1.0, "penalty_alpha": None, "dola_layers": None,
    "diversity_penalty": 0.0, "num_beam_groups": 1, "constraints": None, "force_words_ids": None,
    "watermarking_config": None, "max_time": None,
}  # fmt: skip
# ... and the ones that only act when sampling.
_UNSUPPORTED_SAMPLING_FIELDS = {"min_p": None, "top_h": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


def _number(name: str, value, low: float, high: float = math.inf, low_inclusive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (value == low and not low_inclusive) or value > high:
        bounds = f"{'[' if low_inclusive else '('}{low}, {high}]" if high != math.inf else f"{'>=' if low_inclusive else '>'} {low}"
        raise ValueError(f"{name} must be {'in ' if high != math.inf else ''}{bounds}, got {value!r}")
    return float(value)


def _token_ids(name: str, value) -> frozenset[int]:
    values = value.tolist() if hasattr(value, "tolist") else value
    values = [values] if isinstance(values, int) else list(values or [])
    try:
        return frozenset(operator.index(v) for v in values)
    except TypeError:
        raise ValueError(f"{name} must be a token id or a list of token ids, got {value!r}") from None


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    repetition_penalty: float
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

        raw = pick("max_new_tokens")
        where = "max_new_tokens"
        if raw is None:  # HF: max_length (default 20) counts the prompt
            max_length = pick("max_length", 20)
            raw = max_length - prompt_len
            where = f"max_new_tokens (generation_config.max_length={max_length} minus a {prompt_len}-token prompt)"
        try:
            max_new_tokens = None if isinstance(raw, bool) else operator.index(raw)
        except TypeError:
            max_new_tokens = None
        if max_new_tokens is None or max_new_tokens < 1:
            raise ValueError(f"{where} must be an integer >= 1, got {raw!r}")

        do_sample = bool(pick("do_sample", False))
        temperature = _number("temperature", pick("temperature", 1.0), 0.0)
        top_k, top_p = pick("top_k"), pick("top_p")
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
                raise ValueError(f"top_k must be an integer >= 0, got {top_k!r}")
        if top_p is not None:
            top_p = _number("top_p", top_p, 0.0, 1.0)
        repetition_penalty = _number("repetition_penalty", pick("repetition_penalty", 1.0), 0.0)

        active = {**_UNSUPPORTED_FIELDS, **(_UNSUPPORTED_SAMPLING_FIELDS if do_sample else {})}
        unsupported = {
            name: getattr(generation_config, name)
            for name, neutral in active.items()
            if getattr(generation_config, name, None) not in (None, neutral)
        }
        if unsupported:
            raise ValueError(
                f"the model's generation_config sets {unsupported}, which generate() does not implement; "
                "reset them on model.generation_config to generate without them"
            )

        eos_ids = _token_ids("eos_token_id", pick("eos_token_id"))
        pad = pick("pad_token_id")
        if pad is None and eos_ids:  # what HF does, with a warning
            eos = pick("eos_token_id")
            pad = int(eos if isinstance(eos, int) else list(eos.tolist() if hasattr(eos, "tolist") else eos)[0])
        pad = None if pad is None else next(iter(_token_ids("pad_token_id", pad)))
        return cls(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, eos_ids, pad)
