"""Shared fixtures: one tiny random Llama exported once per test session (two files: int8 and exact activations)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(exported model directory, the PyTorch quantized model it was exported from)."""
    import torch

    from mobiquant.exporter import checkpoint as ckpt
    from mobiquant.exporter.onnx_export import export
    from mobiquant.exporter.qmodel import build_quantized, slice_model
    from mobiquant.exporter.source import load_float_model, resolve
    from mobiquant.exporter.thresholds import fit_thresholds
    from tiny_llama import write_tiny_llama

    root = tmp_path_factory.mktemp("tiny")
    source = resolve(str(write_tiny_llama(root / "hf")))
    model = load_float_model(source)
    q = build_quantized(model, slice_model(model, 64))
    rng = np.random.default_rng(0)
    fit_thresholds(q, [torch.from_numpy(rng.integers(3, 99, (2, 64)))])
    config = ckpt.CheckpointConfig(source.name, source.identity, source.architecture, 4, 64, 4, "minmax", "random")
    ckpt.save(q, config, root / "checkpoint")
    export(root / "checkpoint", root / "model", context=128)  # verifies against PyTorch or raises
    export(root / "checkpoint", root / "model-exact", context=128, accuracy_level=0)
    return root / "model", q


@pytest.fixture(scope="session")
def tiny_model_dir(tiny) -> Path:
    return tiny[0]


@pytest.fixture(scope="session")
def dist(tmp_path_factory) -> dict[str, Path]:
    """make wheels into a temporary folder: {"sdist" | "x86_64" | "aarch64": path}."""
    from mobiquant.tools import wheels

    built = wheels.build_all(tmp_path_factory.mktemp("dist"))
    return {("sdist" if p.name.endswith(".tar.gz") else "aarch64" if p.name.endswith("_aarch64.whl") else "x86_64"
             if p.name.endswith("_x86_64.whl") else p.name): p for p in built}
