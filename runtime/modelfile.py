"""The exported model directory: what it holds and how it is recognised.

    DIR/model.onnx        decoder graph with KV cache (see exporter/graph.py)
    DIR/model.onnx.data   its tensors, page-aligned
    DIR/mobiq.json        format name and version, kind, budgets, context, tokens
    DIR/tokenizer.json    (+ tokenizer_config.json, chat_template.jinja)

Unknown format versions are refused by name; a directory without mobiq.json is
not a MoBiQuant model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FORMAT_NAME = "mobiquant-onnx"
FORMAT_VERSION = 3  # 3: routers fused into ResidualSliceMatMul (2: SliceRouter nodes; refused)
MODEL_FILE, DATA_FILE, META_FILE = "model.onnx", "model.onnx.data", "mobiq.json"
RETIRED_VERSIONS = {1: "layout-1 slices", 2: "routers as separate SliceRouter nodes"}
NAMED_BUDGETS = {"low": 3.0, "mid": 4.0, "high": 6.0, "max": 8.0}


class ModelFileError(ValueError):
    """A path that is not a usable MoBiQuant model directory."""


@dataclass(frozen=True)
class ModelInfo:
    directory: Path
    meta: dict
    graph_file: str = MODEL_FILE  # the .onnx file in directory that was asked for

    @property
    def onnx_path(self) -> Path:
        return self.directory / self.graph_file

    @property
    def elastic(self) -> bool:
        """True for MoBiQuant files (a target_bits input); False for fp32/MatMulNBits baselines."""
        return self.meta.get("kind") == "mobiquant"

    @property
    def named_budgets(self) -> dict[str, float]:
        return dict(self.meta.get("named_budgets", NAMED_BUDGETS))

    @property
    def context(self) -> int:
        return int(self.meta["context"])


def locate(path: str | Path) -> ModelInfo:
    """The model directory of ``path`` (a directory, meaning its model.onnx, or one .onnx file in it), checked."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"[mobiq] model expected at {p}; got no such file or directory")
    if not p.is_dir() and p.suffix != ".onnx":
        raise ModelFileError(f"[mobiq] a model directory or its .onnx file expected; got {p}")
    directory = p if p.is_dir() else p.parent
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise ModelFileError(f"[mobiq] {p} is not a MoBiQuant model: expected {META_FILE} beside {MODEL_FILE}; "
                             f"got none (export one with `mobiq-export onnx`)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFileError(f"[mobiq] {meta_path}: unreadable ({e})") from e
    if meta.get("format") != FORMAT_NAME:
        raise ModelFileError(f"[mobiq] format expected {FORMAT_NAME!r}; got {meta.get('format')!r} in {meta_path}")
    version = meta.get("format_version")
    if version in RETIRED_VERSIONS:
        raise ModelFileError(f"[mobiq] format version expected {FORMAT_VERSION}; got version {version} "
                             f"({RETIRED_VERSIONS[version]}), which this mobiquant no longer runs: re-export the "
                             f"model with `mobiq-export onnx`")
    if version != FORMAT_VERSION:
        raise ModelFileError(f"[mobiq] format version expected {FORMAT_VERSION}; got unknown version "
                             f"{meta.get('format_version')!r} (update mobiquant or re-export the model)")
    if p.is_dir() and not (directory / MODEL_FILE).is_file():
        raise ModelFileError(f"[mobiq] {directory / MODEL_FILE} expected; got no such file")
    return ModelInfo(directory, meta, MODEL_FILE if p.is_dir() else p.name)
