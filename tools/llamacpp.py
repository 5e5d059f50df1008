"""llama.cpp's ``llama-bench`` and ``llama-quantize``, the peer users would pick, built once for comparisons.

Optional and never part of ``make test``: ``make llamacpp`` (or ``python -m mobiquant.tools.llamacpp build``)
builds the two tools from the llama.cpp sources vendored in the pinned ``llama-cpp-python`` sdist (PyPI; its
sha256 is checked) into ``$MOBIQ_CACHE/llamacpp/<version>/`` — minutes on 2 cores, then reused. The build is
native (``GGML_NATIVE=ON``), static, CPU only, without curl or OpenSSL.

``python -m mobiquant.tools.llamacpp bench smollm2-135m --quant Q4_0 --depths 32,1024,4096 --threads 2``
requantizes the registry's GGUF (cached under ``$MOBIQ_CACHE/llamacpp/gguf/``) and measures decode speed with
``llama-bench`` after a context of each depth (``-d``), flash attention on, the KV cache in f16 or q8_0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .fetch import FetchError, Pinned, cache_dir, fetch, sha256_of

# llama-cpp-python 0.3.36 (PyPI sdist, MIT): llama.cpp under vendor/llama.cpp, at commit 0c1e57098bba (the sdist's
# .git/modules/vendor/llama.cpp/HEAD; the build itself reports "commit unknown", version 0.5.0-dev).
LLAMA_CPP_PYTHON = Pinned("pypi", "llama-cpp-python", "0.3.36", "llama_cpp_python-0.3.36.tar.gz",
                          "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")
_VENDORED = "vendor/llama.cpp/"
TOOLS = ("llama-bench", "llama-quantize")
QTYPES = ("Q4_0", "Q8_0")
CACHE_TYPES = ("f16", "q8_0")
CMAKE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON"]


class LlamaCppError(RuntimeError):
    """llama.cpp could not be fetched, built or run; the message is one line."""


def _log(msg: str) -> None:
    print(f"[llamacpp] {msg}", file=sys.stderr, flush=True)


def root() -> Path:
    """``$MOBIQ_CACHE/llamacpp/<version>``: the unpacked sources (``src``) and the build (``build``)."""
    return cache_dir() / "llamacpp" / LLAMA_CPP_PYTHON.version


def bin_dir() -> Path:
    return root() / "build" / "bin"


def tool(name: str) -> Path:
    """The built ``name`` (one of TOOLS); LlamaCppError when it has not been built."""
    path = bin_dir() / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise LlamaCppError(f"[llamacpp] {name} expected at {path}; got none (run `make llamacpp`)")
    return path


def _one_line(text: str) -> str:
    """The last non-empty line of a tool's output (its error, as a rule), for a one-line message."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


def _sdist() -> Path:
    """The verified sdist. ``fetch()`` downloads wheels only (``--only-binary``), so the sdist is downloaded here
    with pip into fetch's place for it; ``fetch()`` then checks its sha256 (and reuses it next time)."""
    pin = LLAMA_CPP_PYTHON
    if not (pin.path.is_file() and sha256_of(pin.path) == pin.sha256):
        pin.path.parent.mkdir(parents=True, exist_ok=True)
        _log(f"downloading the {pin.package} {pin.version} sdist (pip)")
        with tempfile.TemporaryDirectory(dir=pin.path.parent) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp,
                   f"{pin.package}=={pin.version}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / pin.filename
            if proc.returncode != 0 or not got.is_file():
                raise LlamaCppError(f"[llamacpp] pip download {pin.package}=={pin.version} failed: "
                                    f"{_one_line(proc.stderr or proc.stdout)}")
            os.replace(got, pin.path)
    try:
        return fetch(pin)
    except (FetchError, OSError) as e:
        raise LlamaCppError(_one_line(str(e))) from e


def source() -> Path:
    """llama.cpp's source tree (the sdist's ``vendor/llama.cpp``), unpacked once into ``root()/src``.

    Only regular files and directories under the vendored folder are taken, through tarfile's ``data`` filter
    (no absolute paths, no ``..``, no links or devices)."""
    src = root() / "src"
    if (src / "CMakeLists.txt").is_file():
        return src
    sdist = _sdist()
    _log(f"unpacking {sdist.name} (vendor/llama.cpp) into {src}")
    src.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="src.", dir=src.parent))
    try:
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                _, _, rest = m.name.partition("/")
                if not rest.startswith(_VENDORED) or not (m.isfile() or m.isdir()):
                    continue
                m.name = rest[len(_VENDORED):]
                if m.name:
                    members.append(m)
            if not any(m.name == "CMakeLists.txt" for m in members):
                raise LlamaCppError(f"[llamacpp] {sdist.name}: {_VENDORED}CMakeLists.txt expected; got none")
            tar.extractall(tmp, members=members, filter="data")
        if src.exists():
            shutil.rmtree(src)
        os.replace(tmp, src)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return src


