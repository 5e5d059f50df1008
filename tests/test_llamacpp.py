"""The llama.cpp peer (tools/llamacpp.py) without building it: llama-bench's command line, its JSON parsed into one
row per depth, and one-line errors when a tool is missing or fails."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from mobiquant.tools import llamacpp

# A real `llama-bench -o json` run of llama.cpp from llama-cpp-python 0.3.36 (SmolLM2-135M requantized to Q4_0,
# q8_0 cache, -n 4 -d 0,32 -r 2), reduced to the fields parse_bench_json reads and a few beside them.
SAMPLE = [
    {"build_commit": "unknown", "model_type": "llama 256M Q4_0", "n_threads": 2, "type_k": "q8_0", "type_v": "q8_0",
     "flash_attn": 1, "n_prompt": 0, "n_gen": 4, "n_depth": 0, "avg_ns": 5270238533, "stddev_ns": 4107083179,
     "avg_ts": 23.564565, "stddev_ts": 32.784256},
    {"build_commit": "unknown", "model_type": "llama 256M Q4_0", "n_threads": 2, "type_k": "q8_0", "type_v": "q8_0",
     "flash_attn": 1, "n_prompt": 0, "n_gen": 4, "n_depth": 32, "avg_ns": 151030842, "stddev_ns": 133036666,
     "avg_ts": 43.272406, "stddev_ts": 38.116828},
]


def test_the_bench_command_line():
    cmd = llamacpp.bench_command(Path("/b/llama-bench"), Path("/m/x.gguf"), [32, 1024, 4096], 2, "q8_0")
    assert cmd == ["/b/llama-bench", "-m", "/m/x.gguf", "-p", "0", "-n", "32", "-d", "32,1024,4096", "-t", "2",
                   "-fa", "1", "-ctk", "q8_0", "-ctv", "q8_0", "-r", "3", "-o", "json"]
    cmd = llamacpp.bench_command(Path("b"), Path("m.gguf"), [0], 4, n_gen=16, repetitions=5)
    assert cmd[cmd.index("-n") + 1] == "16" and cmd[cmd.index("-r") + 1] == "5"
    assert cmd[cmd.index("-ctk") + 1] == cmd[cmd.index("-ctv") + 1] == "f16"


@pytest.mark.parametrize("kwargs", [{"cache_type": "q4_0"}, {"depths": []}, {"depths": [-1]}])
def test_the_bench_command_refuses_bad_arguments(kwargs):
    args = {"binary": Path("b"), "gguf": Path("m.gguf"), "depths": [32], "threads": 2} | kwargs
    with pytest.raises(llamacpp.LlamaCppError):
        llamacpp.bench_command(**args)


def test_llama_bench_json_gives_one_row_per_depth():
    rows = llamacpp.parse_bench_json(json.dumps(SAMPLE[::-1]), "x-Q4_0.gguf")
    assert [r["depth"] for r in rows] == [0, 32]
    assert rows[1] == {"depth": 32, "tok_s": 43.272406, "tok_s_stddev": 38.116828,
                       "ms_per_token": pytest.approx(151030842 / 4 / 1e6), "cache_type": "q8_0",
                       "model": "x-Q4_0.gguf", "threads": 2}


def test_prompt_tests_are_left_out_and_bad_json_is_one_line():
    prompt = SAMPLE[0] | {"n_prompt": 512, "n_gen": 0}
    assert [r["depth"] for r in llamacpp.parse_bench_json(json.dumps([prompt, SAMPLE[1]]), "m")] == [32]
    for text in ("", "[]", json.dumps([{"n_gen": 4}]), json.dumps([prompt])):
        with pytest.raises(llamacpp.LlamaCppError) as e:
            llamacpp.parse_bench_json(text, "m")
        assert "\n" not in str(e.value)


def test_a_missing_binary_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBIQ_CACHE", str(tmp_path))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(llamacpp.LlamaCppError) as e:
        llamacpp.bench(gguf, [32], 2)
    assert "llama-bench expected at" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(llamacpp.LlamaCppError) as e:
        llamacpp.quantized_gguf(gguf, "Q4_0")
    assert "llama-quantize expected at" in str(e.value) and "\n" not in str(e.value)


def test_a_failing_run_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBIQ_CACHE", str(tmp_path))
    fake = llamacpp.bin_dir() / "llama-bench"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\necho 'loading model' >&2\necho 'error: failed to load model' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(llamacpp.LlamaCppError) as e:
        llamacpp.bench(gguf, [32], 2)
    assert str(e.value) == "[llamacpp] llama-bench failed (exit 1): error: failed to load model"


def test_the_requantized_file_is_named_by_source_and_type(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBIQ_CACHE", str(tmp_path))
    cached = tmp_path / "llamacpp" / "gguf" / "src-Q8_0.gguf"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"GGUF")
    assert llamacpp.quantized_gguf(tmp_path / "src.gguf", "Q8_0") == cached  # cached: no tool needed
    with pytest.raises(llamacpp.LlamaCppError, match="expected one of Q4_0, Q8_0"):
        llamacpp.quantized_gguf(tmp_path / "src.gguf", "Q4_K_M")
