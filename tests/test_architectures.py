"""Qwen2, Qwen3, Mistral and Phi-3: the graph matches Hugging Face's own model of each (the independent
reference; Phi-3's is Phi3ForCausalLM on its fused weights), and each goes through the whole pipeline — quantize
(fast recipe, scaled down), `mobiq-export onnx` with its self-verification against PyTorch, `mobiq-run`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from mobiquant.exporter.onnx_export import export, export_baseline
from mobiquant.exporter.quantize import quantize
from mobiquant.exporter.source import load_float_model, resolve
from mobiquant.runtime.session import ModelSession
from tiny_archs import ARCHITECTURES, WINDOW, write_tiny

TINY_RECIPE = dict(samples=4, seq_len=48, batch=2, clip_steps=2, router_steps=2, threshold_samples=4,
                   threshold_seq_len=64, sensitivity_samples=1)
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune must be in want. " * 40


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=ARCHITECTURES)
def folder(request, tmp_path_factory):
    return write_tiny(request.param, tmp_path_factory.mktemp(request.param) / "hf")


@torch.no_grad()
def test_fp32_graph_matches_hugging_face_past_the_window(folder, tmp_path):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # its own class
    export_baseline(str(folder), "fp32", tmp_path, context=128)
    session = ModelSession(tmp_path, threads=1, hold=False)
    ids = np.random.default_rng(1).integers(3, 99, (1, 4 * WINDOW)).astype(np.int64)
    ref = reference(torch.from_numpy(ids)).logits.numpy()
    got, cache = session.forward(ids[:, :-1], session.empty_cache(ids.shape[1]))
    assert _rel(got, ref[:, :-1]) < 1e-4
    step, _ = session.forward(ids[:, -1:], cache)  # one cached decode step past the window
    assert _rel(step[0, -1], ref[0, -1]) < 1e-4


def test_phi3_loads_as_the_mistral_it_is_without_copies(tmp_path):
    from transformers import AutoModelForCausalLM

    from mobiquant.exporter.architectures import phi3_as_mistral

    folder = write_tiny("phi3", tmp_path / "hf")
    assert load_float_model(resolve(str(folder))).config.model_type == "mistral"
    phi3 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = phi3_as_mistral(phi3)
    assert model.config.sliding_window == WINDOW and not model.config.tie_word_embeddings
    fused = phi3.model.layers[0].self_attn.qkv_proj.weight
    k_proj = model.model.layers[0].self_attn.k_proj.weight  # rows 64..95 of q|k|v (4 x 16 query, 2 x 16 key dims)
    assert torch.equal(k_proj, fused[64:96]) and k_proj.data_ptr() == fused[64:96].data_ptr()
    ids = torch.from_numpy(np.random.default_rng(2).integers(3, 99, (1, 3 * WINDOW)))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, phi3(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_quantize_export_verify_and_run(folder, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    quantize(str(folder), tmp_path / "checkpoint", "fast", str(calib), group_size=32, progress=False,
             recipe_overrides=TINY_RECIPE, log=lambda msg: None)
    export(tmp_path / "checkpoint", tmp_path / "model", context=128)  # verifies against PyTorch or raises
    run = subprocess.run([sys.executable, "-m", "mobiquant.runtime.cli", str(tmp_path / "model"), "--budget", "low",
                          "-n", "8", "--raw", "-p", "It is a truth", "--stats"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "tok/s" in run.stderr + run.stdout


def test_an_unsupported_architecture_is_a_one_line_error(tmp_path):
    import json

    folder = write_tiny("qwen2", tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPTNeoXForCausalLM"]}))
    run = subprocess.run([sys.executable, "-m", "mobiquant.exporter.cli", "quantize", str(folder), "-o",
                          str(tmp_path / "ck")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "Phi3ForCausalLM" in run.stderr and "GPTNeoX" in run.stderr
