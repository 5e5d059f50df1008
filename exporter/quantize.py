"""The quantize run: float source -> calibration -> sliced model -> fitted thresholds -> checkpoint.

``quantize("smollm2-135m", Path("models/smollm2-135m/checkpoint"))`` is what
``mobiq-export quantize`` calls (``refit_thresholds``: ``mobiq-export thresholds``).
Block progress is saved in ``<out>.work/`` and the run resumes from there; the work
dir is removed once the checkpoint is written.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mobiquant.runtime import format as F

from mobiquant.runtime import ops

from . import allocation as A
from . import memory
from . import token_routing as TR
from . import checkpoint as ckpt
from .blockwise import WorkDir, calibration_windows
from .calibrate import Calibrated, Recipe, calibrate_model, get_recipe, recipe_dict, resolve_device
from .qmodel import THRESHOLD_GRID, QuantizedModel, build_quantized, slice_model
from .routing_choice import keep_better_rows, validation_windows
from .thresholds import fit_thresholds_online, record_widths


def calibration_tokens(tokenizer, calib: str, recipe: Recipe) -> torch.Tensor:
    """Windows of the calibration corpus (a name from runtime.corpora or a text file)."""
    from mobiquant.tools.corpora import load_corpus

    ids = tokenizer(load_corpus(calib))["input_ids"]
    return calibration_windows(ids, tokenizer.bos_token_id, recipe.samples, recipe.seq_len)


def threshold_tokens(tokenizer, calib: str, recipe: Recipe) -> torch.Tensor:
    """Windows for threshold fitting: interleaved with (not equal to) the calibration windows."""
    from mobiquant.tools.corpora import load_corpus

    ids = tokenizer(load_corpus(calib))["input_ids"]
    shift = len(ids) // (2 * recipe.samples)
    return calibration_windows(ids[shift:], tokenizer.bos_token_id, recipe.threshold_samples, recipe.threshold_seq_len)


def assemble(model: torch.nn.Module, cal: Calibrated, group_size: int, num_slices: int,
             lm_head_slices: int | None = None) -> QuantizedModel:
    """Slice ``model`` (in place) with the calibrated parameters and load the trained routers."""
    sliced = slice_model(model, group_size, num_slices, cal.params)
    qmodel = build_quantized(model, sliced, lm_head_slices)
    for name, router in qmodel.routers.items():
        router.load_state_dict({**router.state_dict(), **{k: v for k, v in cal.routers[name].items() if k != "thresholds"}})
    return qmodel


def fit_budgets(qmodel: QuantizedModel, tokens: torch.Tensor, recipe: Recipe, progress: bool = True,
                log=None, cache: Path | None = None, validation: dict[str, torch.Tensor] | None = None) -> dict | None:
    """Routers, per-router allocation and every threshold table, from ``tokens`` (the threshold windows).

    The first ``recipe.sensitivity_samples`` windows probe each router's per-token sensitivity. With
    ``recipe.routing == "token"`` every router is refitted to rank its tokens by it and, below the base
    (above it too with ``recipe.token_above_base``), the allocation follows the routers' held-out cost
    curves; otherwise it uses each router's mean (one fractional router per budget). Each router's width at every grid row is recorded in the router.
    ``cache``: a file keeping the probe's per-token KL for these slices and tokens (a refit then skips it).
    ``validation``: windows per text on which, below the base, each budget keeps token routing only where its mean
    log-PPL over the texts is no higher than the static allocation's (:mod:`.routing_choice`; token routing with
    ``recipe.check_routing``).
    Returns what the checkpoint records about the allocation (or None when nothing is probed)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if recipe.routing not in ("token", "static"):
        raise ValueError(f"[quantize] routing expected 'token' or 'static'; got {recipe.routing!r}")
    allocation, record, token_curves, static_allocation = None, None, False, None
    if recipe.sensitivity_samples:
        t = time.time()
        token = recipe.routing == "token"
        probe = A.cached_token_sensitivity(qmodel, tokens[: recipe.sensitivity_samples], cache, inputs=token,
                                           progress=progress)
        sensitivity = {name: float(kl.mean()) for name, kl in probe.kl.items()}
        sizes = A.router_sizes(qmodel)
        log(f"[quantize] per-token sensitivity of {len(sensitivity)} routers on {len(probe.positions)} tokens "
            f"in {time.time() - t:.0f}s ({memory.summary()})")
        record = {"base_bits": A.BASE_BITS, "routing": recipe.routing, "sensitivity": sensitivity,
                  "order": A.allocation_order(sensitivity, sizes)}
        if token:
            t = time.time()
            fits = TR.fit_routers(qmodel.routers, probe, recipe.router_fit, recipe.router_hidden,
                                  device=next(qmodel.model.parameters()).device)
            curves = {name: f.curve for name, f in fits.items()}
            rho = np.array([f.spearman for f in fits.values()])
            half = np.array([f.half_ratio for f in fits.values()])
            record.update(router_fit=recipe.router_fit, token_above_base=recipe.token_above_base,
                          spearman={n: f.spearman for n, f in fits.items()},
                          half_ratio={n: f.half_ratio for n, f in fits.items()})
            log(f"[quantize] {len(fits)} {recipe.router_fit} routers fitted in {time.time() - t:.0f}s; held-out "
                f"rank correlation with per-token KL median {np.median(rho):.2f} (range {rho.min():.2f}..{rho.max():.2f}); "
                f"KL of the half each sends to 2 bits / a fixed half: median {np.median(half):.2f}")
        static = {name: A.CostCurve.static(v) for name, v in sensitivity.items()}
        down = curves if token else static
        up = curves if token and recipe.token_above_base else static
        max_bits = F.SLICE_BITS * next(iter(qmodel.routers.values())).num_slices
        allocation = (lambda bits: A.allocate(down if bits < A.BASE_BITS else up, sizes, bits, max_bits=max_bits))
        static_allocation = (lambda bits: A.allocate(static, sizes, bits, max_bits=max_bits))
        token_curves = token
    for router in qmodel.routers.values():  # thresholds from the scores the file computes (int8 hidden weights)
        router.int8()
    t = time.time()
    measured = fit_thresholds_online(qmodel, tokens, recipe.threshold_anchors, allocation)
    record_widths(qmodel, allocation)
    log(f"[quantize] thresholds fitted in {time.time() - t:.0f}s; average bits at the anchors: "
        + ", ".join(f"{a:g}->{b:.3f}" for a, b in measured.items()) + f" ({memory.summary()})")
    if token_curves and recipe.check_routing and validation is not None:
        t = time.time()
        record["routing_by_budget"] = keep_better_rows(qmodel, tokens, recipe.threshold_anchors, static_allocation,
                                                       validation, log)
        log(f"[quantize] token or static routing chosen per budget in {time.time() - t:.0f}s ({memory.summary()})")
    if record is not None:
        record["token_dependent"] = token_dependent_fraction(qmodel)
    return record


