"""Token metering and cost of the controller (the LLM).

Plain functions for the arithmetic and one small thread-safe meter that the controller feeds after every
HTTP request and every cache hit. Prices are per 1,000 tokens, as providers quote them.
"""

from __future__ import annotations

import threading

from pydantic import BaseModel, ConfigDict


class Usage(BaseModel):
    """Totals spent on the controller so far (a snapshot; never mutated after it is handed out)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    calls: int = 0  # HTTP requests made, retries and repair rounds included
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_hits: int = 0  # rows answered from the persistent cache (no request, no tokens)
    cost_usd: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: "Usage") -> "Usage":
        """Sum two snapshots (for example, the usage of several controller actors)."""
        return Usage(
            calls=self.calls + other.calls,
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cache_hits=self.cache_hits + other.cache_hits,
            cost_usd=self.cost_usd + other.cost_usd,
        )


def token_cost(
    prompt_tokens: int,
    completion_tokens: int,
    *,
    price_prompt_per_1k: float,
    price_completion_per_1k: float,
) -> float:
    """Cost in USD of the given tokens at prices per 1,000 tokens."""
    return prompt_tokens / 1000.0 * price_prompt_per_1k + completion_tokens / 1000.0 * price_completion_per_1k


class UsageMeter:
    """Thread-safe running totals of controller usage, priced at fixed per-1k prices."""

    def __init__(self, *, price_prompt_per_1k: float = 0.0, price_completion_per_1k: float = 0.0) -> None:
        self._price_prompt = price_prompt_per_1k
        self._price_completion = price_completion_per_1k
        self._lock = threading.Lock()
        self._calls = 0
        self._prompt = 0
        self._completion = 0
        self._hits = 0

    def add_call(self, *, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """Record one HTTP request and the tokens its response reported (0 when it failed)."""
        with self._lock:
            self._calls += 1
            self._prompt += prompt_tokens
            self._completion += completion_tokens

    def add_cache_hit(self) -> None:
        with self._lock:
            self._hits += 1

    def snapshot(self) -> Usage:
        with self._lock:
            calls, prompt, completion, hits = self._calls, self._prompt, self._completion, self._hits
        return Usage(
            calls=calls,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cache_hits=hits,
            cost_usd=token_cost(
                prompt,
                completion,
                price_prompt_per_1k=self._price_prompt,
                price_completion_per_1k=self._price_completion,
            ),
        )
