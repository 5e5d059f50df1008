"""Native kernel tests, and the op on aarch64.

The C++ kernel test (custom_ops/tests/kernel_test.cc) holds every kernel the CPU runs to the float64
reference on an edge-case grid. It is built here natively, with ASan+UBSan, and cross-built for
aarch64 and run under qemu-aarch64 as a Raspberry Pi 5 (``-cpu max``: dot product) and a Pi 4
(``-cpu cortex-a72``: plain NEON). Last, the cross-built libmobiq_ops.so runs a whole ONNX graph in
the aarch64 ONNX Runtime of the PyPI wheel, under qemu, against numpy float64.

Builds go to build/native-test-<variant>/ and are reused. Tools come from ``make setup``: a missing
tool fails the test, it never skips.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from mobiquant.runtime import ops
from mobiquant.tools import fetch
from mobiquant.runtime import format as F

from cpu_flags import attention_kernels, x86_flags

ROOT = Path(__file__).resolve().parents[1]
SYSROOT = "/usr/aarch64-linux-gnu"
S = 4


# ---- tools and builds -------------------------------------------------------------


def tool(name: str) -> str:
    """``name`` from the venv (cmake, ninja) or PATH; fails, never skips, when missing."""
    for candidate in (Path(sys.executable).parent / name, shutil.which(name)):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail(f"{name} expected in {Path(sys.executable).parent} or on PATH; got none (run `make setup`)")


def run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def build(variant: str, *options: str, targets: tuple[str, ...] = ("mobiq_kernel_test",)) -> Path:
    """Configure and build ``targets`` of custom_ops/ into build/native-test-<variant>/ (incremental)."""
    out = ROOT / "build" / f"native-test-{variant}"
    out.mkdir(parents=True, exist_ok=True)
    configure = [tool("cmake"), "-S", str(ROOT / "custom_ops"), "-B", str(out), "-G", "Ninja",
                 f"-DCMAKE_MAKE_PROGRAM={tool('ninja')}", "-DMOBIQ_BUILD_TESTS=ON",
                 f"-DMOBIQ_ORT_INCLUDE_DIR={fetch.ort_headers()}", *options]
    with open(out / ".lock", "w") as lock:  # pytest-xdist workers share the directory
        fcntl.flock(lock, fcntl.LOCK_EX)
        for cmd in (configure, [tool("cmake"), "--build", str(out), "--target", *targets]):
            proc = run(cmd)
            assert proc.returncode == 0, f"[{variant} build] {' '.join(cmd)} failed:\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}"
    return out


def qemu(cpu: str) -> list[str]:
    return [tool("qemu-aarch64"), "-cpu", cpu, "-L", SYSROOT]


@pytest.fixture(scope="module")
def aarch64_build() -> Path:
    """Kernel test, op library and ORT host cross-built for aarch64 (linked to the wheel's ORT)."""
    tool("aarch64-linux-gnu-g++")
    return build("aarch64", f"-DCMAKE_TOOLCHAIN_FILE={ROOT / 'custom_ops/cmake/aarch64-linux-gnu.cmake'}",
                 f"-DMOBIQ_ORT_LIBRARY={fetch.ort_aarch64_library()}",
                 targets=("mobiq_kernel_test", "mobiq_ops", "mobiq_ort_host"))


# ---- the kernel test ---------------------------------------------------------------


@dataclass(frozen=True)
class KernelRun:
    ran: set[str]
    skipped: set[str]
    selected: dict[str, str]  # mode -> kernel select_kernel picks without MOBIQ_KERNEL
    stderr: str
    attention: set[str] = frozenset()  # attention variants held to the float64 reference
    attention_selected: str = ""


def kernel_test(cmd: list[str], env: dict[str, str] | None = None) -> KernelRun:
    """Runs mobiq_kernel_test; fails with its failure lines unless it ends in '<n> passed, 0 failed'."""
    proc = run(cmd, env)
    out = proc.stdout
    last = out.strip().splitlines()[-1] if out.strip() else ""
    failures = "\n".join(line for line in out.splitlines() if line.startswith("FAIL"))
    assert proc.returncode == 0 and re.fullmatch(r"[1-9]\d* passed, 0 failed", last), (
        f"{' '.join(cmd)} exited {proc.returncode}, last line {last!r}:\n{failures[-6000:]}\n{proc.stderr[-4000:]}")
    selected = re.search(r"^selected: f32 -> (\S+), int8 -> (\S+)$", out, re.M)
    assert selected, f"no 'selected:' line in:\n{out[-2000:]}"
    chosen = re.search(r"^attention kernel chosen: (\S+)$", out, re.M)
    assert chosen, f"no 'attention kernel chosen:' line in:\n{out[-2000:]}"
    return KernelRun(ran=set(re.findall(r"^kernel (\S+): [1-9]\d* grid cases$", out, re.M)),
                     skipped=set(re.findall(r"^kernel (\S+): not supported on this CPU", out, re.M)),
                     selected={"f32": selected[1], "int8": selected[2]}, stderr=proc.stderr,
                     attention=set(re.findall(r"^attention kernel (\S+): tested$", out, re.M)),
                     attention_selected=chosen[1])


SCALAR = {"rsmm_f32_1x1__scalar", "rsmm_i8_1x1__scalar"}


def x86_expected() -> tuple[set[str], dict[str, str]]:
    """The x86 kernels this CPU runs (from /proc/cpuinfo) and the fastest per mode."""
    flags = x86_flags()
    kernels, selected = set(SCALAR), {"f32": "rsmm_f32_1x1__scalar", "int8": "rsmm_i8_1x1__scalar"}
    if {"avx2", "fma"} <= flags:
        kernels |= {"rsmm_f32_16x4__avx2", "rsmm_i8_16x4__avx2"}
        selected = {"f32": "rsmm_f32_16x4__avx2", "int8": "rsmm_i8_16x4__avx2"}
    if {"avx2", "fma", "avx_vnni"} <= flags:
        kernels |= {"rsmm_i8_16x4__avxvnni"}
        selected["int8"] = "rsmm_i8_16x4__avxvnni"
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"} <= flags:
        kernels |= {"rsmm_f32_16x4__avx512vnni", "rsmm_i8_16x4__avx512vnni"}
        selected = {"f32": "rsmm_f32_16x4__avx512vnni", "int8": "rsmm_i8_16x4__avx512vnni"}
    return kernels, selected


def x86_attention_expected() -> tuple[set[str], str]:
    """The attention variants this CPU runs and the one chosen."""
    ran = attention_kernels()
    return set(ran), ran[-1]


def test_kernels_x86_native():
    result = kernel_test([str(build("x86") / "mobiq_kernel_test")])
    kernels, selected = x86_expected()
    assert result.ran == kernels and result.selected == selected
    assert (result.attention, result.attention_selected) == x86_attention_expected()


def test_kernels_x86_sanitizers():
    binary = build("x86-sanitize", "-DMOBIQ_SANITIZE=ON") / "mobiq_kernel_test"
    # GCC's -fsanitize=undefined leaves out float-to-int overflow (NaN activations once reached such a cast)
    assert "float-cast-overflow" in (binary.parent / "build.ninja").read_text(), "sanitizer flags lack float-cast-overflow"
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    result = kernel_test([str(binary)], env)
    reports = [line for line in result.stderr.splitlines()
               if re.search(r"AddressSanitizer|LeakSanitizer|runtime error:", line)]
    assert not reports, "sanitizer reports:\n" + "\n".join(reports[:20])
    assert result.ran == x86_expected()[0]


# (qemu -cpu, kernels that must run, kernels that must be skipped, int8 kernel chosen)
AARCH64_CPUS = [
    ("max", {"rsmm_f32_16x4__neon", "rsmm_i8_16x4__neon", "rsmm_i8_16x4__neondot"}, set(), "rsmm_i8_16x4__neondot"),
    ("cortex-a72", {"rsmm_f32_16x4__neon", "rsmm_i8_16x4__neon"}, {"rsmm_i8_16x4__neondot"}, "rsmm_i8_16x4__neon"),
]


@pytest.mark.slow
@pytest.mark.parametrize("cpu,ran,skipped,int8", AARCH64_CPUS, ids=[c[0] for c in AARCH64_CPUS])
def test_kernels_aarch64_qemu(aarch64_build, cpu, ran, skipped, int8):
    result = kernel_test([*qemu(cpu), str(aarch64_build / "mobiq_kernel_test")])
    assert result.ran == SCALAR | ran and result.skipped == skipped
    assert result.selected == {"f32": "rsmm_f32_16x4__neon", "int8": int8}
    assert result.attention == {"attention__portable", "attention__neon"}
    assert result.attention_selected == "attention__neon"


# ---- a whole graph in the aarch64 ONNX Runtime ---------------------------------------------------

M, K, HIDDEN, N = 5, 128, 192, 40


ROUTER_HIDDEN = 16


def router_weights(rng: np.random.Generator, x: np.ndarray) -> dict[str, np.ndarray]:
    """A router over X [M, K] with thresholds (row 1 of 3) halfway between its sorted float64 scores, so
    its tokens read 1, 2, 3, 3, 4 slices with no ties; rows 0 and 2 are constant."""
    r = {"router_w1": rng.integers(-127, 128, (K, ROUTER_HIDDEN)).astype(np.int8),
         "router_w1_scale": rng.uniform(1e-3, 3e-3, ROUTER_HIDDEN).astype(np.float32),
         "router_b1": (rng.standard_normal(ROUTER_HIDDEN) / 4).astype(np.float32),
         "router_w2": rng.standard_normal(ROUTER_HIDDEN).astype(np.float32),
         "router_b2": np.array([0.1], np.float32)}
    s = np.sort(router_scores(r, x))
    never = np.float32(ops.THRESHOLD_NEVER)
    r["router_thresholds"] = np.array([[never] * 3, [(s[0] + s[1]) / 2, (s[1] + s[2]) / 2, (s[3] + s[4]) / 2],
                                       [-never] * 3], np.float32)
    r["threshold_row"] = np.array(1, np.int64)
    return r


def router_scores(r: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    f = {k: v.astype(np.float64) for k, v in r.items()}
    hidden = np.maximum(x.astype(np.float64) @ (f["router_w1"] * f["router_w1_scale"]) + f["router_b1"], 0)
    return hidden @ f["router_w2"] + f["router_b2"][0]


def two_layer_model(rng: np.random.Generator, router: dict[str, np.ndarray]):
    """Y1 = RSMM_f32(X; W1, bias), Y2 = RSMM_int8(Relu(Y1); W2), Y3 = RSMM_f32(X; W1, router): weights as
    initializers."""
    w1 = F.quantize(rng.standard_normal((HIDDEN, K)), 64, S)
    w2 = F.quantize(rng.standard_normal((N, HIDDEN)), 64, S)
    bias = rng.standard_normal(HIDDEN).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(a, name) for name, a in [
        ("w1", w1.packed), ("s1", w1.scales), ("z1", w1.zero_points), ("b1", bias),
        ("w2", w2.packed), ("s2", w2.scales), ("z2", w2.zero_points), *router.items()]]
    nodes = [
        helper.make_node(ops.OP_TYPE, ["X", "w1", "s1", "z1", "slice_counts", "b1"], ["Y1"], domain=ops.DOMAIN,
                         K=K, N=HIDDEN, group_size=64, num_slices=S, accuracy_level=ops.ACCURACY_F32),
        helper.make_node("Relu", ["Y1"], ["H"]),
        helper.make_node(ops.OP_TYPE, ["H", "w2", "s2", "z2", "slice_counts"], ["Y2"], domain=ops.DOMAIN,
                         K=HIDDEN, N=N, group_size=64, num_slices=S, accuracy_level=ops.ACCURACY_INT8),
        helper.make_node(ops.OP_TYPE, ["X", "w1", "s1", "z1", "", "", *router], ["Y3"], domain=ops.DOMAIN,
                         K=K, N=HIDDEN, group_size=64, num_slices=S, accuracy_level=ops.ACCURACY_F32),
    ]
    graph = helper.make_graph(
        nodes, "two_layers",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["tokens", K]),
         helper.make_tensor_value_info("slice_counts", TensorProto.INT32, ["tokens"])],
        [helper.make_tensor_value_info("Y1", TensorProto.FLOAT, ["tokens", HIDDEN]),
         helper.make_tensor_value_info("Y2", TensorProto.FLOAT, ["tokens", N]),
         helper.make_tensor_value_info("Y3", TensorProto.FLOAT, ["tokens", HIDDEN])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ops.DOMAIN, 1)])
    return model, w1, bias, w2


