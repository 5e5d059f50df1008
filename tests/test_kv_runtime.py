"""The KV cache precision as a session choice: fixed bits, ``auto`` on fake sysfs trees, a change between
generations (a kept prefix at another precision is recomputed, never read in the wrong format), and
mobiq-run --kv-bits. The tiny exported model (conftest ``tiny``), head size 16."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import fake_sysfs
from mobiquant.runtime import kvcache
from mobiquant.runtime.api import Model
from mobiquant.runtime.sampling import SamplingConfig
from mobiquant.runtime.session import ModelSession

GREEDY = SamplingConfig(repetition_penalty=1.0)


def cache_bits(model: Model) -> int:
    """The precision of the cache the last generation left, from its buffers' block size."""
    row = next(iter(model.prefix.cache.buffers.values())).shape[3]
    return next(b for b in kvcache.BITS if kvcache.block_bytes(b, model.session.head_dim) == row)


@pytest.mark.parametrize("bits", kvcache.BITS)
def test_fixed_precision_is_what_the_buffers_hold(tiny_model_dir, bits):
    model = Model.load(tiny_model_dir, threads=1, kv_bits=bits)
    gen = model.generate("hello there", budget="max", max_new_tokens=4, chat=False, sampling=GREEDY)
    list(gen)
    assert (gen.stats.kv_bits, gen.stats.kv_reason, cache_bits(model)) == (bits, "fixed", bits)
    assert gen.stats.kv_cache_bytes == model.prefix.cache.nbytes > 0


def test_logits_per_precision_against_a_float32_cache(tiny):
    """16 bits all but equal, 8 bits close, 4 bits further: the same prompt, decode steps included (the exact
    file: with int8 activations a tiny change of attention output flips roundings downstream)."""
    prompt = np.array([[1, *range(40, 70)]], np.int64)
    outs = {}
    for bits in kvcache.BITS:
        s = ModelSession(tiny[0].parent / "model-exact", threads=1, kv_bits=bits, hold=False)
        logits, cache = s.forward(prompt[:, :20], s.empty_cache(), 8.0)
        steps = [logits[0, -1]]
        for t in range(20, prompt.shape[1]):
            logits, cache = s.forward(prompt[:, t:t + 1], cache, 8.0)
            steps.append(logits[0, -1])
        outs[bits] = np.stack(steps)
    err = {b: np.abs(outs[b] - outs[32]).max() / np.abs(outs[32]).max() for b in (16, 8, 4)}
    assert err[16] < 1e-3 and err[8] < 3e-2 and err[4] < 0.3 and err[16] < err[8] < err[4], err


@pytest.mark.parametrize("tree,bits,why", [
    (dict(celsius=50.0, available_mb=4000.0), 8, "→ 8 bits"),
    (dict(celsius=50.0, available_mb=0.0), 4, "> 25% of 0 MB available → 4 bits"),
    (dict(celsius=80.0, available_mb=4000.0), 4, "CPU 80 °C ≥ 78 °C → 4 bits"),
])
def test_auto_follows_the_device_at_each_generation_start(tiny_model_dir, tmp_path, tree, bits, why):
    root = fake_sysfs.pi5(tmp_path, tree["celsius"], available_mb=tree["available_mb"])
    model = Model.load(tiny_model_dir, threads=1)
    model.set_kv_bits("auto", signals_root=root)
    gen = model.generate("hello there", budget="max", max_new_tokens=3, chat=False, sampling=GREEDY)
    list(gen)
    assert gen.stats.kv_bits == bits == cache_bits(model) and why in gen.stats.kv_reason, gen.stats.kv_reason


def test_a_kept_prefix_at_another_precision_is_recomputed(tiny_model_dir):
    model = Model.load(tiny_model_dir, threads=1, kv_bits=8)
    first = model.generate("one two three four", budget="max", max_new_tokens=3, chat=False, sampling=GREEDY)
    list(first)
    again = model.generate("one two three four five", budget="max", max_new_tokens=3, chat=False, sampling=GREEDY)
    list(again)
    assert again.stats.reused_tokens > 0  # same precision: the prefix is read from the cache
    model.set_kv_bits(4)
    changed = model.generate("one two three four five", budget="max", max_new_tokens=3, chat=False,
                             sampling=GREEDY)
    list(changed)
    assert changed.stats.reused_tokens == 0 and cache_bits(model) == 4
    fresh = Model.load(tiny_model_dir, threads=1, kv_bits=4)
    alone = fresh.generate("one two three four five", budget="max", max_new_tokens=3, chat=False, sampling=GREEDY)
    assert changed.text == "".join(alone)


def test_a_change_mid_generation_waits_for_the_next_one(tiny_model_dir):
    model = Model.load(tiny_model_dir, threads=1, kv_bits=8)
    gen = model.generate("one two three", budget="max", max_new_tokens=40, chat=False, sampling=GREEDY)
    next(gen)
    model.set_kv_bits(4)  # the running cache keeps its format, also when it grows
    list(gen)
    assert gen.stats.kv_bits == 8 and cache_bits(model) == 8


def test_bad_precisions_are_one_line_errors(tiny_model_dir):
    with pytest.raises(ValueError, match=r"\[kv\] cache bits expected one of 32, 16, 8, 4; got 6"):
        Model.load(tiny_model_dir, threads=1, kv_bits=6)
    r = subprocess.run([sys.executable, "-m", "mobiquant.runtime.cli", str(tiny_model_dir), "--kv-bits", "6", "-p",
                        "hi"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "invalid choice: '6'" in r.stderr


def test_cli_kv_bits_and_stats(tiny_model_dir):
    r = subprocess.run([sys.executable, "-m", "mobiquant.runtime.cli", str(tiny_model_dir), "--kv-bits", "4",
                        "--budget", "max", "-n", "4", "--raw", "-p", "hello", "--stats", "-v"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "[kv] cache 4 bits (fixed)" in r.stderr and "[stats] KV cache 4 bits (fixed)" in r.stderr, r.stderr
