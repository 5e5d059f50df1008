"""The LM head that follows the budget (exporter/head.py): the decision rule, the per-row depths, and a file whose
head reads fewer slices at low budgets exporting, verifying against PyTorch and reading what it says."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mobiquant.exporter import checkpoint as ckpt
from mobiquant.exporter import head
from mobiquant.exporter.onnx_export import export
from mobiquant.exporter.qmodel import THRESHOLD_GRID, build_quantized, grid_index, slice_model
from mobiquant.exporter.source import load_float_model, resolve
from mobiquant.exporter.thresholds import fit_thresholds
from mobiquant.runtime.session import ModelSession
from tiny_llama import write_tiny_llama

NAMED = {"max": 8.0, "low": 4.0, "mid": 4.5, "high": 5.0}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("head")
    source = resolve(str(write_tiny_llama(root / "hf", seed=5)))
    model = load_float_model(source)
    q = build_quantized(model, slice_model(model, 64))
    fit_thresholds(q, [torch.from_numpy(np.random.default_rng(0).integers(3, 99, (2, 64)))])
    config = ckpt.CheckpointConfig(source.name, source.identity, source.architecture, 4, 64, 4, "minmax", "random")
    ckpt.save(q, config, root / "checkpoint")
    return root / "checkpoint", q


def test_each_grid_row_reads_the_depth_of_the_named_budget_at_or_below_it():
    rows = head.slices_per_row({"low": 2, "mid": 3, "high": 4, "max": 4}, NAMED, 4)
    for bits, want in ((2.0, 2), (3.0, 2), (4.0, 2), (4.4, 2), (4.5, 3), (4.9, 3), (5.0, 4), (7.9, 4), (8.0, 4)):
        assert rows[grid_index(bits)] == want, bits
    assert len(rows) == len(THRESHOLD_GRID)


def test_the_head_reads_fewer_slices_only_where_it_pays_within_the_band(checkpoint, monkeypatch):
    _, q = checkpoint
    ppl = {8.0: 10.0, 4.0: 12.0, 4.5: 10.8, 5.0: 10.25}  # low 1.2x max (band 1.25), mid 1.08x (1.10), high 1.025x
    saved = {k: head.byte_share_saved(q, 4.0, k) for k in (2, 3)}
    assert 0 < saved[3] < saved[2] < 1
    head_weights, layer_weights = head._weights(q)
    assert head_weights < layer_weights / 4  # the tiny model: half a bit more never reads fewer bytes, whatever the head
    planted = {4.0: {2: 1 + 0.8 * head.HEAD_PAYBACK * saved[2], 3: 1.001}, 4.5: {2: 1.05, 3: 1.001}, 5.0: {2: 1.001, 3: 1.001}}
    monkeypatch.setattr(head, "head_ratios", lambda qm, w, budgets, depths: {b: planted[b] for b in budgets})
    named, choice, report = head.decide(q, np.zeros((1, 8), np.int64), NAMED, ppl)
    assert named == NAMED
    # low: a 4-bit head costs 0.8 x HEAD_PAYBACK x the share of bytes it saves: it pays if it stays within the band
    low_within = 12.0 * planted[4.0][2] <= 1.25 * 10.0
    assert choice["low"] == (2 if low_within else 3)
    # mid: +5 % leaves the band (10.8 * 1.05 > 11); +0.1 % for 6 bits pays -> 3 slices
    assert choice["mid"] == 3 and not report["mid"]["by_bits"]["4.5"]["2"]["within_band"]
    # high: it would pay at 2 slices, but a higher budget never reads a smaller head than a lower one
    assert choice["high"] >= choice["mid"] and choice["max"] == 4


def test_a_name_at_the_edge_of_its_band_takes_more_bits_when_a_smaller_head_then_reads_less(checkpoint, monkeypatch):
    """Gemma-3-270M's case: the head is most of a step's bytes. mid's fewest bits in band (4.5) sit at the band's
    edge, so no head slice can go there; at 5 bits a 6-bit head stays in band and the step reads fewer bits in all."""
    _, q = checkpoint
    monkeypatch.setattr(head, "_weights", lambda qm: (168, 100))  # Gemma-3-270M: 168M head, 100M other weights
    ppl = {8.0: 10.0, 4.0: 12.0, 4.5: 10.99, 5.0: 10.6, 5.5: 10.2, 6.0: 10.05}
    named_in_band = {"max": 8.0, "low": 4.0, "mid": 4.5, "high": 5.5}  # bands: 12.5, 11, 10.3
    planted = {2: 1.12, 3: 1.005}  # a 4-bit head never pays (+12 % for at most 38 % fewer bytes), a 6-bit one does
    monkeypatch.setattr(head, "head_ratios", lambda qm, w, budgets, depths: {b: dict(planted) for b in budgets})
    named, choice, report = head.decide(q, np.zeros((1, 8), np.int64), named_in_band, ppl)
    assert named == {"max": 8.0, "low": 4.0, "mid": 5.0, "high": 5.5}
    assert choice == {"max": 4, "low": 3, "mid": 3, "high": 3}
    assert 10.99 * 1.005 > 1.10 * 10.0 and 10.6 * 1.005 <= 1.10 * 10.0  # why mid moved: in band at 5, not at 4.5
    assert 100 * 5.0 + 168 * 2 * 3 < 100 * 4.5 + 168 * 2 * 4  # ... and reads fewer bits there (1,508 < 1,794)
    assert report["mid"]["fewest_bits_in_band"] == 4.5 and report["mid"]["bits"] == 5.0
    assert head.budgets_to_measure(named_in_band, {8.0, 4.0, 4.5, 5.0, 5.5}, (3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 7.0)) == [6.0]


def test_a_head_that_follows_the_budget_exports_verifies_and_reads_fewer_slices(checkpoint, tmp_path, monkeypatch):
    path, q = checkpoint
    export(path, tmp_path / "full", context=128)
    chosen = {"low": 2, "mid": 3, "high": 4, "max": 4}
    monkeypatch.setattr(head, "decide", lambda qm, windows, named, ppl: (named, {n: chosen.get(n, 4) for n in named}, {}))
    export(path, tmp_path / "follows", context=128)  # verifies the constant head router against PyTorch or raises
    meta = json.loads((tmp_path / "follows" / "mobiq.json").read_text())
    named = meta["named_budgets"]
    assert meta["lm_head_slices_by_budget"] == {n: chosen.get(n, 4) for n in named}
    full = ModelSession(tmp_path / "full", threads=1, hold=False)
    follows = ModelSession(tmp_path / "follows", threads=1, hold=False)
    ids = np.array([[1, *np.random.default_rng(1).integers(3, 99, 15)]])
    for name, bits in named.items():
        a, _ = full.forward(ids, full.empty_cache(), bits)
        b, _ = follows.forward(ids, follows.empty_cache(), bits)
        same = np.array_equal(a, b)
        reads_all = bits >= named["max"] or all(chosen.get(n, 4) == 4 for n, b in named.items() if b == bits)
        assert same == reads_all, (name, bits)


def test_a_fixed_head_file_is_named_as_such_beside_another_mobiquant_file():
    from mobiquant.runtime.modelfile import FORMAT_VERSION
    from mobiquant.tools.bench import compare_label

    kv = {"kv_cache": {}, "routing": "token", "num_slices": 4, "format_version": FORMAT_VERSION}
    assert compare_label({**kv, "lm_head_slices_by_budget": {"low": 3, "max": 4}}) == "mobiquant-token"
    assert compare_label({**kv, "lm_head_slices_by_budget": {"low": 4, "max": 4}}) == "mobiquant-token-fixed-head"
    assert compare_label({**kv, "lm_head_slices_by_budget": {"low": 3}, "format_version": 4}) == "mobiquant-token-v4"
    assert compare_label({"routing": "static", "num_slices": 4, "format_version": FORMAT_VERSION}) == \
        "mobiquant-gqa-fixed-head"
