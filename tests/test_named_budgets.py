"""Named budgets (exporter/budgets.py): each name is the fewest bits within its band of max, and the candidates
above the first budget within every band are not measured."""

import pytest

from mobiquant.exporter import budgets


@pytest.mark.parametrize("curve", [
    {8.0: 10.0, 2.5: 40.0, 3.0: 20.0, 3.5: 13.0, 4.0: 12.0, 4.5: 10.9, 5.0: 10.5, 5.5: 10.2, 6.0: 10.1, 7.0: 10.0},
    {8.0: 10.0, 2.5: 11.0, 3.0: 10.2, 3.5: 10.1, 4.0: 10.0, 4.5: 10.0, 5.0: 10.0, 5.5: 10.0, 6.0: 10.0, 7.0: 10.0},
    {8.0: 10.0, 2.5: 99.0, 3.0: 99.0, 3.5: 99.0, 4.0: 99.0, 4.5: 99.0, 5.0: 99.0, 5.5: 99.0, 6.0: 99.0, 7.0: 10.5},
])
def test_named_budgets_match_a_full_scan_and_stop_once_every_band_is_met(monkeypatch, curve):
    measured = []
    monkeypatch.setattr(budgets, "validation_windows", lambda model_dir: None)
    monkeypatch.setattr("mobiquant.runtime.session.ModelSession", lambda *a, **k: None)
    monkeypatch.setattr(budgets, "perplexity", lambda session, ids, bits: measured.append(bits) or curve[bits])
    named, ppl = budgets.measure_named_budgets("unused", 8.0)
    full_scan = {name: min((b for b in curve if curve[b] <= band * curve[8.0]), default=8.0)
                 for name, band in budgets.BANDS.items()}
    assert named == {"max": 8.0, **full_scan}
    first_within_all = min((b for b in budgets.CANDIDATES if curve[b] <= min(budgets.BANDS.values()) * curve[8.0]),
                           default=max(budgets.CANDIDATES))
    assert measured == [8.0, *[b for b in budgets.CANDIDATES if b <= first_within_all]]
    assert set(ppl) == set(measured)
