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
from pathlib import Path

import torch

from mobiquant.runtime import format as F

from . import allocation as A
from . import checkpoint as ckpt
from .blockwise import WorkDir, calibration_windows
from .calibrate import Calibrated, Recipe, calibrate_model, get_recipe, recipe_dict
from .qmodel import QuantizedModel, build_quantized, slice_model
from .thresholds import fit_thresholds_online


def calibration_tokens(tokenizer, calib: str, recipe: Recipe) -> torch.Tensor:
    """Windows of the calibration corpus (a name from runtime.corpora or a text file)."""
    from mobiquant.runtime.corpora import load_corpus

    ids = tokenizer(load_corpus(calib))["input_ids"]
    return calibration_windows(ids, tokenizer.bos_token_id, recipe.samples, recipe.seq_len)


def threshold_tokens(tokenizer, calib: str, recipe: Recipe) -> torch.Tensor:
    """Windows for threshold fitting: interleaved with (not equal to) the calibration windows."""
    from mobiquant.runtime.corpora import load_corpus

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
                log=None) -> dict | None:
    """Per-router allocation (when the recipe measures sensitivity), then every threshold table.

    ``tokens`` are the threshold windows; the first ``recipe.sensitivity_samples`` of them
    measure sensitivity. Returns what the checkpoint records about the allocation (or None)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    allocation, record = None, None
    if recipe.sensitivity_samples:
        t = time.time()
        sensitivity = A.router_sensitivity(qmodel, tokens[: recipe.sensitivity_samples], progress=progress)
        sizes = A.router_sizes(qmodel)
        order = A.allocation_order(sensitivity, sizes)
        max_bits = F.SLICE_BITS * next(iter(qmodel.routers.values())).num_slices
        allocation = (lambda bits: A.allocate(sensitivity, sizes, bits, max_bits=max_bits))
        record = {"base_bits": A.BASE_BITS, "order": order, "sensitivity": sensitivity}
        log(f"[quantize] router sensitivity measured in {time.time() - t:.0f}s; first to read 2 bits: "
            + ", ".join(order[:4]))
    t = time.time()
    measured = fit_thresholds_online(qmodel, tokens, recipe.threshold_anchors, allocation)
    log(f"[quantize] thresholds fitted in {time.time() - t:.0f}s; average bits at the anchors: "
        + ", ".join(f"{a:g}->{b:.3f}" for a, b in measured.items()))
    return record


def quantize(model: str, out: Path, recipe_name: str = "fast", calib: str = "austen-train",
             num_slices: int = F.DEFAULT_NUM_SLICES, group_size: int | None = None, progress: bool = True,
             recipe_overrides: dict | None = None, log=None) -> tuple[QuantizedModel, ckpt.CheckpointConfig]:
    from transformers import AutoTokenizer

    from .source import load_float_model, resolve

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.time()
    source = resolve(model)
    group_size = group_size or source.group_size
    recipe = get_recipe(recipe_name, **(recipe_overrides or {}))
    if recipe.depth_weights and len(recipe.depth_weights) != num_slices:
        recipe = get_recipe(recipe_name, **{**(recipe_overrides or {}), "depth_weights": (1.0,) * num_slices})
    torch.set_num_threads(min(torch.get_num_threads(), 2)) if recipe.device == "cpu" else None
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
    log(f"[quantize] {source.name}: {len(decoder_layers(float_model))} blocks, group size {group_size}, "
        f"{num_slices} slices, recipe {recipe.name}, calibration {calib} ({tokens.shape[0]} x {tokens.shape[1]} tokens)")
    work = WorkDir(out.parent / (out.name + ".work"),
                   {"source": source.identity, "recipe": recipe_dict(recipe), "calib": calib,
                    "group_size": group_size, "num_slices": num_slices})
    device = torch.device(recipe.device)
    float_model.to(device)
    cal = calibrate_model(float_model, tokens.to(device), recipe, group_size, num_slices, work, progress)
    float_model.to("cpu")
    qmodel = assemble(float_model, cal, group_size, num_slices)
    allocation = fit_budgets(qmodel, threshold_tokens(tokenizer, calib, recipe), recipe, progress, log)
    config = ckpt.CheckpointConfig(model=source.name, source_identity=source.identity,
                                   architecture=source.architecture, num_slices=num_slices, group_size=group_size,
                                   lm_head_slices=num_slices, recipe=recipe.name, calibration=calib)
    ckpt.save(qmodel, config, out, allocation)
    shutil.rmtree(work.path, ignore_errors=True)
    log(f"[quantize] wrote {out} in {time.time() - t0:.0f}s")
    return qmodel, config


def refit_thresholds(path: Path, per_router: bool = True, progress: bool = True, log=None) -> None:
    """Refit the threshold tables of the checkpoint at ``path`` in place (its recipe and calibration text).

    ``per_router``: the sensitivity allocation (the recipe's windows); False: every router reads b bits."""
    from transformers import AutoTokenizer

    from .source import load_float_model, resolve

    _, config = ckpt.read_meta(path)
    source = resolve(config.model)
    qmodel, _ = ckpt.load(path, load_float_model(source), source.identity)
    recipe = get_recipe(config.recipe, **({} if per_router else {"sensitivity_samples": 0}))
    tokens = threshold_tokens(AutoTokenizer.from_pretrained(source.folder), config.calibration, recipe)
    allocation = fit_budgets(qmodel, tokens, recipe, progress, log)
    ckpt.save(qmodel, config, path, allocation)
