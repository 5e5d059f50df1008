"""``make wheels``: an sdist, a linux x86_64 wheel and a linux aarch64 wheel in ``dist/``.

The package is Python plus one shared library, ``mobiquant/runtime/libmobiq_ops.so``, that ONNX Runtime loads
(no Python C API): each wheel is ``py3-none-<platform>``, for every CPython >= 3.11. The x86_64 library is built
by the package build (scikit-build-core); the aarch64 one is cross-built here with Debian's
``g++-aarch64-linux-gnu`` (NEON and NEON-dotprod kernels both inside, picked at run time) and put into a copy
of the x86_64 wheel, retagged, with its RECORD rewritten. Both libraries link libstdc++ and libgcc statically,
so they need only glibc; ``auditwheel show`` names the manylinux policy each one meets (built on Debian 12:
``manylinux_2_36``, i.e. glibc >= 2.36 as on Raspberry Pi OS bookworm) and the wheel is tagged with it.
Installing a wheel needs no compiler, headers or network beyond PyPI.

    python -m mobiquant.tools.wheels [--out dist]
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .fetch import ort_headers

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = "mobiquant/runtime/libmobiq_ops.so"
ELF_MACHINES = {62: "x86_64", 183: "aarch64"}  # e_machine: EM_X86_64, EM_AARCH64


class WheelError(RuntimeError):
    """A step of the wheel build failed."""


def _run(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd)
    if proc.returncode != 0:
        raise WheelError(f"[wheels] {' '.join(map(str, cmd[:4]))} ... failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout + proc.stderr


def elf_machine(data: bytes) -> str:
    """The architecture of an ELF shared object's bytes."""
    if data[:4] != b"\x7fELF":
        raise WheelError("[wheels] an ELF file expected")
    return ELF_MACHINES.get(int.from_bytes(data[18:20], "little"), "unknown")


def _record_line(name: str, data: bytes) -> list[str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [name, f"sha256={digest}", str(len(data))]


def retag(wheel: Path, platform: str, out_dir: Path, library: Path | None = None) -> Path:
    """A copy of ``wheel`` with ``platform`` as its platform tag and, if given, ``library`` as its op library
    (WHEEL and RECORD rewritten, the file renamed)."""
    name, version, py, abi, _ = wheel.name[:-4].split("-")
    target = out_dir / f"{name}-{version}-{py}-{abi}-{platform}.whl"
    with zipfile.ZipFile(wheel) as src:
        files = {info.filename: src.read(info) for info in src.infolist()}
    if library is not None:
        files[LIBRARY] = library.read_bytes()
    dist_info = next(n.split("/")[0] for n in files if n.endswith(".dist-info/WHEEL"))
    wheel_meta = files[f"{dist_info}/WHEEL"].decode()
    files[f"{dist_info}/WHEEL"] = re.sub(r"(?m)^Tag: .*$", f"Tag: {py}-{abi}-{platform}", wheel_meta).encode()
    record_name = f"{dist_info}/RECORD"
    rows = [_record_line(n, data) for n, data in files.items() if n != record_name] + [[record_name, "", ""]]
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    files[record_name] = text.getvalue().encode()
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for n, data in files.items():
            info = zipfile.ZipInfo(n, date_time=(2026, 1, 1, 0, 0, 0))
            info.external_attr = (0o755 if n.endswith(".so") else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(info, data)
    return target


def cross_build_aarch64(build_dir: Path) -> Path:
    """libmobiq_ops.so for aarch64 (Release, libstdc++ static)."""
    if shutil.which("aarch64-linux-gnu-g++") is None:
        raise WheelError("[wheels] aarch64-linux-gnu-g++ expected on PATH; got none (`make setup` installs it)")
    cmake = shutil.which("cmake", path=str(Path(sys.executable).parent)) or shutil.which("cmake") or "cmake"
    _run([cmake, "-S", str(ROOT / "custom_ops"), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
          f"-DCMAKE_TOOLCHAIN_FILE={ROOT / 'custom_ops/cmake/aarch64-linux-gnu.cmake'}",
          f"-DMOBIQ_ORT_INCLUDE_DIR={ort_headers()}"])
    _run([cmake, "--build", str(build_dir), "--target", "mobiq_ops", "--parallel"])
    return build_dir / "libmobiq_ops.so"


def manylinux_tag(wheel: Path) -> tuple[str, str]:
    """(the platform tag ``auditwheel show`` finds ``wheel`` consistent with, its whole report)."""
    report = " ".join(_run([sys.executable, "-m", "auditwheel", "show", str(wheel)]).split())
    found = re.search(r'consistent with the following platform tag: "(manylinux_\d+_\d+_\w+)"', report)
    if not found:
        raise WheelError(f"[wheels] {wheel.name}: auditwheel names no manylinux policy: {report}")
    return found.group(1), report


def build_all(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("mobiquant-*.whl"), *out.glob("mobiquant-*.tar.gz")]:
        old.unlink()
    env = {"MOBIQ_ORT_INCLUDE_DIR": str(ort_headers())}
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        print("[wheels] sdist and x86_64 wheel (scikit-build-core)", file=sys.stderr, flush=True)
        _run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "-o", str(stage),
              "-Cbuild-dir=build/wheel-x86_64", str(ROOT)], env=env)
        sdist = next(stage.glob("*.tar.gz"))
        x86 = next(stage.glob("*.whl"))
        if not x86.name.endswith("-linux_x86_64.whl"):
            raise WheelError(f"[wheels] a py3-none-linux_x86_64 wheel expected; got {x86.name}")
        print("[wheels] aarch64 op library (cross-built)", file=sys.stderr, flush=True)
        arm_lib = cross_build_aarch64(ROOT / "build" / "wheel-aarch64")
        (stage / "arm").mkdir()
        arm = retag(x86, "linux_aarch64", stage / "arm", arm_lib)
        results = [Path(shutil.copy2(sdist, out))]
        for wheel in (x86, arm):
            tag, report = manylinux_tag(wheel)
            results.append(retag(wheel, tag, out))
            print(f"[wheels] {results[-1].name}: {report[:400]}", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default: dist/)")
    args = p.parse_args(argv)
    try:
        for path in build_all(args.out):
            print(path)
    except (WheelError, OSError) as e:
        print(str(e), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
