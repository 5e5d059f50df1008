"""The runtime end to end on an emulated Raspberry Pi 4 and 5 (tools/pi.py): Debian 12's arm64 CPython, the
PyPI aarch64 wheels of numpy/onnxruntime/tokenizers/jinja2 and our aarch64 wheel, under qemu-aarch64.

The reference is the same model on this x86 machine: at each budget the greedy continuation must be the same
tokens, and the last position's logits of a fixed prompt must agree to PI_LOGIT_TOLERANCE (relative to the
largest logit: integer dot products are exact on both, the float scaling and summation order differ).
`make test` runs the tiny model; `make test-pi` adds the default model (MOBIQ_PI_MODEL=models/smollm2-135m).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from mobiquant.tools import pi

PI_LOGIT_TOLERANCE = 1e-3
PROMPT = "The sea was calm that evening, and"
NEW_TOKENS = 16

# Runs the same on both machines: greedy continuation (raw text, no repetition penalty) and first-step logits.
PROBE = """
import json, sys
import numpy as np
from mobiquant.runtime import Model
from mobiquant.runtime.sampling import SamplingConfig
model = Model.load(sys.argv[1], threads=2)
ids = model.codec.encode(sys.argv[2])
out = {}
for budget in ("low", "max"):
    gen = model.generate(sys.argv[2], budget=budget, max_new_tokens=int(sys.argv[3]), chat=False,
                         sampling=SamplingConfig(repetition_penalty=1.0))
    text = "".join(gen)
    s = model.session
    logits = s.forward(np.array([ids]), s.empty_cache(), model.control.bits)[0][0, -1]
    out[budget] = {"tokens": [st.token for st in gen.stats.steps], "text": text, "logits": logits.tolist(),
                   "avg_bits": gen.stats.avg_bits}
print(json.dumps(out))
"""


def models() -> list[str]:
    extra = os.environ.get("MOBIQ_PI_MODEL")
    return ["tiny"] + ([extra] if extra else [])


@pytest.fixture(scope="module")
def pi_package(dist):
    with tempfile.TemporaryDirectory() as tmp:
        yield pi.unpack_wheel(dist["aarch64"], Path(tmp))


def on_pi(board: str, package: Path, argv: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(pi.command(board, argv), env=pi.environment(package), capture_output=True, text=True,
                          timeout=timeout)


def model_dir(name: str, tiny_model_dir: Path) -> Path:
    return tiny_model_dir if name == "tiny" else Path(name).resolve()


@pytest.mark.slow
@pytest.mark.parametrize("board", ["pi4", "pi5"])
@pytest.mark.parametrize("name", models())
def test_the_pi_generates_what_x86_generates(board, name, tiny_model_dir, pi_package):
    model = model_dir(name, tiny_model_dir)
    args = ["-c", PROBE, str(model), PROMPT, str(NEW_TOKENS)]
    here = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    assert here.returncode == 0, here.stderr[-2000:]
    there = on_pi(board, pi_package, args)
    assert there.returncode == 0, there.stderr[-2000:]
    ours, theirs = json.loads(here.stdout), json.loads(there.stdout)
    for budget in ("low", "max"):
        a, b = np.array(ours[budget]["logits"]), np.array(theirs[budget]["logits"])
        rel = np.abs(a - b).max() / np.abs(a).max()
        assert rel <= PI_LOGIT_TOLERANCE, f"{board} {budget}: logits differ by {rel:.2e} of the largest"
        assert theirs[budget]["tokens"] == ours[budget]["tokens"], (board, budget, theirs[budget], ours[budget])
        assert theirs[budget]["avg_bits"] == pytest.approx(ours[budget]["avg_bits"], abs=1e-6)
    assert ours["low"]["avg_bits"] < ours["max"]["avg_bits"]


def pi5_tree(root: Path, celsius: float, throttled: str) -> Path:
    """A Pi 5's sysfs as the policy reads it: no battery (an empty power_supply class), its CPU zone, the firmware's
    get_throttled."""
    (root / "sys/class/power_supply").mkdir(parents=True)
    zone = root / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text(f"{int(celsius * 1000)}\n")
    firmware = root / "sys/devices/platform/soc/soc:firmware"
    firmware.mkdir(parents=True)
    (firmware / "get_throttled").write_text(throttled + "\n")
    return root


@pytest.mark.slow
def test_auto_on_a_hot_throttled_pi5_reads_fewer_bits_than_on_a_cool_one(tiny_model_dir, pi_package, tmp_path):
    bits = {}
    for state, celsius, flags in (("cool", 52.0, "0"), ("hot", 81.0, "50005")):
        root = pi5_tree(tmp_path / state, celsius, flags)
        r = on_pi("pi5", pi_package, ["-m", "mobiquant.runtime.cli", str(tiny_model_dir), "--budget", "auto",
                                      "--signals-root", str(root), "-p", "hi", "-n", "4", "--raw", "--stats",
                                      "--threads", "2"])
        assert r.returncode == 0, r.stderr[-2000:]
        line = next(x for x in r.stderr.splitlines() if x.startswith("[budget] auto:"))
        bits[state] = float(line.split()[2])
        read = float(next(x for x in r.stderr.splitlines() if "average bits read" in x).split()[-1])
        assert read == pytest.approx(bits[state], abs=0.75)  # the bits the Pi actually read follow the budget
    named = json.loads((tiny_model_dir / "mobiq.json").read_text())["named_budgets"]
    assert bits == {"cool": named["max"], "hot": named["low"]}, bits
