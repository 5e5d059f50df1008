"""Holding the bits actually read at the budget (docs/design.md, "Holding the budget").

Where routers decide per token, their thresholds were fitted on calibration text; on other text they may
send more (or fewer) tokens to the deeper slices than the budget pays for. A :class:`BitsHold` keeps the
average bits read since the budget was set at the budget: the ``target_bits`` a step asks the graph for is
the budget less the bit-tokens overspent so far spread over ``horizon`` tokens or the step, whichever is
longer (an integral controller),
within ``max_offset`` bits of the budget. Where every router's row is constant the graph reads exactly the
budget and the input stays the budget. Not thread-safe: one step runs at a time (runtime/api.py).
"""

from __future__ import annotations

import math

from .budget import MAX_BITS, MIN_BITS

HORIZON_TOKENS = 64  # tokens an overspend is paid back over (the average holds to drift x 64 / tokens read)
MAX_OFFSET = 0.5  # bits the asked target may move from the budget


class BitsHold:
    def __init__(self, horizon: int = HORIZON_TOKENS, max_offset: float = MAX_OFFSET):
        self.horizon, self.max_offset = horizon, max_offset
        self.budget: float | None = None
        self.debt = 0.0  # bit-tokens read above the budget since it was set (negative: saved)

    def target(self, budget: float, tokens: int = 1) -> float:
        """The target_bits to ask for the next step of ``tokens`` tokens under ``budget`` (a new budget starts a
        new account). The debt is spread over the step itself when it is longer than the horizon (a prompt, an
        evaluation window): paid back at once, not overcorrected."""
        if self.budget is None or abs(budget - self.budget) > 1e-9:
            self.budget, self.debt = budget, 0.0
        offset = min(max(-self.debt / max(self.horizon, tokens), -self.max_offset), self.max_offset)
        return min(max(budget + offset, MIN_BITS), MAX_BITS)

    def record(self, avg_bits: float, tokens: int) -> None:
        """A step under the current budget read ``avg_bits`` on average over ``tokens`` tokens."""
        if self.budget is None or math.isnan(avg_bits):
            return
        bound = self.max_offset * max(self.horizon, tokens)  # no wind-up past the debt that saturates the offset
        self.debt = min(max(self.debt + (avg_bits - self.budget) * tokens, -bound), bound)