_PROGRESS = re.compile(r"^\[\s*(\d+)%\]|^\[(\d+)/(\d+)\]")


def _build_step(cmd: list[str], what: str, log: Path, progress: bool = False) -> None:
    """Run one configure/build step, its output appended to ``log``; LlamaCppError (one line) when it fails."""
    last, shown = "", -10
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except OSError as e:
            raise LlamaCppError(f"[llamacpp] {what}: {cmd[0]} could not be run ({e.strerror})") from e
        for line in proc.stdout:
            out.write(line)
            if line.strip():
                last = line.strip()
            if progress and (m := _PROGRESS.match(line)):
                pct = int(m[1]) if m[1] else 100 * int(m[2]) // int(m[3])
                if pct >= shown + 10:
                    shown = pct - pct % 10
                    _log(f"{what}: {pct}%")
        rc = proc.wait()
    if rc != 0:
        error = next((ln.strip() for ln in reversed(log.read_text(errors="replace").splitlines())
                      if "error" in ln.lower()), last)
        raise LlamaCppError(f"[llamacpp] {what} failed (exit {rc}): {error[:300]} (full log: {log})")


def build() -> Path:
    """Build ``llama-bench`` and ``llama-quantize`` once (reused when both exist); the folder holding them."""
    if all((bin_dir() / name).is_file() for name in TOOLS):
        _log(f"reusing {bin_dir()}")
        return bin_dir()
    for program in ("cmake", "c++"):
        if shutil.which(program) is None:
            raise LlamaCppError(f"[llamacpp] {program} expected on PATH; got none (apt-get install cmake g++)")
    src = source()
    build_dir = root() / "build"
    build_dir.mkdir(parents=True, exist_ok=True)
    log = root() / "build.log"
    log.write_text("")
    _log(f"configuring llama.cpp (cmake, Release, native, static) in {build_dir}")
    _build_step(["cmake", "-S", str(src), "-B", str(build_dir), *CMAKE_OPTIONS], "cmake configure", log)
    _log(f"building {' and '.join(TOOLS)} with 2 jobs (minutes; log: {log})")
    _build_step(["cmake", "--build", str(build_dir), "--config", "Release", "-j2", "--target", *TOOLS],
                "cmake build", log, progress=True)
    for name in TOOLS:
        tool(name)
    _log(f"built {', '.join(TOOLS)} in {bin_dir()}")
    return bin_dir()


def model_gguf(model_name: str) -> Path:
    """The registry's pinned GGUF of a registered model (``models/<name>/model.toml``), fetched once."""
    from .models import load_entry

    return load_entry(model_name).gguf_path()


