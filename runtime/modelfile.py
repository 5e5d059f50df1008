"""The exported model directory: what it holds and how it is recognised.

    DIR/model.onnx        decoder graph with KV cache (see exporter/graph.py)
    DIR/model.onnx.data   its tensors, page-aligned
    DIR/mobiq.json        format name and version, kind, budgets, context, tokens, and
                          "files": {name: {"size": bytes, "sha256": hex}} of every other file
    DIR/tokenizer.json    (+ tokenizer_config.json, chat_template.jinja, generation_config.json)

Unknown format versions are refused by name; a directory without mobiq.json is
not a MoBiQuant model. Every load compares the recorded sizes with the files (a
truncated or replaced file is one line naming it); :func:`verify_checksums`
(``mobiq-run MODEL --verify``) reads every byte against the recorded sha256.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FORMAT_NAME = "mobiquant-onnx"
# 5: KVAttention norms q and k itself (Gemma 3, Qwen3); 4: those norms as nodes, still run; 3: float32 cache and
# 2: SliceRouter nodes, refused
FORMAT_VERSION = 5
READ_VERSIONS = (4, 5)  # what this runtime runs: a version-4 graph is valid for today's op library
_READ = " or ".join(map(str, READ_VERSIONS))
MODEL_FILE, DATA_FILE, META_FILE = "model.onnx", "model.onnx.data", "mobiq.json"
RECORDED_FILES = (MODEL_FILE, DATA_FILE, "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                  "generation_config.json", "special_tokens_map.json")
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
        raise ModelFileError(f"[mobiq] format version expected {_READ}; got version {version} "
                             f"({RETIRED_VERSIONS[version]}), which this mobiquant no longer runs: re-export the "
                             f"model with `mobiq-export onnx`")
    if version not in READ_VERSIONS:
        raise ModelFileError(f"[mobiq] format version expected {_READ}; got unknown version "
                             f"{meta.get('format_version')!r} (update mobiquant or re-export the model)")
    if p.is_dir() and not (directory / MODEL_FILE).is_file():
        raise ModelFileError(f"[mobiq] {directory / MODEL_FILE} expected; got no such file")
    check_sizes(directory, meta)
    return ModelInfo(directory, meta, MODEL_FILE if p.is_dir() else p.name)


def _sha256(path: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
    return digest.hexdigest()


def record_files(directory: Path) -> dict[str, dict]:
    """The "files" entry of mobiq.json for what ``directory`` holds now (the exporter's last step)."""
    return {name: {"size": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
            for name in RECORDED_FILES if (directory / name).is_file()}


def _recorded(directory: Path, meta: dict) -> dict[str, dict]:
    files = meta.get("files")
    if files is None:
        return {}
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            and "/" not in k and k not in ("", ".", "..") for k, v in files.items()):
        raise ModelFileError(f"[mobiq] {directory / META_FILE}: \"files\" expected {{name: {{size, sha256}}}}; "
                             f"got a malformed entry")
    return files


def check_sizes(directory: Path, meta: dict) -> None:
    """ModelFileError naming the first recorded file that is missing or has another size."""
    for name, entry in _recorded(directory, meta).items():
        path = directory / name
        if not path.is_file():
            raise ModelFileError(f"[mobiq] {path} expected (recorded in {META_FILE}); got no such file")
        size = path.stat().st_size
        if size != entry["size"]:
            raise ModelFileError(f"[mobiq] {path}: expected {entry['size']:,} bytes as recorded in {META_FILE}; got "
                                 f"{size:,} (truncated or replaced: copy it again or re-export)")


def verify_checksums(info: ModelInfo, progress: Callable[[int], None] | None = None) -> list[str]:
    """One line per recorded file: "ok NAME" or "MISMATCH NAME ..."; raises ModelFileError when nothing is recorded."""
    files = _recorded(info.directory, info.meta)
    if not files:
        raise ModelFileError(f"[mobiq] {info.directory / META_FILE}: no checksums recorded (exported before they "
                             f"were); re-export with `mobiq-export onnx` to record them")
    lines = []
    for name, entry in files.items():
        got = _sha256(info.directory / name, progress)
        lines.append(f"ok       {name}" if got == entry["sha256"] else
                     f"MISMATCH {name}: sha256 {got[:16]}…, recorded {entry['sha256'][:16]}…")
    return lines


def total_recorded_bytes(info: ModelInfo) -> int:
    return sum(e["size"] for e in _recorded(info.directory, info.meta).values())
