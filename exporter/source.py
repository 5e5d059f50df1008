"""The float source model of a quantization: a registry name or a local Hugging Face folder."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from mobiquant.tools.models import ModelError, known_models, load_entry

from . import architectures

SUPPORTED_ARCHITECTURES = architectures.SUPPORTED


@dataclass(frozen=True)
class Source:
    name: str  # registry name, or the folder path
    folder: Path  # fp32 HF folder (config, weights, tokenizer)
    identity: str  # sha256 naming these exact weights
    architecture: str
    group_size: int  # default from the registry entry (64 for a plain folder)
    probe_windows: int = 1  # the fewest sensitivity-probe windows the registry entry asks for (1 for a plain folder)


def resolve(model: str) -> Source:
    """``model`` as a registry name (converted from its GGUF once) or a local HF folder."""
    import json

    path = Path(model)
    if path.is_dir():
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        arch = (config.get("architectures") or ["?"])[0]
        digest = hashlib.sha256()
        for f in sorted(path.glob("*.safetensors")):
            digest.update(f.read_bytes())
        source = Source(str(path), path, digest.hexdigest(), arch, 64)
    else:
        if model not in known_models():
            raise ModelError(f"[mobiq-export] model expected one of {', '.join(known_models())} or a Hugging Face "
                             f"folder; got {model!r}")
        from .convert import hf_folder

        entry = load_entry(model)
        source = Source(model, hf_folder(entry), entry.gguf_sha256, entry.architecture, entry.group_size,
                        entry.probe_windows)
    if source.architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelError(f"[mobiq-export] architecture expected one of {', '.join(SUPPORTED_ARCHITECTURES)}; "
                         f"got {source.architecture} ({model})")
    return source


def load_float_model(source: Source):
    """The float32 source model in eval mode, in the block structure the exporter builds (exporter/architectures.py)."""
    return architectures.load(source.folder, source.architecture)
