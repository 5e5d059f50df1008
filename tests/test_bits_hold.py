"""BitsHold (runtime/bits_hold.py): the bits read since the budget was set average the budget, against a
simulated graph whose per-token routers overspend (nearest 0.1-bit row, as the graph picks it) and on the tiny
exported model run on tokens its thresholds were not fitted on (control: the same steps without the hold)."""

from __future__ import annotations

import numpy as np
import pytest

from mobiquant.runtime.bits_hold import BitsHold


def graph(asked: float, drift: float, floor: float = 2.0) -> float:
    """What a graph with token-dependent rows reads: the nearest row's bits plus the routers' drift."""
    row = np.clip(np.floor((asked - 2.0) / 0.1 + 0.5), 0, 60) * 0.1 + 2.0
    return max(row + drift, floor)


def run(hold: BitsHold | None, budget: float, drift: float, steps: int, tokens: int, floor: float = 2.0):
    read, asked_all = [], []
    for _ in range(steps):
        asked = hold.target(budget, tokens) if hold else budget
        bits = graph(asked, drift, floor)
        if hold:
            hold.record(bits, tokens)
        read.append(bits)
        asked_all.append(asked)
    return float(np.mean(read)), asked_all


@pytest.mark.parametrize("tokens, steps", [(1, 2000), (511, 30)])  # decode steps; evaluation windows
@pytest.mark.parametrize("drift", [0.12, -0.08, 0.35])
def test_the_average_read_holds_the_budget_where_routers_drift(tokens, steps, drift):
    free, _ = run(None, 3.5, drift, steps, tokens)
    held, asked = run(BitsHold(), 3.5, drift, steps, tokens)
    assert abs(free - 3.5) > 0.07  # the control drifts
    assert abs(held - 3.5) <= 0.02, (held, asked[:8])
    assert all(abs(a - 3.5) <= 0.5 + 1e-9 for a in asked)


def test_exact_rows_ask_for_the_budget_itself_and_a_new_budget_starts_a_new_account():
    hold = BitsHold()
    _, asked = run(hold, 4.5, 0.0, 50, 1)
    assert set(asked) == {4.5}
    _, asked = run(hold, 3.0, 0.2, 400, 1)  # overspend under 3 bits ...
    assert min(asked) < 3.0
    _, asked = run(hold, 5.0, 0.0, 5, 1)  # ... is not paid back under 5
    assert set(asked) == {5.0}


def test_no_wind_up_where_the_graph_cannot_read_less():
    hold = BitsHold()
    run(hold, 2.8, 0.0, 3000, 1, floor=3.4)  # reads 3.4 whatever is asked: the offset saturates
    assert hold.target(2.8) == pytest.approx(2.8 - 0.5)
    assert hold.debt <= 0.5 * 64  # no more debt than saturates it ...
    run(hold, 2.8, 0.0, 200, 1)  # ... so a graph that recovers pays it back within a few hundred tokens
    held, asked = run(hold, 2.8, 0.0, 300, 1)
    assert held == pytest.approx(2.8, abs=0.05) and asked[-1] == pytest.approx(2.8, abs=0.05)


def test_a_step_with_no_bits_reading_changes_nothing():
    hold = BitsHold()
    hold.target(3.0)
    hold.record(float("nan"), 10)
    assert hold.debt == 0.0 and hold.target(3.0) == 3.0


@pytest.mark.parametrize("budget", [3.5, 5.0])
def test_the_tiny_model_holds_its_budget_on_text_unlike_what_its_thresholds_were_fitted_on(tiny_model_dir, budget):
    from mobiquant.runtime.session import ModelSession

    windows = np.random.default_rng(7).integers(60, 99, (12, 48)).astype(np.int64)  # fitted on ids 3..98 uniform
    averages = {}
    for hold in (False, True):
        s = ModelSession(tiny_model_dir, threads=1, hold=hold)
        read = []
        for w in windows:
            s.forward(w[None], s.empty_cache(), budget)
            read.append(s.last_avg_bits)
        averages[hold] = float(np.mean(read))
    assert abs(averages[False] - budget) > 0.07, averages  # the control drifts
    assert abs(averages[True] - budget) <= 0.03, averages
