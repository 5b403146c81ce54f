"""What a request asks of sampling, with the bounds every front end checks against."""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_LOGPROBS = 20
# Bounds well inside int64 (torch's index and seed type) and beyond any real vocabulary or context.
MAX_TOP_K = 1 << 20
MAX_NEW_TOKENS = 1 << 20
MAX_TOKEN_ID = (1 << 31) - 1
MAX_SEED = (1 << 63) - 1
MAX_PENALTY = 2.0  # presence and frequency penalties, either sign (OpenAI's range)
MAX_BIAS = 100.0  # a logit_bias value, either sign (OpenAI's range)
MAX_BIASED_TOKENS = 300
# Temperatures below this sample greedily (as vLLM's): logits / temperature would overflow float32 to
# inf, and the softmax of infinities is NaN. Repetition penalties below the floor would overflow alike.
GREEDY_BELOW = 1e-5
MIN_REPETITION_PENALTY = 1e-3


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 (below GREEDY_BELOW) = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated so far
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings: matched on text by the front end
    ignore_eos: bool = False
    min_tokens: int = 0  # no EOS or stop token drawn, no stop string matched, before this many tokens (vLLM's)
    include_stop_str_in_output: bool = False  # the stop string that ends the request stays in its text
    skip_special_tokens: bool = True  # special tokens are left out of the text
    logprobs: int | None = None  # None = off; n >= 0 = chosen token's logprob plus the top n
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (vLLM's)
    grammar: str | None = None  # structured output: the llguidance grammar its tokens must match (grammar.py)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def holds_stops(self, generated: int) -> bool:
        """Whether EOS and the stop tokens may not be drawn after `generated` tokens (min_tokens)."""
        return generated < self.min_tokens

    @property
    def penalized(self) -> bool:
        """Whether the repetition, presence or frequency penalty changes any logit."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def check(self) -> None:
        """Raise ValueError naming the first out-of-range parameter."""
        penalties, biases = f"[-{MAX_PENALTY}, {MAX_PENALTY}]", f"[-{MAX_BIAS}, {MAX_BIAS}]"
        checks = [
            (1 <= self.max_new_tokens <= MAX_NEW_TOKENS, f"max_new_tokens must be in [1, {MAX_NEW_TOKENS}]"),
            (0 <= self.min_tokens <= self.max_new_tokens, "min_tokens must be in [0, max_new_tokens]"),
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be >= 0"),
            (0 <= self.top_k <= MAX_TOP_K, f"top_k must be in [0, {MAX_TOP_K}] (0 disables it)"),
            (self.seed is None or 0 <= self.seed <= MAX_SEED, f"seed must be in [0, {MAX_SEED}]"),
            (all(0 <= t <= MAX_TOKEN_ID for t in self.stop_token_ids), "stop_token_ids must be valid token ids"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (
                math.isfinite(self.repetition_penalty) and self.repetition_penalty >= MIN_REPETITION_PENALTY,
                f"repetition_penalty must be >= {MIN_REPETITION_PENALTY}",
            ),
            (abs(self.presence_penalty) <= MAX_PENALTY, f"presence_penalty must be in {penalties}"),
            (abs(self.frequency_penalty) <= MAX_PENALTY, f"frequency_penalty must be in {penalties}"),
            (len(self.logit_bias) <= MAX_BIASED_TOKENS, f"logit_bias takes at most {MAX_BIASED_TOKENS} tokens"),
            (all(0 <= t <= MAX_TOKEN_ID for t, _ in self.logit_bias), "logit_bias keys must be valid token ids"),
            (all(abs(b) <= MAX_BIAS for _, b in self.logit_bias), f"logit_bias values must be in {biases}"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, f"logprobs must be in [0, {MAX_LOGPROBS}]"),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                f"prompt_logprobs must be in [0, {MAX_LOGPROBS}]",
            ),
            (all(s for s in self.stop), "stop strings must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
