"""The quantized checkpoint: packed slices, slice-1 parameters, routers, threshold tables.

``DIR/mobiq-checkpoint.json`` (format name, version, source-model identity, config,
which router feeds which linear) + ``DIR/weights.safetensors`` (tensors named
``<linear>.slices|scales|zero_points`` and ``<router>.fc1.weight`` ...). Float parts
(embeddings, norms) are not copied: they come from the source model, whose identity
is checked on load. Loading gives bit-identical outputs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mobiquant.runtime import format as F

from .qmodel import QuantizedModel, build_quantized

FORMAT = "mobiquant-checkpoint"
VERSION = 1
META_FILE, WEIGHTS_FILE = "mobiq-checkpoint.json", "weights.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that is missing, of another format or version, or does not fit its source model."""


@dataclass(frozen=True)
class CheckpointConfig:
    model: str  # registry name or HF folder
    source_identity: str  # sha256 identifying the source weights
    architecture: str
    num_slices: int
    group_size: int
    lm_head_slices: int
    recipe: str
    calibration: str

    def __post_init__(self):
        if not 1 <= self.num_slices <= F.MAX_SLICES:
            raise CheckpointError(f"[checkpoint] num_slices expected 1..{F.MAX_SLICES}; got {self.num_slices}")
        if not 1 <= self.lm_head_slices <= self.num_slices:
            raise CheckpointError(f"[checkpoint] lm_head_slices expected 1..{self.num_slices}; got {self.lm_head_slices}")


def save(qmodel: QuantizedModel, config: CheckpointConfig, out: Path, allocation: dict | None = None) -> Path:
    """Write the checkpoint; ``allocation`` (router sensitivity and order, see allocation.py) is kept as a record."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for name, lin in qmodel.linears.items():
        sw = lin.sliced
        tensors[f"{name}.slices"], tensors[f"{name}.scales"], tensors[f"{name}.zero_points"] = (
            sw.packed, sw.scales, sw.zero_points)
    for name, router in qmodel.routers.items():
        for key, value in router.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().cpu().numpy()
    meta = {"format": FORMAT, "version": VERSION, "layout": F.LAYOUT_VERSION, "config": asdict(config),
            "routers": {name: qmodel.routed_linears(name) for name in qmodel.routers}}
    if allocation is not None:
        meta["allocation"] = allocation
    tmp = out / (WEIGHTS_FILE + ".partial")
    save_file(tensors, str(tmp))
    tmp.replace(out / WEIGHTS_FILE)
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return out


def read_meta(path: Path) -> tuple[dict, CheckpointConfig]:
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"[checkpoint] {meta_path} expected; got no such file")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"[checkpoint] format expected {FORMAT!r}; got {meta.get('format')!r}")
    if meta.get("version") != VERSION or meta.get("layout") not in (1, F.LAYOUT_VERSION):
        raise CheckpointError(f"[checkpoint] version/layout expected {VERSION}/{F.LAYOUT_VERSION} (or layout 1, "
                              f"repacked on load; this exporter); "
                              f"got {meta.get('version')}/{meta.get('layout')}")
    return meta, CheckpointConfig(**meta["config"])


def load(path: Path, model: torch.nn.Module, source_identity: str) -> tuple[QuantizedModel, CheckpointConfig]:
    """Rebuild the quantized model from ``path`` on top of the float ``model`` it was made from."""
    from safetensors.numpy import load_file

    meta, config = read_meta(path)
    if config.source_identity != source_identity:
        raise CheckpointError(f"[checkpoint] source model expected identity {config.source_identity[:16]}… "
                              f"({config.model}); got {source_identity[:16]}…")
    tensors = load_file(str(path / WEIGHTS_FILE))
    names = [k[: -len(".slices")] for k in tensors if k.endswith(".slices")]
    sliced = {}
    for name in names:
        try:
            packed = tensors[f"{name}.slices"]
            if meta["layout"] == 1:
                packed = F.from_layout1(packed)
            sliced[name] = F.SlicedWeight(packed, tensors[f"{name}.scales"],
                                          tensors[f"{name}.zero_points"], config.group_size)
        except F.FormatError as e:
            raise CheckpointError(f"[checkpoint] {name}: {e}") from e
    try:
        qmodel = build_quantized(model, sliced, config.lm_head_slices)
    except (KeyError, F.FormatError) as e:
        raise CheckpointError(f"[checkpoint] does not fit the source model: {e}") from e
    for name, router in qmodel.routers.items():
        hidden = tensors[f"{name}.fc1.weight"].shape[0]
        if hidden != router.hidden:
            router.resize(hidden)
        # checkpoints from before per-router widths were recorded: each router reads the budget's bits
        state = {k: torch.from_numpy(tensors[f"{name}.{k}"]) for k in router.state_dict() if f"{name}.{k}" in tensors}
        router.load_state_dict({**router.state_dict(), **state})
    return qmodel, config
