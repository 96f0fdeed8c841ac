"""`SamplingParams`: how one request's tokens are chosen and when it stops."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compiled_llm.sampling import GREEDY_BELOW


class SamplingParams(BaseModel):
    """Per-request generation settings (vLLM's names and defaults). Unknown fields are an error.

    Example:
        >>> SamplingParams(max_tokens=32, temperature=0).greedy
        True
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    max_tokens: int = Field(16, ge=1)
    """Most tokens to generate."""

    temperature: float = Field(1.0, ge=0.0)
    """0 (or below 1e-5) picks the most likely token (greedy); above, tokens are sampled from softmax(logits / T)."""

    top_k: int | None = Field(None, ge=1)
    """Sample among the k most likely tokens only (None: all)."""

    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Sample among the most likely tokens whose probabilities sum to top_p."""

    min_p: float = Field(0.0, ge=0.0, le=1.0)
    """Drop tokens less likely than min_p times the most likely one (after top-k/top-p; 0: off)."""

    repetition_penalty: float = Field(1.0, gt=0.0)
    """Divide the positive logits (multiply the negative ones) of tokens already in the prompt or the
    output by this (HF's and vLLM's); 1: off."""

    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    """Subtract this from the logits of tokens already generated (OpenAI's); 0: off."""

    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    """Subtract this times its count so far from each generated token's logit (OpenAI's); 0: off."""

    logprobs: int | None = Field(None, ge=0, le=20)
    """Return, for each generated token, its log-probability and those of the `logprobs` most likely
    tokens (under the model's raw distribution, before penalties and temperature). None: none."""

    seed: int | None = None
    """Seed of this request's own random generator: the same seed gives the same tokens, whatever else
    runs in the same batch."""

    n: int = Field(1, ge=1)
    """Completions per prompt (`LLM.generate`); with a seed, completion i uses seed + i."""

    stop: list[str] = Field(default_factory=list)
    """Strings that end the request; the text stops just before the first one (needs a tokenizer)."""

    stop_token_ids: list[int] = Field(default_factory=list)
    """Tokens that end the request (kept in the output), besides the model's EOS."""

    ignore_eos: bool = False
    """Keep generating past the model's EOS token (up to max_tokens)."""

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def for_completion(self, index: int) -> SamplingParams:
        """The parameters of completion `index` of n: with a seed, it samples with seed + index."""
        return self if self.seed is None or index == 0 else self.model_copy(update={"seed": self.seed + index})

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @model_validator(mode="after")
    def _sampling_needs_temperature(self) -> SamplingParams:
        if self.greedy and (self.top_k is not None or self.top_p < 1.0 or self.min_p > 0.0):
            raise ValueError("top_k/top_p/min_p need temperature > 0 (temperature=0 is greedy)")
        return self