def token_dependent_fraction(qmodel: QuantizedModel) -> dict[str, float]:
    """Per grid row ("bits"): the fraction of routers whose row has a threshold tokens can cross."""
    never = ops.THRESHOLD_NEVER / 10  # the op's rule: |tau| >= 1e29 is never/always
    tables = torch.stack([r.thresholds for r in qmodel.routers.values()])  # [R, G, S-1]
    dependent = (tables.abs() < never).any(-1).float().mean(0)
    return {f"{b:g}": round(float(v), 4) for b, v in zip(THRESHOLD_GRID, dependent)}


def model_recipe(name: str, source, overrides: dict) -> Recipe:
    """Recipe ``name`` with ``overrides``; unless they set it, at least as many probe windows as ``source``'s
    registry entry asks for (models/gemma3-270m/model.toml: 4)."""
    recipe = get_recipe(name, **overrides)
    if "sensitivity_samples" in overrides:
        return recipe
    return replace(recipe, sensitivity_samples=max(recipe.sensitivity_samples, source.probe_windows))


def quantize(model: str, out: Path, recipe_name: str = "fast", calib: str = "austen-train",
             num_slices: int = F.DEFAULT_NUM_SLICES, group_size: int | None = None, progress: bool = True,
             recipe_overrides: dict | None = None, log=None,
             device: str | None = None) -> tuple[QuantizedModel, ckpt.CheckpointConfig]:
    from transformers import AutoTokenizer

    from .source import load_float_model, resolve

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.time()
    source = resolve(model)
    group_size = group_size or source.group_size
    recipe = model_recipe(recipe_name, source, recipe_overrides or {})
    if recipe.depth_weights and len(recipe.depth_weights) != num_slices:
        recipe = replace(recipe, depth_weights=(1.0,) * num_slices)
    device = resolve_device(device, recipe)
    float_model = load_float_model(source)
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    # refuse layers the format cannot take before spending any time on calibration
    from .blockwise import CalibrationError
    from .qmodel import ROUTED_GROUPS, decoder_layers
    bad = []
    for i, layer in enumerate(decoder_layers(float_model)):
        for names in ROUTED_GROUPS.values():
            for name in names:
                k = layer.get_submodule(name).in_features
                if k % group_size:
                    bad.append(f"layers.{i}.{name} (K={k})")
    if bad:
        fits = [g for g in (32, 64, 128, 256) if all(int(b.split("K=")[1][:-1]) % g == 0 for b in bad)]
        raise CalibrationError(f"[quantize] group size {group_size} does not divide K of {len(bad)} layers: "
                               f"{', '.join(bad[:6])}{' …' if len(bad) > 6 else ''} (sizes that fit: {fits})")
    tokens = calibration_tokens(tokenizer, calib, recipe)
    fit_tokens = threshold_tokens(tokenizer, calib, recipe)
    validation = validation_windows(tokenizer)
    del tokenizer  # a 262k vocabulary's tokenizer holds ~300 MB
    log(f"[quantize] {source.name}: {len(decoder_layers(float_model))} blocks, group size {group_size}, "
        f"{num_slices} slices, recipe {recipe.name}, calibration {calib} ({tokens.shape[0]} x {tokens.shape[1]} tokens), "
        f"device {device}")
    work = WorkDir(out.parent / (out.name + ".work"),
                   {"source": source.identity, "recipe": recipe_dict(recipe), "calib": calib,
                    "group_size": group_size, "num_slices": num_slices})
    float_model.to(device)
    cal = calibrate_model(float_model, tokens.to(device), recipe, group_size, num_slices, work, progress)
    float_model.to("cpu")
    qmodel = assemble(float_model, cal, group_size, num_slices)
    qmodel.model.to(device)
    out.mkdir(parents=True, exist_ok=True)  # the probe's per-token KL is kept beside the checkpoint for refits
    allocation = fit_budgets(qmodel, fit_tokens.to(device), recipe, progress, log, cache=out / A.PROBE_CACHE,
                             validation=validation)
    qmodel.model.to("cpu")
    config = ckpt.CheckpointConfig(model=source.name, source_identity=source.identity,
                                   architecture=source.architecture, num_slices=num_slices, group_size=group_size,
                                   lm_head_slices=num_slices, recipe=recipe.name, calibration=calib)
    ckpt.save(qmodel, config, out, allocation)
    shutil.rmtree(work.path, ignore_errors=True)
    log(f"[quantize] wrote {out} in {time.time() - t0:.0f}s ({memory.summary()})")
    return qmodel, config


def refit_thresholds(path: Path, per_router: bool = True, progress: bool = True, log=None,
                     device: str | None = None, **overrides) -> None:
    """Refit routers (token routing), allocation and threshold tables of the checkpoint at ``path`` in
    place (its recipe and calibration text; ``overrides`` change recipe fields, e.g. routing="static").

    ``per_router``: the sensitivity allocation (the recipe's windows); False: every router reads b bits."""
    from transformers import AutoTokenizer

    from .source import load_float_model, resolve

    _, config = ckpt.read_meta(path)
    source = resolve(config.model)
    qmodel, _ = ckpt.load(path, load_float_model(source), source.identity)
    recipe = model_recipe(config.recipe, source, {**overrides, **({} if per_router else {"sensitivity_samples": 0})})
    device = resolve_device(device, recipe)
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    tokens = threshold_tokens(tokenizer, config.calibration, recipe)
    qmodel.model.to(device)
    allocation = fit_budgets(qmodel, tokens.to(device), recipe, progress, log, cache=path / A.PROBE_CACHE,
                             validation=validation_windows(tokenizer))
    qmodel.model.to("cpu")
    ckpt.save(qmodel, config, path, allocation)
