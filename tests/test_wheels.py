"""``make wheels`` (tools/wheels.py): an sdist and two py3-none wheels, each with the op library of its
architecture; the x86_64 one installed into a bare venv runs mobiq-run with only the runtime's dependencies."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mobiquant.tools import wheels

RUNTIME_REQUIREMENTS = {"numpy", "onnxruntime", "tokenizers", "jinja2"}
WORKSTATION = {"torch", "onnx", "transformers", "onnxscript", "safetensors", "gguf", "accelerate"}


def check_record(wheel: zipfile.ZipFile) -> None:
    record = next(n for n in wheel.namelist() if n.endswith(".dist-info/RECORD"))
    rows = list(csv.reader(io.StringIO(wheel.read(record).decode())))
    assert {r[0] for r in rows} == set(wheel.namelist())
    for name, digest, size in rows:
        if name == record:
            continue
        data = wheel.read(name)
        want = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert (digest, int(size)) == (want, len(data)), name


def test_retag_rewrites_the_tag_the_record_and_the_name(tmp_path):
    src = tmp_path / "demo-1.0-py3-none-linux_x86_64.whl"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("demo-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: py3-none-linux_x86_64\n")
        z.writestr(wheels.LIBRARY, b"\x7fELF old")
        z.writestr("demo-1.0.dist-info/RECORD", "stale,,\n")
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"\x7fELF new library")
    out = wheels.retag(src, "manylinux_2_36_aarch64", tmp_path, lib)
    assert out.name == "demo-1.0-py3-none-manylinux_2_36_aarch64.whl"
    with zipfile.ZipFile(out) as z:
        assert "Tag: py3-none-manylinux_2_36_aarch64\n" in z.read("demo-1.0.dist-info/WHEEL").decode()
        assert z.read(wheels.LIBRARY) == b"\x7fELF new library"
        check_record(z)


@pytest.mark.slow
def test_make_wheels_writes_an_sdist_and_a_wheel_per_architecture(dist):
    assert set(dist) == {"sdist", "x86_64", "aarch64"}, dist
    for arch in ("x86_64", "aarch64"):
        wheel = dist[arch]
        assert wheel.name.startswith("mobiquant-") and "-py3-none-manylinux_2_" in wheel.name, wheel.name
        with zipfile.ZipFile(wheel) as z:
            library = z.read(wheels.LIBRARY)
            assert wheels.elf_machine(library) == arch
            check_record(z)
            meta = z.read(next(n for n in z.namelist() if n.endswith("METADATA"))).decode().splitlines()
            required = {line.split()[1].split(">")[0].split("=")[0].lower() for line in meta
                        if line.startswith("Requires-Dist:") and "extra ==" not in line}
            assert required == RUNTIME_REQUIREMENTS
            assert {n.split("/")[1] for n in z.namelist() if n.startswith("mobiquant/")} >= {"runtime", "tools",
                                                                                              "exporter"}
    arm = zipfile.ZipFile(dist["aarch64"]).read(wheels.LIBRARY)
    assert b"rsmm_i8_16x4__neondot" in arm and b"rsmm_i8_16x4__neon\x00" in arm  # both, picked at run time
    for arch in ("x86_64", "aarch64"):  # libstdc++ and libgcc are inside: only glibc is needed
        assert needed(zipfile.ZipFile(dist[arch]).read(wheels.LIBRARY)) <= {"libc.so.6", "libm.so.6",
                                                                           "ld-linux-aarch64.so.1", "ld-linux-x86-64.so.2"}, arch


def needed(library: bytes) -> set[str]:
    from elftools.elf.elffile import ELFFile

    dynamic = ELFFile(io.BytesIO(library)).get_section_by_name(".dynamic")
    return {tag.needed for tag in dynamic.iter_tags() if tag.entry.d_tag == "DT_NEEDED"}


@pytest.mark.slow
def test_the_x86_64_wheel_runs_in_a_bare_venv(dist, tiny_model_dir, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([venv / "bin/python", "-m", "pip", "install", "-q", str(dist["x86_64"])],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-2000:]
    listed = subprocess.run([venv / "bin/python", "-m", "pip", "list", "--format=freeze"], capture_output=True,
                            text=True).stdout.lower()
    installed = {line.split("==")[0] for line in listed.splitlines()}
    assert not installed & WORKSTATION, installed & WORKSTATION
    run = subprocess.run([venv / "bin/mobiq-run", str(tiny_model_dir), "-p", "hi", "-n", "4", "--budget", "low",
                          "--threads", "1"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    export = subprocess.run([venv / "bin/mobiq-export", "quantize", "x", "-o", "y"], capture_output=True, text=True)
    assert export.returncode == 2 and "pip install 'mobiquant[export]'" in export.stderr
    assert len(export.stderr.strip().splitlines()) == 1, export.stderr