@pytest.mark.slow
@pytest.mark.parametrize("cpu", ["max", "cortex-a72"])
def test_ort_graph_aarch64_qemu(aarch64_build, tmp_path, cpu):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((M, K)).astype(np.float32)
    router = router_weights(rng, x)
    model, w1, bias, w2 = two_layer_model(rng, router)
    ops.register_schema()
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "model.onnx")
    counts = np.array([1, 4, 2, 4, 3], np.int32)
    x.tofile(tmp_path / "x.bin")
    counts.tofile(tmp_path / "counts.bin")

    # ORT's cpuinfo crashes under qemu on this host's CPU topology: hide it in a private mount namespace.
    host = [*qemu(cpu), str(aarch64_build / "mobiq_ort_host"), str(tmp_path / "model.onnx"),
            str(aarch64_build / "libmobiq_ops.so"), str(tmp_path),
            f"X=f32:{M}x{K}:{tmp_path / 'x.bin'}", f"slice_counts=i32:{M}:{tmp_path / 'counts.bin'}"]
    cmd = [tool("unshare"), "-m", "sh", "-c", 'mount -t tmpfs none /sys/devices/system/cpu && exec "$@"', "sh", *host]
    env = {k: v for k, v in os.environ.items() if k != "MOBIQ_KERNEL"}
    proc = run(cmd, env)
    assert proc.returncode == 0, f"{' '.join(host)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert proc.stdout.split() == ["Y1", f"{M}x{HIDDEN}", "Y2", f"{M}x{N}", "Y3", f"{M}x{HIDDEN}"], proc.stdout
    y1 = np.fromfile(tmp_path / "Y1.bin", np.float32).reshape(M, HIDDEN)
    y2 = np.fromfile(tmp_path / "Y2.bin", np.float32).reshape(M, N)

    ref1 = np.stack([x[t].astype(np.float64) @ w1.dequantize(int(counts[t])).T for t in range(M)]) + bias
    ref2 = np.stack([np.maximum(ref1[t], 0) @ w2.dequantize(int(counts[t])).T for t in range(M)])
    err1 = np.abs(y1 - ref1).max() / np.abs(ref1).max()
    err2 = np.linalg.norm(y2 - ref2) / np.linalg.norm(ref2)
    print(f"qemu -cpu {cpu}: Y1 (float32) max error {err1:.2e} of max |ref|; Y2 (int8) relative Frobenius {err2:.2e}")
    worst1 = np.unravel_index(np.argmax(np.abs(y1 - ref1)), y1.shape)
    assert err1 <= 1e-5, f"-cpu {cpu} Y1 (accuracy_level=0, M={M} K={K} N={HIDDEN}, counts {counts}): " \
                         f"max error {err1:.2e} of max |ref| at {worst1}"
    assert err2 <= 2e-2, f"-cpu {cpu} Y2 (accuracy_level=4, M={M} K={HIDDEN} N={N}, counts {counts}): " \
                         f"relative Frobenius {err2:.2e}"
    # the fused router on aarch64 (NEON): each token reads the slices its score gives
    y3 = np.fromfile(tmp_path / "Y3.bin", np.float32).reshape(M, HIDDEN)
    routed = 1 + (router_scores(router, x)[:, None] > router["router_thresholds"][1].astype(np.float64)).sum(-1)
    assert sorted(routed.tolist()) == [1, 2, 3, 3, 4]
    ref3 = np.stack([x[t].astype(np.float64) @ w1.dequantize(int(routed[t])).T for t in range(M)])
    err3 = np.abs(y3 - ref3).max() / np.abs(ref3).max()
    assert err3 <= 1e-5, f"-cpu {cpu} Y3 (router H={ROUTER_HIDDEN}, counts {routed}): max error {err3:.2e} of max |ref|"
