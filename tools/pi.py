"""An emulated Raspberry Pi: Debian 12's arm64 CPython unpacked into a sysroot with the runtime's aarch64
wheels from PyPI, run under ``qemu-aarch64`` (nothing installed system-wide; everything pinned, in the cache).

    python -m mobiquant.tools.pi --wheel dist/mobiquant-…aarch64.whl [--board pi4|pi5] -- mobiquant.runtime.cli ARGS
    python -m mobiquant.tools.pi --wheel … -c "import mobiquant.runtime; …"

``pi4`` runs qemu's Cortex-A72 (NEON, no dot product), ``pi5`` qemu's ``max`` CPU, which has every extension
a Pi 5's Cortex-A76 has (dot product included), each with its board's /proc/cpuinfo and CPU topology. Raspberry Pi OS bookworm is Debian 12: the same glibc (2.36) and
CPython (3.11) as this sysroot.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .fetch import ORT_AARCH64, FetchError, Pinned, _run, apt_options, cache_dir, deb_members, fetch

DEBS = [Pinned("deb", package, version, f"{package}_{version.replace(':', '%3a')}_arm64.deb", sha, suite="bookworm")
        for package, version, sha in [
            ("python3.11-minimal", "3.11.2-6+deb12u8", "6a07dd571f1a15af2f855d64571766fe44b73a57cc3b5ca79502bc89156a5e12"),
            ("libpython3.11-minimal", "3.11.2-6+deb12u8", "c48bac178c0fc43a2bf8ace784c762b5ee83e2b981894a991dc3ccfd3ec7cd4b"),
            ("libpython3.11-stdlib", "3.11.2-6+deb12u8", "e79876de55c6c2dca10d044b2fa69ccd863950ea01714220c1982d16008105f9"),
            ("libc6", "2.36-9+deb12u14", "01f4330719fd4f65580e16ea5a0527f372fca750e8f588d26deaf09f2d3b1cf4"),
            ("libgcc-s1", "12.2.0-14+deb12u1", "576926b283613db80168ddf76380a3bd877602778cf0d226caa7bfbfa71eacf3"),
            ("libstdc++6", "12.2.0-14+deb12u1", "26e138c677a985775331373828a6c286c551ff397cb735d00e2383cb273d1cb2"),
            ("zlib1g", "1:1.2.13.dfsg-1", "52b8b8a145bbe1956bba82034f77022cbef0c3d0885c9e32d9817a7932fe1913"),
            ("libexpat1", "2.5.0-1+deb12u2", "8dc1976735acf825e3a922d82f171e20feec7394da2b8c616091983e38706275"),
            ("libffi8", "3.4.4-1", "80b5c36177dc0e29d531c7eddbed3cc7355cb490e49f8cfa5959572d161f27b3"),
            ("libbz2-1.0", "1.0.8-5+b1", "d3a96ece03326498b39ff093a76800dfcbcb1d4049d6ae6e9f6fa1aa7a590ad6"),
            ("liblzma5", "5.4.1-1+deb12u1", "647ce9d81e41c30071ce6ac0d3324579216a33aaa1d28971d6952315f6a95a75"),
            ("libuuid1", "2.38.1-5+deb12u3", "3b2d19df0f3190108cf54228c4cfc822226c06d8f3615a5ab16a7dffb1f58aed"),
            ("libssl3", "3.0.20-1~deb12u2", "a256e03cc3abd7243ac5c6ee91a9deb56478221ef0d3c2b0748551e13140c0bf"),
        ]]

# The runtime's dependencies as a Pi downloads them from PyPI (requirements.lock's versions).
WHEELS = [
    ORT_AARCH64,
    Pinned("pypi", "numpy", "2.4.6", "numpy-2.4.6-cp311-cp311-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl",
           "0ab0a9c4ffb1a6d95ef519fe4247dba8eb6b18ad93999f76b7f657039acabd47"),
    Pinned("pypi", "tokenizers", "0.23.3", "tokenizers-0.23.3-cp310-abi3-manylinux_2_17_aarch64.manylinux2014_aarch64.whl",
           "ec82e80e65a862275b97c3d90b7a523df8d9519ee48aeb4e9625b2cc909274e0"),
    Pinned("pypi", "jinja2", "3.1.6", "jinja2-3.1.6-py3-none-any.whl",
           "85ece4451f492d0c13c5dd7c13a64681a86afae63a5f347908daf103ce6d2f67"),
    Pinned("pypi", "markupsafe", "3.0.4",
           "markupsafe-3.0.4-cp311-cp311-manylinux2014_aarch64.manylinux_2_17_aarch64.manylinux_2_28_aarch64.whl",
           "849dd2bb0e5e4ab2b71c7191726a4a8d5aa8a610daa584728cbee0b710ddc4ef"),
]
# Per board: qemu's -cpu, and what its /proc/cpuinfo says (ONNX Runtime's cpuinfo reads it and the CPU
# topology under /sys; qemu-user 7.2 would show the x86 host's, on which ORT's import crashes).
BOARDS = {
    "pi4": ("cortex-a72", "BCM2711", "Raspberry Pi 4 Model B Rev 1.5", "0x0", "0xd08", "1800000",
            "fp asimd evtstrm crc32 cpuid"),
    "pi5": ("max", "BCM2712", "Raspberry Pi 5 Model B Rev 1.0", "0x4", "0xd0b", "2400000",
            "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"),
}


def sysroot() -> Path:
    """The arm64 root (CPython 3.11 + libraries) and its ``site`` folder of dependency wheels, made once."""
    key = hashlib.sha256("".join(p.sha256 for p in DEBS + WHEELS).encode()).hexdigest()[:12]
    root = cache_dir() / "pi-sysroot" / key
    if (root / ".complete").is_file():
        return root
    if root.exists():
        shutil.rmtree(root)
    part = root.with_name(root.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    for pin in DEBS:
        deb_members(fetch(pin), "", part)
    for pin in WHEELS:
        with zipfile.ZipFile(fetch(pin)) as wheel:
            wheel.extractall(part / "site")
    (part / ".complete").write_text(key)
    part.rename(root)
    return root


def board(name: str) -> Path:
    """The root qemu runs ``name`` (pi4|pi5) in: the sysroot's folders (linked) plus the board's
    /proc/cpuinfo and /sys/devices/system/cpu (4 cores)."""
    if name not in BOARDS:
        raise FetchError(f"[pi] board expected one of {', '.join(BOARDS)}; got {name!r}")
    _, soc, model, variant, part, khz, features = BOARDS[name]
    base = sysroot()
    root = base.with_name(f"{base.name}-{name}")
    if (root / ".complete").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    for entry in base.iterdir():
        if not entry.name.startswith("."):
            (root / entry.name).symlink_to(entry)
    cpu = root / "sys/devices/system/cpu"
    cpu.mkdir(parents=True)
    for file, text in {"possible": "0-3", "present": "0-3", "online": "0-3", "kernel_max": "3"}.items():
        (cpu / file).write_text(text + "\n")
    for i in range(4):
        (cpu / f"cpu{i}/topology").mkdir(parents=True)
        for file, text in {"core_id": i, "physical_package_id": 0, "cluster_id": 0, "core_siblings_list": "0-3",
                           "thread_siblings_list": i, "package_cpus_list": "0-3", "core_cpus_list": i,
                           "cluster_cpus_list": "0-3"}.items():
            (cpu / f"cpu{i}/topology" / file).write_text(f"{text}\n")
        (cpu / f"cpu{i}/cpufreq").mkdir()
        (cpu / f"cpu{i}/cpufreq/cpuinfo_max_freq").write_text(khz + "\n")
    blocks = [f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
              f"CPU architecture: 8\nCPU variant\t: {variant}\nCPU part\t: {part}\nCPU revision\t: 1\n"
              for i in range(4)]
    (root / "proc").mkdir()
    (root / "proc/cpuinfo").write_text("\n".join(blocks) + f"\nHardware\t: {soc}\nModel\t\t: {model}\n")
    (root / ".complete").write_text(name)
    return root


def command(name: str, argv: list[str]) -> list[str]:
    """Python run with ``argv`` (e.g. ["-m", "mobiquant.runtime.cli", ...] or ["-c", code]) on board ``name``
    under qemu."""
    if shutil.which("qemu-aarch64") is None:
        raise FetchError("[pi] qemu-aarch64 expected on PATH; got none (`make setup` installs qemu-user)")
    root = board(name)
    return ["qemu-aarch64", "-cpu", BOARDS[name][0], "-L", str(root), str(root / "usr/bin/python3.11"), *argv]


def environment(package: Path) -> dict[str, str]:
    """PYTHONPATH: our unpacked aarch64 wheel, then the dependency wheels."""
    return {**os.environ, "PYTHONPATH": f"{package}:{sysroot() / 'site'}", "PYTHONNOUSERSITE": "1",
            "PYTHONDONTWRITEBYTECODE": "1"}


def unpack_wheel(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(dest)
    (dest / "mobiquant/runtime/libmobiq_ops.so").chmod(0o755)
    return dest


def current_pins(suite: str = "bookworm") -> list[tuple[str, str, str]]:
    """(package, version, sha256) that ``suite`` serves now for every package of :data:`DEBS`, from its signed
    index (apt verifies it): what to paste into DEBS when Debian has superseded a pinned version."""
    opts = apt_options(suite, "arm64")
    _run(["apt-get", *opts, "update"], f"apt-get update ({suite} arm64)")
    proc = subprocess.run(["apt-cache", *opts, "show", "--no-all-versions", *[p.package for p in DEBS]],
                          capture_output=True, text=True, check=True)
    pins = []
    for block in proc.stdout.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(" "))
        if "Package" in fields:
            pins.append((fields["Package"], fields["Version"], fields["SHA256"]))
    return pins


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wheel", type=Path, help="our aarch64 wheel (make wheels)")
    p.add_argument("--repin", action="store_true", help="print the DEBS table for the versions Debian serves now "
                                                        "(when a pinned version has been superseded), then exit")
    p.add_argument("--board", default="pi5", choices=sorted(BOARDS),
                   help="pi4: Cortex-A72, NEON; pi5: qemu's max CPU (a Cortex-A76's dot product included)")
    p.add_argument("module", nargs=argparse.REMAINDER, help="-- then a module and its arguments, e.g. "
                                                            "-- mobiquant.runtime.cli models/smollm2-135m -p hi")
    p.add_argument("-c", dest="code", help="run this Python code instead of a module")
    args = p.parse_args(argv)
    if args.repin:
        for package, version, sha in current_pins():
            print(f'            ("{package}", "{version}", "{sha}"),')
        return 0
    if args.wheel is None:
        p.error("--wheel expected (our aarch64 wheel from `make wheels`)")
    module = args.module[1:] if args.module[:1] == ["--"] else args.module
    try:
        with tempfile.TemporaryDirectory() as tmp:
            package = unpack_wheel(args.wheel, Path(tmp))
            argv = ["-c", args.code, *module] if args.code else ["-m", *module]
            return subprocess.run(command(args.board, argv), env=environment(package)).returncode
    except (FetchError, OSError, zipfile.BadZipFile) as e:
        print(str(e).splitlines()[0], file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
