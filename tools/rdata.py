"""Read R lazy-load databases (``.rdx`` + ``.rdb``) and R's XDR serialization.

Standard library only, and only the part of the format that data packages use
for plain vectors (R Internals §1.8, ``src/main/serialize.c``):

* A serialization is ``"X\\n"``, then big-endian int32 format version (2 or 3),
  writer R version and minimal reader version; version 3 adds the native
  encoding as an int32 length plus bytes. Items follow, each led by an int32
  flags word: type in bits 0-7, object bit 8, has-attributes bit 9, has-tag
  bit 10, "levels" (a CHARSXP's encoding) in bits 12-27.
* ``.rdx`` is the index: a gzip file (an ``.rds``) holding a named list whose
  ``variables`` maps each object name to an integer pair (offset, length) into
  the ``.rdb``. Indices written as a framed entry (below) are read as well.
* Each ``.rdb`` entry is an int32 uncompressed length, then either a zlib
  stream, or a type byte (``'0'`` none, ``'1'`` zlib, ``'2'`` bzip2, ``'Z'`` xz)
  and the payload; decompressed, it is one serialization.

R values map to Python as: ``NULL`` -> ``None``; a symbol -> :class:`RSymbol`;
character, integer, logical, double and list vectors -> :class:`RVector` (a
``list`` with ``rtype`` and ``attributes``) whose NA elements are ``None``
(NA doubles stay NaN); strings are decoded by their mark (UTF-8, ASCII,
latin1, else the native encoding: the version-3 header's, UTF-8 in version 2),
"bytes" strings stay ``bytes``; a pairlist -> an ``RVector`` of rtype ``"pairlist"``
whose tags become its ``names`` attribute, as R's ``as.list`` does.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path


class RDataError(ValueError):
    """Bytes that are not (the supported subset of) an R serialization or lazy-load database."""


@dataclass(frozen=True)
class RSymbol:
    """An R symbol (SYMSXP), e.g. an attribute or list tag."""

    name: str


class RVector(list):
    """An R vector: its elements, R type name (``rtype``) and ``attributes`` (name -> value)."""

    def __init__(self, rtype: str, items: list, attributes: dict[str, object] | None = None) -> None:
        super().__init__(items)
        self.rtype = rtype
        self.attributes = attributes or {}

    @property
    def names(self) -> list[str | None] | None:
        names = self.attributes.get("names")
        return list(names) if names is not None else None

    def as_dict(self) -> dict[str | None, object]:
        """Elements keyed by ``names`` (which must exist)."""
        if self.names is None:
            raise RDataError(f"[RVector.as_dict] names attribute expected; got {sorted(self.attributes)}")
        return dict(zip(self.names, self))

    def __repr__(self) -> str:
        return f"RVector({self.rtype!r}, {list(self)!r}, {self.attributes!r})"


# SEXP type codes (Rinternals.h) and serialization pseudo-types (serialize.c).
SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 1, 2, 9, 10, 13, 14, 16, 19
REFSXP, NILVALUE_SXP = 255, 254
_VECTOR_TYPES = {LGLSXP: "logical", INTSXP: "integer", REALSXP: "double", STRSXP: "character", VECSXP: "list"}
_NA_INT = -(2**31)  # NA_integer_ and NA_logical
# CHARSXP encoding bits in "levels".
_BYTES, _LATIN1, _UTF8, _ASCII = 1 << 1, 1 << 2, 1 << 3, 1 << 6


class _Reader:
    """One XDR serialization, read front to back; ``refs`` is the reference table (symbols here)."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.refs: list[object] = []
        self.native_encoding = "utf-8"

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise RDataError(f"[unserialize] {n} more bytes expected at offset {self.pos}; got {len(self.data) - self.pos}")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def int32(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int32()
        if n == -1:  # long vector: upper and lower 32 bits follow
            upper, lower = struct.unpack(">II", self.take(8))
            n = (upper << 32) | lower
        if n < 0:
            raise RDataError(f"[unserialize] vector length expected >= 0; got {n} at offset {self.pos - 4}")
        return n

    def header(self) -> None:
        fmt = bytes(self.take(2))
        if fmt != b"X\n":
            raise RDataError(f"[unserialize] XDR format 'X\\n' expected; got {fmt!r}")
        version = self.int32()
        self.take(8)  # writer R version, minimal reader R version
        if version == 3:
            self.native_encoding = _python_codec(bytes(self.take(self.int32())).decode("ascii"))
        elif version != 2:
            raise RDataError(f"[unserialize] serialization version 2 or 3 expected; got {version}")

    def item(self) -> object:
        flags = self.int32()
        kind, levels = flags & 0xFF, flags >> 12
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind == NILVALUE_SXP:
            return None
        if kind == REFSXP:
            index = (flags >> 8) or self.int32()  # 1-based; packed in the flags when small
            if not 1 <= index <= len(self.refs):
                raise RDataError(f"[unserialize] reference 1..{len(self.refs)} expected; got {index}")
            return self.refs[index - 1]
        if kind == SYMSXP:
            name = self.item()
            if not isinstance(name, str):
                raise RDataError(f"[unserialize] symbol name expected; got {name!r}")
            symbol = RSymbol(name)
            self.refs.append(symbol)
            return symbol
        if kind == LISTSXP:
            return self.pairlist(has_attr, has_tag)
        if kind == CHARSXP:
            return self.charsxp(levels)
        if kind in _VECTOR_TYPES:
            items = self.vector(kind)
            attributes = self.attributes() if has_attr else {}
            return RVector(_VECTOR_TYPES[kind], items, attributes)
        raise RDataError(f"[unserialize] supported SEXP type expected (NULL, symbol, pairlist, character, "
                         f"logical, integer, double, list); got type {kind} at offset {self.pos - 4}")

    def pairlist(self, has_attr: bool, has_tag: bool) -> RVector:
        # Cells chain through CDR; walk them iteratively so long pairlists do not recurse.
        values: list[object] = []
        tags: list[str | None] = []
        attributes: dict[str, object] = {}
        while True:
            if has_attr:
                cell_attributes = self.attributes()
                if not values:
                    attributes = cell_attributes
            tag = self.item() if has_tag else None
            tags.append(tag.name if isinstance(tag, RSymbol) else None)
            values.append(self.item())
            flags = self.int32()
            if flags & 0xFF == NILVALUE_SXP:
                break
            if flags & 0xFF != LISTSXP:
                raise RDataError(f"[unserialize] pairlist tail expected (pairlist or NULL); got type {flags & 0xFF}")
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if any(t is not None for t in tags):
            attributes = {"names": RVector("character", tags), **attributes}
        return RVector("pairlist", values, attributes)

    def attributes(self) -> dict[str, object]:
        attrs = self.item()
        if not isinstance(attrs, RVector) or attrs.rtype != "pairlist":
            raise RDataError(f"[unserialize] attribute pairlist expected; got {attrs!r}")
        return dict(zip(attrs.names or [], attrs))

    def charsxp(self, levels: int) -> str | bytes | None:
        n = self.int32()
        if n == -1:
            return None  # NA_character_
        raw = bytes(self.take(n))
        if levels & _BYTES:
            return raw
        encoding = "latin-1" if levels & _LATIN1 else "utf-8" if levels & (_UTF8 | _ASCII) else self.native_encoding
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError as e:
            raise RDataError(f"[unserialize] {encoding} string expected at offset {self.pos - n}; got {e}") from None

    def vector(self, kind: int) -> list:
        n = self.length()
        if kind in (STRSXP, VECSXP):
            return [self.item() for _ in range(n)]
        if kind == REALSXP:
            return list(struct.unpack(f">{n}d", self.take(8 * n)))
        ints = struct.unpack(f">{n}i", self.take(4 * n))
        if kind == LGLSXP:
            return [None if v == _NA_INT else bool(v) for v in ints]
        return [None if v == _NA_INT else v for v in ints]


def _python_codec(r_encoding: str) -> str:
    """Python's codec for an R native encoding name (``"UTF-8"``, ``"latin1"``, ``"CP1252"`` ...)."""
    name = {"latin1": "latin-1", "": "utf-8"}.get(r_encoding, r_encoding)
    try:
        return codecs.lookup(name).name
    except LookupError:
        raise RDataError(f"[unserialize] native encoding known to Python expected; got {r_encoding!r}") from None


def unserialize(data: bytes) -> object:
    """The R value in one XDR serialization (``"X\\n"`` + version 2 or 3 header + item)."""
    reader = _Reader(data)
    reader.header()
    value = reader.item()
    if reader.pos != len(data):
        raise RDataError(f"[unserialize] end of data expected after the value; got {len(data) - reader.pos} bytes more")
    return value


def decompress_entry(blob: bytes) -> bytes:
    """The payload of one ``.rdb`` entry: int32 length, then zlib, or a type byte and payload."""
    if len(blob) < 5:
        raise RDataError(f"[decompress_entry] at least 5 bytes expected; got {len(blob)}")
    size = struct.unpack(">I", blob[:4])[0]
    kind, body = blob[4:5], blob[5:]
    try:
        if kind == b"0":
            data = body
        elif kind == b"1":
            data = zlib.decompress(body)
        elif kind == b"2":
            data = bz2.decompress(body)
        elif kind == b"Z":
            data = lzma.decompress(body)
        else:
            data = zlib.decompress(blob[4:])
    except (zlib.error, OSError, lzma.LZMAError) as e:
        raise RDataError(f"[decompress_entry] a valid compressed stream expected; got {e}") from None
    if len(data) != size:
        raise RDataError(f"[decompress_entry] {size} bytes expected after decompression; got {len(data)}")
    return data


def read_rds(blob: bytes) -> object:
    """The value in an ``.rds``/``.rdx`` file's bytes: gzip, plain, or a framed compressed entry."""
    if blob[:2] == b"\x1f\x8b":
        blob = gzip.decompress(blob)
    return unserialize(blob if blob[:2] == b"X\n" else decompress_entry(blob))


class LazyLoadDB:
    """An R lazy-load database, given its path without extension (``.../data/Rdata``)."""

    def __init__(self, base: Path | str) -> None:
        base = Path(base)
        self.rdb = base.with_suffix(".rdb")
        index = read_rds(base.with_suffix(".rdx").read_bytes())
        if not isinstance(index, RVector) or "variables" not in (index.names or []):
            raise RDataError(f"[LazyLoadDB] {base}.rdx: a list with 'variables' expected; got {index!r:.200}")
        self.variables: dict[str, tuple[int, int]] = {
            name: (int(pos[0]), int(pos[1])) for name, pos in index.as_dict()["variables"].as_dict().items()}

    def load(self, name: str) -> object:
        """The R object stored under ``name``."""
        if name not in self.variables:
            raise RDataError(f"[LazyLoadDB] object expected one of {', '.join(sorted(self.variables))}; got {name!r}")
        offset, length = self.variables[name]
        with open(self.rdb, "rb") as f:
            f.seek(offset)
            blob = f.read(length)
        return unserialize(decompress_entry(blob))


__all__ = ["LazyLoadDB", "RDataError", "RSymbol", "RVector", "decompress_entry", "read_rds", "unserialize"]