def quantized_gguf(source_gguf: Path, qtype: str) -> Path:
    """``source_gguf`` requantized to ``qtype`` (Q4_0 or Q8_0) by ``llama-quantize --allow-requantize``, once:
    cached as ``$MOBIQ_CACHE/llamacpp/gguf/<source stem>-<qtype>.gguf``."""
    if qtype not in QTYPES:
        raise LlamaCppError(f"[llamacpp] quantization type expected one of {', '.join(QTYPES)}; got {qtype!r}")
    source_gguf = Path(source_gguf)
    out = cache_dir() / "llamacpp" / "gguf" / f"{source_gguf.stem}-{qtype}.gguf"
    if out.is_file():
        return out
    if not source_gguf.is_file():
        raise LlamaCppError(f"[llamacpp] a GGUF file expected at {source_gguf}; got none")
    quantize = tool("llama-quantize")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    _log(f"requantizing {source_gguf.name} to {qtype}")
    cmd = [str(quantize), "--allow-requantize", str(source_gguf), str(tmp), qtype, str(os.cpu_count() or 1)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise LlamaCppError(f"[llamacpp] llama-quantize {qtype} failed (exit {proc.returncode}): "
                            f"{_one_line(proc.stderr + proc.stdout)}")
    os.replace(tmp, out)
    return out


def bench_command(binary: Path, gguf: Path, depths: list[int], threads: int, cache_type: str = "f16",
                  n_gen: int = 32, repetitions: int = 3) -> list[str]:
    """The ``llama-bench`` command line: decode ``n_gen`` tokens (no prompt test) after each context depth,
    flash attention on, K and V caches in ``cache_type``, ``repetitions`` runs each, JSON out."""
    if cache_type not in CACHE_TYPES:
        raise LlamaCppError(f"[llamacpp] cache type expected one of {', '.join(CACHE_TYPES)}; got {cache_type!r}")
    if not depths or any(d < 0 for d in depths):
        raise LlamaCppError(f"[llamacpp] depths expected non-negative and at least one; got {depths}")
    return [str(binary), "-m", str(gguf), "-p", "0", "-n", str(n_gen), "-d", ",".join(str(d) for d in depths),
            "-t", str(threads), "-fa", "1", "-ctk", cache_type, "-ctv", cache_type, "-r", str(repetitions),
            "-o", "json"]


def parse_bench_json(text: str, model: str) -> list[dict]:
    """One dict per depth from ``llama-bench -o json`` output (its text-generation tests only):
    depth, tok_s (mean of the runs' tokens/s), tok_s_stddev, ms_per_token (mean run time / tokens),
    cache_type, model, threads."""
    try:
        tests = json.loads(text)
        rows = []
        for t in tests:
            if int(t["n_gen"]) <= 0 or int(t["n_prompt"]) != 0:
                continue
            rows.append({"depth": int(t["n_depth"]), "tok_s": float(t["avg_ts"]),
                         "tok_s_stddev": float(t["stddev_ts"]),
                         "ms_per_token": float(t["avg_ns"]) / int(t["n_gen"]) / 1e6,
                         "cache_type": t["type_k"], "model": model, "threads": int(t["n_threads"])})
    except (ValueError, KeyError, TypeError) as e:
        raise LlamaCppError(f"[llamacpp] llama-bench JSON expected a list of tests; got {_one_line(repr(e))}") from e
    if not rows:
        raise LlamaCppError("[llamacpp] llama-bench JSON expected text-generation tests; got none")
    return sorted(rows, key=lambda r: r["depth"])


def bench(gguf: Path, depths: list[int], threads: int, cache_type: str = "f16", n_gen: int = 32,
          repetitions: int = 3) -> list[dict]:
    """Decode speed of ``gguf`` under ``llama-bench`` after each context depth: one dict per depth (see
    ``parse_bench_json``). Needs ``build()`` first; LlamaCppError (one line) when the run fails."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise LlamaCppError(f"[llamacpp] a GGUF file expected at {gguf}; got none")
    cmd = bench_command(tool("llama-bench"), gguf, depths, threads, cache_type, n_gen, repetitions)
    _log(f"llama-bench {gguf.name}: depths {','.join(map(str, depths))}, {threads} threads, {cache_type} cache")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LlamaCppError(f"[llamacpp] llama-bench failed (exit {proc.returncode}): "
                            f"{_one_line(proc.stderr + proc.stdout)}")
    return parse_bench_json(proc.stdout, gguf.name)


def _depths(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers expected; got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mobiquant.tools.llamacpp",
        description="llama.cpp (llama-bench, llama-quantize) from the pinned llama-cpp-python "
                    f"{LLAMA_CPP_PYTHON.version} sdist, built once into $MOBIQ_CACHE/llamacpp, for measuring "
                    "MoBiQuant beside the runtime users would otherwise pick. Optional; never part of make test.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build llama-bench and llama-quantize (minutes on 2 cores; reused after)",
                   description="Fetch the sdist, unpack its vendored llama.cpp, build llama-bench and "
                               "llama-quantize (Release, GGML_NATIVE, static); prints the bin folder.")
    b = sub.add_parser("bench", help="decode tokens/s of a GGUF after several context depths",
                       description="Run llama-bench: decode N_GEN tokens after a context of each depth "
                                   "(flash attention on), REPETITIONS runs each; builds first if needed.")
    b.add_argument("gguf", metavar="GGUF", help="a GGUF file, or a registered model name (e.g. smollm2-135m) "
                                                "for its pinned GGUF")
    b.add_argument("--depths", type=_depths, default=[32, 1024, 4096],
                   help="comma-separated context depths (default 32,1024,4096)")
    b.add_argument("--threads", type=int, default=2, help="threads (default 2)")
    b.add_argument("--cache-type", choices=CACHE_TYPES, default="f16", help="K and V cache type (default f16)")
    b.add_argument("--quant", choices=QTYPES, help="requantize the GGUF first (cached) with llama-quantize")
    b.add_argument("--n-gen", type=int, default=32, help="tokens generated per run (default 32)")
    b.add_argument("--repetitions", type=int, default=3, help="runs per depth (default 3)")
    b.add_argument("--json", type=Path, metavar="OUT", help="also write the results to OUT as JSON")
    args = parser.parse_args(argv)
    try:
        bins = build()
        if args.command == "build":
            print(bins)
            return 0
        gguf = Path(args.gguf)
        if not gguf.is_file() and "/" not in args.gguf and not args.gguf.endswith(".gguf"):
            gguf = model_gguf(args.gguf)
        if args.quant:
            gguf = quantized_gguf(gguf, args.quant)
        rows = bench(gguf, args.depths, args.threads, args.cache_type, args.n_gen, args.repetitions)
    except (LlamaCppError, FetchError, ValueError) as e:
        print(_one_line(str(e)), file=sys.stderr)
        return 1
    for r in rows:
        print(f"{r['model']}  cache {r['cache_type']:<4}  threads {r['threads']}  depth {r['depth']:>5}: "
              f"{r['tok_s']:8.2f} tok/s (±{r['tok_s_stddev']:.2f})  {r['ms_per_token']:7.2f} ms/token")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
