"""The LLM budget of a labelling run: what its controller actors may still spend, and what they have spent.

One ledger for all of them. With one controller actor it lives in that actor; with several it is a Ray actor of
its own that each one asks as a row starts and tells as its answer comes in, so an actor that has run out never
leaves rows unresolved while another still has budget, and the limits are overshot by at most the requests in
flight across all of them (before the first answer, the rows started are counted at no tokens: they are in flight).
"""

from __future__ import annotations

from dataclasses import dataclass

from labelwright.orchestrator.cost import token_cost

# The reasons a budget gives a row it leaves unresolved begin so (the report counts them by these).
BUDGET_SPENT = "LLM budget exhausted"
BUDGET_KEPT = "LLM budget kept for less confident rows"


@dataclass
class Budget:
    max_calls: int | None = None  # what is left of budget.max_llm_calls when labelling starts
    max_tokens: int | None = None
    max_cost_usd: float | None = None  # at the controller's prices
    price_prompt_per_1k: float = 0.0
    price_completion_per_1k: float = 0.0
    # rows the run is expected to label (with max_calls: the budget goes to the least confident hard rows)
    rows_expected: int | None = None
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reserved: int = 0  # rows started and not yet answered: one call each, counted against the budget
    asked: int = 0  # rows answered
    rows_seen: int = 0
    hard_seen: int = 0

    @property
    def limited(self) -> bool:
        return any(v is not None for v in (self.max_calls, self.max_tokens, self.max_cost_usd))

    def admit(self) -> str | None:
        """A row is about to be asked: None (it is, and holds a call until :meth:`settle`), or why it is not."""
        if self.max_calls is not None and self.calls + self.reserved >= self.max_calls:
            return f"{BUDGET_SPENT} (budget.max_llm_calls)"
        # Rows started and not yet answered count at the mean of those answered (nothing before the first answer).
        scale = 1 + (self.reserved / self.asked if self.asked else 0.0)
        if self.max_tokens is not None and (self.prompt_tokens + self.completion_tokens) * scale >= self.max_tokens:
            return f"{BUDGET_SPENT} (budget.max_llm_tokens)"
        if self.max_cost_usd is not None:
            cost = token_cost(self.prompt_tokens, self.completion_tokens, price_prompt_per_1k=self.price_prompt_per_1k,
                              price_completion_per_1k=self.price_completion_per_1k)
            if cost * scale >= self.max_cost_usd:
                return f"{BUDGET_SPENT} (budget.max_cost_usd)"
        self.reserved += 1
        return None

    def settle(self, admitted: bool, calls: int, prompt_tokens: int, completion_tokens: int) -> None:
        """A row's answer is in (``admitted``: it was started through :meth:`admit`; a cache hit spends nothing)."""
        if admitted:
            self.reserved -= 1
            self.asked += 1
        self.calls += calls
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    def outlook(self, rows: int, hard: int) -> tuple[float, float] | None:
        """A batch of ``rows`` came with ``hard`` rows to ask about: the calls left and the calls every hard row
        still expected would take (these and the ones to come, at the hard-row rate and the calls a row has
        cost so far; while every answer came from the cache, rows are free). None where every row may be
        asked (no call limit, or no idea how many rows are coming)."""
        self.rows_seen += rows
        self.hard_seen += hard
        if self.max_calls is None or not self.rows_expected:
            return None
        left = self.max_calls - self.calls - self.reserved
        future = max(0, self.rows_expected - self.rows_seen) * self.hard_seen / max(1, self.rows_seen)
        return left, (hard + future) * (self.calls / self.asked if self.asked else 1.0)


def shared_budget(budget: Budget, actors: int):
    """``budget`` as the controller actors use it: itself for one actor (or no limit), else a Ray actor beside the
    driver that they all ask."""
    if actors <= 1 or not budget.limited:
        return budget
    from labelwright.cluster.runtime import beside_driver

    return beside_driver(Budget, **vars(budget))
