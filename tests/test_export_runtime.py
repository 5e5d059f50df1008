"""Export to ONNX and the torch-free runtime, end to end on a tiny random Llama.

The exporter verifies its own file against PyTorch (raises otherwise); here the
runtime is held to recomputation: decoding with the KV cache must equal running
the whole sequence again, at every budget and across budget switches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mobiquant.exporter import checkpoint as ckpt
from mobiquant.exporter.onnx_export import export
from mobiquant.exporter.qmodel import THRESHOLD_GRID, build_quantized, slice_model
from mobiquant.exporter.source import load_float_model, resolve
from mobiquant.runtime import kvcache
from mobiquant.runtime.session import ContextError, ModelSession
from tiny_llama import write_tiny_llama

BUDGETS = (3.0, 4.0, 6.0, 8.0)


def recompute(session: ModelSession, ids: list[int], bits: float) -> np.ndarray:
    logits, _ = session.forward(np.array([ids]), session.empty_cache(), bits)
    return logits[0, -1]


@pytest.mark.parametrize("bits", BUDGETS)
def test_kv_cache_decode_equals_recompute(tiny, bits):
    """Exact-float file: with int8 activations a last-bit difference between the attention's prefill and
    decode paths may flip one activation's rounding, so equality is only defined for exact arithmetic."""
    s = ModelSession(tiny[0].parent / "model-exact", threads=1, hold=False)
    ids = [1, 40, 41, 42, 43, 44]
    logits, cache = s.forward(np.array([ids]), s.empty_cache(), bits)
    for step in range(6):
        nxt = int(logits[0, -1].argmax())
        ids.append(nxt)
        logits, cache = s.forward(np.array([[nxt]]), cache, bits)
        ref = recompute(s, ids, bits)
        err = np.abs(logits[0, -1] - ref).max() / np.abs(ref).max()
        assert err < 1e-4, f"bits={bits} step={step}: KV-cache logits differ from recompute by {err:.2e}"


def test_prefill_in_pieces_gives_the_logits_of_one_call(tiny):
    """A prompt fed in pieces of ``prefill_rows`` (the cache carried) scores every token as one call over it does,
    and the evaluation's NLL over a window is the NLL of those logits."""
    from mobiquant.tools.evaluate import log_softmax_nll, window_nll

    s = ModelSession(tiny[0].parent / "model-exact", threads=1, hold=False)
    ids = np.array([[1, *range(40, 63)]])
    whole, _ = s.forward(ids, s.empty_cache(), 4.0)
    s.prefill_rows = 5
    pieces = list(s.prefill(ids, s.empty_cache(), 4.0))
    assert [p.shape[1] for p, _ in pieces] == [5, 5, 5, 5, 4] and pieces[-1][1].length == ids.shape[1]
    np.testing.assert_allclose(np.concatenate([p for p, _ in pieces], 1), whole, rtol=0,
                               atol=1e-4 * np.abs(whole).max())
    last, cache = s.prefill_last(ids, s.empty_cache(), 4.0)
    assert last.shape == (1, 1, s.vocab) and cache.length == ids.shape[1]
    nll, _, _ = window_nll(s, ids[0], 4.0)
    assert nll == pytest.approx(log_softmax_nll(whole[0, :-1], ids[0, 1:]), rel=1e-5)


def test_cache_written_in_place_branches_and_grows(tiny):
    """The cache buffers are the attention's past and present at once: a roomy cache is extended in place,
    a second continuation from the same prefix overwrites the first one's positions and still equals
    recomputation, and a cache without room moves to larger buffers with its contents (capacity comes in
    blocks of 16 positions: 15 fit in one, the 17th needs a second)."""
    s = ModelSession(tiny[0].parent / "model-exact", threads=1, hold=False)
    prefix = [1, *range(40, 54)]
    for capacity in (64, 0):
        _, cache = s.forward(np.array([prefix]), s.empty_cache(capacity), 6.0)
        assert cache.capacity == max(capacity, 16)
        for branch in (60, 61):
            logits, grown = s.forward(np.array([[branch]]), cache, 6.0)
            logits, grown = s.forward(np.array([[branch + 10]]), grown, 6.0)
            ref = recompute(s, [*prefix, branch, branch + 10], 6.0)
            err = np.abs(logits[0, -1] - ref).max() / np.abs(ref).max()
            assert err < 1e-4, f"capacity={capacity} branch={branch}: {err:.2e} from recompute"
            assert grown.length == len(prefix) + 2
            assert (grown.buffers is cache.buffers) == (cache.capacity >= grown.length)


def test_prefix_cache_reuses_a_previous_turn(tiny):
    """A second turn that repeats the first turn's prompt and answer computes only its new tokens,
    and generates what a full recomputation generates (exact file, greedy)."""
    from mobiquant.runtime.control import BudgetControl
    from mobiquant.runtime.generate import GenerationStats, PrefixCache, generate
    from mobiquant.runtime.sampling import Sampler, SamplingConfig

    s = ModelSession(tiny[0].parent / "model-exact", threads=1, hold=False)

    def run(prompt, prefix=None):
        stats = GenerationStats()
        steps = generate(s, prompt, 6, Sampler(SamplingConfig(repetition_penalty=1.0)), BudgetControl(6.0),
                         frozenset(), str, stats, prefix=prefix)
        return [step.token for step in steps], stats

    prefix = PrefixCache()
    first = [1, 40, 41, 42, 43]
    answer, _ = run(first, prefix)
    second = first + answer + [50, 51, 52]
    reused, stats = run(second, prefix)
    fresh, fresh_stats = run(second)
    assert stats.reused_tokens == len(first) + len(answer) - 1  # the last answer token was never fed
    assert fresh_stats.reused_tokens == 0
    assert reused == fresh
    cache = prefix.start(s, second, len(second))  # the same start, at the level of logits
    got = s.forward(np.array([second[cache.length:]]), cache, 6.0)[0][0, -1]
    ref = recompute(s, second, 6.0)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
    third = [1, 40, 60, 61]  # shares two tokens, then differs: the cache is cut back there
    tokens, stats = run(third, prefix)
    assert stats.reused_tokens == 2 and tokens == run(third)[0]


def test_context_overflow_is_a_clear_error(tiny):
    s = ModelSession(tiny[0], threads=1, hold=False)
    _, cache = s.forward(np.array([[1] * 100]), s.empty_cache(), 8.0)
    with pytest.raises(ContextError, match=r"129 positions expected <= the model's context 128 \(100 cached \+ 29 new\)"):
        s.forward(np.array([[1] * 29]), cache, 8.0)


def test_budget_switch_between_steps_changes_bits_read(tiny_model_dir):
    s = ModelSession(tiny_model_dir, threads=1, hold=False)
    ids = [1, 50, 51, 52, 53, 54, 55, 56]
    logits, cache = s.forward(np.array([ids]), s.empty_cache(), 8.0)
    seen = []
    for bits in (8.0, 3.0, 6.0, 2.5):
        nxt = int(logits[0, -1].argmax())
        ids.append(nxt)
        logits, cache = s.forward(np.array([[nxt]]), cache, bits)
        seen.append(s.last_avg_bits)
        assert logits.shape == (1, 1, s.vocab)
        assert np.isfinite(logits).all()
    assert seen[0] == pytest.approx(8.0)
    assert seen[1] < seen[0] and seen[3] < seen[2], f"avg bits per step did not follow the budget: {seen}"


def test_avg_bits_tracks_target_on_a_prompt(tiny_model_dir):
    s = ModelSession(tiny_model_dir, threads=1, hold=False)
    rng = np.random.default_rng(1)
    ids = np.array([[1, *rng.integers(3, 99, 63)]])
    got = []
    for bits in BUDGETS:
        s.forward(ids, s.empty_cache(), bits)
        got.append(s.last_avg_bits)
    assert got == sorted(got) and got[-1] == pytest.approx(8.0), got
    assert abs(got[1] - 4.0) < 0.75, f"4-bit target read {got[1]:.2f} bits on random tokens"


def run_cli(*args, stdin: bytes | None = None, env=None):
    return subprocess.run([sys.executable, "-m", "mobiquant.runtime.cli", *map(str, args)], input=stdin,
                          capture_output=True, timeout=120, env=env)


def test_cli_generates_with_stats(tiny_model_dir):
    r = run_cli(tiny_model_dir, "--budget", "mid", "-p", "hello", "-n", "8", "--stats", "--threads", "1")
    assert r.returncode == 0, r.stderr.decode()
    err = r.stderr.decode()
    assert "decode" in err and "average bits read" in err and "peak memory" in err


def test_cli_reads_piped_stdin(tiny_model_dir):
    r = run_cli(tiny_model_dir, "--budget", "3.5", "-n", "4", "--raw", stdin=b"abc")
    assert r.returncode == 0, r.stderr.decode()


def test_a_version_4_file_still_runs(tiny_model_dir, tmp_path):
    """Version 5 only moved Gemma 3's and Qwen3's q/k norms into KVAttention: a version-4 file is valid as it is."""
    import shutil

    model = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, model)
    meta = json.loads((model / "mobiq.json").read_text())
    (model / "mobiq.json").write_text(json.dumps({**meta, "format_version": 4}))
    r = run_cli(model, "-p", "hi", "-n", "2", "--raw")
    assert r.returncode == 0, r.stderr.decode()


@pytest.mark.parametrize("case", ["missing", "not-mobiquant", "not-onnx", "unknown-version", "retired-version",
                                  "budget-name", "bits-range", "empty-prompt", "bad-utf8", "no-tokenizer",
                                  "garbage-tokenizer", "garbage-tokenizer-config", "bad-template", "template-raises",
                                  "truncated-data", "missing-data", "malformed-files-record", "max-new-too-large"])
def test_cli_bad_input_is_one_line_error(tiny_model_dir, tmp_path, case):
    import json
    import shutil

    model, args, stdin = tiny_model_dir, ["-p", "hi", "-n", "2"], None
    if case == "missing":
        model = tmp_path / "nope"
    elif case == "not-mobiquant":
        (tmp_path / "model.onnx").write_bytes(b"not a model")
        model = tmp_path / "model.onnx"
    elif case == "not-onnx":
        model = tiny_model_dir / "mobiq.json"
    elif case == "unknown-version":
        model = tmp_path / "copy"
        shutil.copytree(tiny_model_dir, model)
        meta = json.loads((model / "mobiq.json").read_text())
        (model / "mobiq.json").write_text(json.dumps({**meta, "format_version": 99}))
    elif case == "retired-version":  # routers as SliceRouter nodes: refused by name
        model = tmp_path / "copy"
        shutil.copytree(tiny_model_dir, model)
        meta = json.loads((model / "mobiq.json").read_text())
        (model / "mobiq.json").write_text(json.dumps({**meta, "format_version": 2}))
    elif case == "budget-name":
        args += ["--budget", "turbo"]
    elif case == "bits-range":
        args += ["--budget", "9"]
    elif case == "empty-prompt":
        args = ["-p", "   "]
    elif case == "bad-utf8":
        args, stdin = ["-n", "2"], b"\xff\xfe hello"
    elif case == "max-new-too-large":
        args = ["-p", "hi", "-n", "100000"]
    else:  # a damaged copy of the model directory
        model = tmp_path / "copy"
        shutil.copytree(tiny_model_dir, model)
        damage = {"no-tokenizer": lambda: (model / "tokenizer.json").unlink(),
                  "garbage-tokenizer": lambda: (model / "tokenizer.json").write_bytes(b"\x00garbage{"),
                  "garbage-tokenizer-config": lambda: (model / "tokenizer_config.json").write_text("[1, 2"),
                  "bad-template": lambda: (model / "chat_template.jinja").write_text("{% for %}"),
                  "template-raises": lambda: (model / "chat_template.jinja").write_text(
                      "{{ raise_exception('roles must alternate') }}"),
                  "truncated-data": lambda: os.truncate(model / "model.onnx.data", 4096),
                  "missing-data": lambda: (model / "model.onnx.data").unlink(),
                  "malformed-files-record": lambda: (model / "mobiq.json").write_text(json.dumps(
                      {**json.loads((model / "mobiq.json").read_text()), "files": {"../x": 1}}))}
        damage[case]()
        if case in ("no-tokenizer", "garbage-tokenizer", "garbage-tokenizer-config", "bad-template", "template-raises"):
            from mobiquant.runtime.modelfile import record_files  # as if exported so: the text loaders must say it

            meta = json.loads((model / "mobiq.json").read_text())
            (model / "mobiq.json").write_text(json.dumps({**meta, "files": record_files(model)}))
    r = run_cli(model, *args, stdin=stdin)
    err = r.stderr.decode().strip()
    assert r.returncode != 0, f"{case}: exit 0"
    assert "Traceback" not in err and len(err.splitlines()) == 1, f"{case}: {err}"
    if case == "retired-version":
        assert "version 2 (routers as separate SliceRouter nodes)" in err and "re-export" in err, err
    named = {"no-tokenizer": "tokenizer.json", "garbage-tokenizer": "tokenizer.json",
             "garbage-tokenizer-config": "tokenizer_config.json", "bad-template": "chat template",
             "template-raises": "roles must alternate", "truncated-data": "model.onnx.data: expected",
             "missing-data": "model.onnx.data expected", "malformed-files-record": '"files" expected'}
    assert named.get(case, "") in err, err


def test_verify_finds_a_corrupted_block_that_loading_does_not(tiny_model_dir, tmp_path):
    """256 KB overwritten in the middle of model.onnx.data (same size): the size check at load cannot see it;
    --verify names the file and exits 1. An intact copy verifies with exit 0."""
    import shutil

    model = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, model)
    r = run_cli(model, "--verify")
    assert r.returncode == 0 and "files intact" in r.stdout.decode(), r.stdout.decode() + r.stderr.decode()
    data = model / "model.onnx.data"
    size = data.stat().st_size
    n = min(1 << 18, size // 2)  # the tiny model's data is smaller than 512 KB
    with data.open("r+b") as f:
        f.seek(size // 2 - n // 2)
        f.write(np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes())
    assert data.stat().st_size == size
    run = run_cli(model, "-p", "hi", "-n", "2", "--raw")  # sizes match: it loads, unless the op's scale checks
    err = run.stderr.decode().strip()                       # catch the damage (one line then)
    assert run.returncode == 0 or ("Traceback" not in err and len(err.splitlines()) == 1), err
    r = run_cli(model, "--verify")
    out = r.stdout.decode()
    assert r.returncode == 1 and "MISMATCH model.onnx.data" in out and "ok       tokenizer.json" in out, out
    assert "Traceback" not in r.stderr.decode()


def test_a_named_onnx_file_is_the_one_that_runs(tiny, tmp_path):
    """MODEL may be one .onnx file beside mobiq.json: that graph runs, not the directory's model.onnx."""
    import shutil

    import onnx

    exact = tiny[0].parent / "model-exact"
    model = tmp_path / "model"
    shutil.copytree(tiny[0], model)  # the int8-activation file, and the exact one beside it as exact.onnx
    shutil.copy(exact / "model.onnx.data", model / "exact.onnx.data")
    graph = onnx.load(str(exact / "model.onnx"), load_external_data=False)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "exact.onnx.data"
    onnx.save(graph, str(model / "exact.onnx"))

    def logits(path):
        s = ModelSession(path, threads=1, hold=False)
        return s.forward(np.array([[1, 40, 41, 42]]), s.empty_cache(), 8.0)[0]

    assert not np.array_equal(logits(tiny[0]), logits(exact))  # int8 and exact activations differ
    np.testing.assert_array_equal(logits(model / "exact.onnx"), logits(exact))
    np.testing.assert_array_equal(logits(model / "model.onnx"), logits(tiny[0]))


BLOCKED_ON_A_DEVICE = ("torch", "onnx", "transformers", "onnxscript", "safetensors", "tqdm", "psutil", "gguf",
                      "mobiquant.exporter", "mobiquant.tools")


def test_runtime_runs_with_only_its_own_dependencies(tiny_model_dir):
    """The runtime generates with the workstation packages and our own tools package made unimportable, and
    imports none of them."""
    code = (f"import sys\nfor name in {BLOCKED_ON_A_DEVICE!r}:\n    sys.modules[name] = None\n"
            "from mobiquant.runtime import Model\n"
            "from mobiquant.runtime.cli import main\n"
            f"m = Model.load({str(tiny_model_dir)!r}, threads=1)\n"
            "print(''.join(m.generate('hi', budget='low', max_new_tokens=5)))\n"
            f"assert main([{str(tiny_model_dir)!r}, '-p', 'hi', '-n', '3', '--budget', 'auto']) == 0\n"
            "loaded = [k for k, v in sys.modules.items() if v is not None]\n"
            f"assert not [k for k in loaded if k.split('.')[0] in {BLOCKED_ON_A_DEVICE!r} or "
            f"k.startswith(('mobiquant.exporter', 'mobiquant.tools'))], loaded\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()


def test_mobiq_export_without_torch_says_how_to_install_it():
    code = "import sys; sys.modules['torch'] = None\nfrom mobiquant.exporter.cli import main\nsys.exit(main(['--help']))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    err = r.stderr.decode().strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1, err
    assert "torch not installed" in err or "torch," in err
    assert "pip install 'mobiquant[export]'" in err


def test_signals_command_on_a_fake_pi_tree(tmp_path):
    """--signals reads the fake tree and maps the policy's level to the model's own named budget."""
    import json

    from mobiquant.runtime.modelfile import FORMAT_NAME, FORMAT_VERSION

    zone = tmp_path / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("79500\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"")  # --signals reads only mobiq.json
    (model / "mobiq.json").write_text(json.dumps({
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": "mobiquant", "context": 8192,
        "named_budgets": {"low": 4.5, "mid": 5.0, "high": 6.0, "max": 8.0},
        "kv_cache": {"head_dim": 64, "kv_heads": 3, "layers": 30}}))
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal: 1000000 kB\nMemAvailable: 307200 kB\n")  # 300 MB
    r = subprocess.run([sys.executable, "-m", "mobiquant.runtime.cli", str(model), "--signals", "--signals-root",
                        str(tmp_path)], capture_output=True, timeout=60)
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()
    assert "79.5" in out and "low = 4.5 bits" in out and "memory       300 MB available" in out, out
    # SmolLM2's shapes: 8,192 positions at 8 bits = 96 MB > a quarter of 300 MB
    assert "KV cache (--kv-bits auto): 4 bits (8-bit cache 96 MB > 25% of 300 MB available" in out, out


def test_cli_on_a_hot_pi_stays_at_the_floor_and_paces(tiny_model_dir, tmp_path):
    """86 °C on a fake Pi tree: auto keeps the model's low (never 2 bits) and pauses after each token; -v and
    --stats say so."""
    zone = tmp_path / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("86000\n")
    policy = tmp_path / "policy.toml"
    policy.write_text("pace_max_s = 0.05\n")
    r = run_cli(tiny_model_dir, "--budget", "auto", "--signals-root", tmp_path, "--policy", policy, "-v", "--stats",
                "-p", "hi", "-n", "6", "--raw", "--threads", "1")
    err = r.stderr.decode()
    assert r.returncode == 0, err
    low = json.loads((tiny_model_dir / "mobiq.json").read_text())["named_budgets"]["low"]
    assert f"[budget] auto: {low:g} bits, pausing 0.05 s per token" in err, err
    assert "to let the device cool (pacing)" in err and f"average bits read" in err, err


def test_mobiq_eval_json_schema_and_agreement_with_pytorch(tiny, tmp_path):
    """Two budgets x two KV cache precisions: schema of the JSON, ONNX Runtime PPL with a float32 cache within
    0.5% of the PyTorch model's (8-bit cache: 2%), and the cache's size per precision."""
    import json

    from mobiq_eval_reference import torch_ppl

    model_dir, q = tiny
    text = tmp_path / "text.txt"
    text.write_text("It was a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife. " * 12)
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "-m", "mobiquant.tools.evaluate", str(model_dir), "--corpus", str(text),
                        "--budgets", "3,max", "--context", "64", "--max-tokens", "0", "--threads", "1",
                        "--kv-bits", "32,8", "--json", str(out), "--plot", str(tmp_path / "eval.png")],
                       capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    result = json.loads(out.read_text())
    assert {"model", "corpus", "context", "tokens", "cpu", "threads", "rows"} <= set(result)
    assert [(row["target_bits"], row["kv_bits"]) for row in result["rows"]] == [(3.0, 32), (3.0, 8), (8.0, 32), (8.0, 8)]
    for row in result["rows"]:
        assert set(row) == {"name", "target_bits", "avg_bits", "ppl", "prefill_tok_s", "decode_tok_s", "peak_rss_mb",
                            "kv_bits", "kv_mb"}
        ref = torch_ppl(q, model_dir, text, 64, row["target_bits"])
        tolerance = 0.005 if row["kv_bits"] == 32 else 0.02
        assert abs(row["ppl"] / ref - 1) < tolerance, f"{row['target_bits']} bits, KV {row['kv_bits']}: ORT PPL " \
                                                      f"{row['ppl']} vs torch {ref}"
        assert row["kv_mb"] == pytest.approx(result["rows"][0]["kv_mb"] * kvcache.block_bytes(row["kv_bits"], 16)
                                             / kvcache.block_bytes(32, 16))
    assert (tmp_path / "eval.png").stat().st_size > 1000


def token_routed_tiny(tmp_path, seed: int, validation=None):
    """(source, quantized tiny Llama with token routing fitted on 4 random windows, those windows, the fit's record,
    the rng); ``validation`` windows are passed on to the fit (the routing check)."""
    from mobiquant.exporter.calibrate import get_recipe
    from mobiquant.exporter.quantize import fit_budgets

    source = resolve(str(write_tiny_llama(tmp_path / "hf")))
    model = load_float_model(source)
    q = build_quantized(model, slice_model(model, 64))
    rng = np.random.default_rng(seed)
    tokens = torch.from_numpy(rng.integers(3, 99, (4, 96)))
    tokens[:, 0] = 1
    recipe = get_recipe("fast", sensitivity_samples=2, routing="token", router_fit="ridge")
    record = fit_budgets(q, tokens, recipe, progress=False, log=lambda msg: None, validation=validation)
    return source, q, tokens, record, rng


def test_token_routed_checkpoint_exports_and_routes_in_the_op(tmp_path):
    """The token-routing path on the tiny model: per-token probe, ridge routers, cost-curve allocation,
    thresholds; the export verifies the fused op against PyTorch at every named budget (or raises). In
    the file every router's row is constant at 4 and 8 bits, most routers split tokens at 3.5, and the
    bits read follow the target on text the thresholds never saw."""
    import onnx
    from onnx import numpy_helper

    from mobiquant.exporter.qmodel import grid_index
    from mobiquant.runtime import ops

    source, q, tokens, record, rng = token_routed_tiny(tmp_path, 3)
    assert record["routing"] == "token" and set(record["spearman"]) == set(q.routers)
    assert record["token_dependent"]["4"] == 0 and record["token_dependent"]["8"] == 0
    assert record["token_dependent"]["3.5"] >= 0.5, record["token_dependent"]
    config = ckpt.CheckpointConfig(source.name, source.identity, source.architecture, 4, 64, 4, "fast", "random")
    ckpt.save(q, config, tmp_path / "checkpoint", record)
    export(tmp_path / "checkpoint", tmp_path / "model", context=128)

    graph = onnx.load(str(tmp_path / "model" / "model.onnx"))
    tables = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer
              if ".router.thresholds" in t.name and t.name.startswith("layers.")}  # not the head's constant router
    assert len(tables) == len(q.routers)
    for bits, constant in ((4.0, True), (8.0, True), (3.5, False)):
        rows = np.stack([t[grid_index(bits)] for t in tables.values()])
        rows_constant = (np.abs(rows) >= ops.THRESHOLD_NEVER / 10).all(-1)
        assert rows_constant.all() if constant else rows_constant.mean() <= 0.5, (bits, rows)
    session = ModelSession(tmp_path / "model", threads=1, hold=False)
    held_out = np.array([[1, *rng.integers(3, 99, 127)]])
    for bits in (3.0, 3.5, 4.5):
        session.forward(held_out, session.empty_cache(), bits)
        assert abs(session.last_avg_bits - bits) <= 0.35, (bits, session.last_avg_bits)


def test_each_budget_below_the_base_keeps_token_routing_only_where_it_validates_no_worse_over_the_texts(tmp_path):
    """With validation windows of two texts, the token fit is checked against static allocation at 2.5, 3 and 3.5
    bits: token routing is kept only where the product of its two PPLs is no higher (the mean log-PPL; an independent
    formula here), and the tables left in the model give,
    on each text, the kept fit's perplexity recorded (recomputed here); rows at and above the base are the token
    fit's."""
    from mobiquant.exporter.evaluate import perplexity

    rng = np.random.default_rng(4)
    validation = {"low-ids": torch.from_numpy(rng.integers(3, 50, (2, 64))),
                  "high-ids": torch.from_numpy(rng.integers(50, 99, (2, 64)))}
    for w in validation.values():
        w[:, 0] = 1
    _, unchecked_q, _, unchecked, _ = token_routed_tiny(tmp_path / "a", 4)
    _, q, _, record, _ = token_routed_tiny(tmp_path / "b", 4, validation)
    above = {n: r.thresholds[THRESHOLD_GRID >= 4].clone() for n, r in unchecked_q.routers.items()}
    choice = record["routing_by_budget"]
    assert set(choice) == {"2.5", "3", "3.5"} and "routing_by_budget" not in unchecked
    for bits, c in choice.items():
        assert set(c["token"]) == set(c["static"]) == set(validation)
        product = {name: np.prod([c[name][t] for t in validation]) for name in ("token", "static")}
        assert c["kept"] == ("token" if product["token"] <= product["static"] else "static"), c
        q.set_target_bits(float(bits))
        for text, w in validation.items():
            assert perplexity(q.model, w)[0] == pytest.approx(c[c["kept"]][text], rel=1e-3), (bits, text, c)
    for n, r in q.routers.items():
        assert torch.equal(r.thresholds[THRESHOLD_GRID >= 4], above[n]), n


def test_rows_nearest_a_budget_where_static_validates_better_take_the_static_tables(tmp_path):
    """Static better at 3 bits only: rows 2.8-3.2 are the static fit's (fitted here on their own), every other row
    the token fit's."""
    from mobiquant.exporter.allocation import CostCurve, allocate, router_sizes
    from mobiquant.exporter.routing_choice import compose, tables_of
    from mobiquant.exporter.thresholds import fit_thresholds_online, record_widths

    _, q, tokens, record, _ = token_routed_tiny(tmp_path, 5)
    token = tables_of(q)
    static_alloc = lambda b: allocate({n: CostCurve.static(v) for n, v in record["sensitivity"].items()},  # noqa: E731
                                      router_sizes(q), b, max_bits=8)
    fit_thresholds_online(q, tokens, (2.5, 3.0, 3.5), static_alloc)
    record_widths(q, static_alloc)
    static = tables_of(q)
    compose(q, token, static, {2.5: "token", 3.0: "static", 3.5: "token"})
    rows = torch.from_numpy((THRESHOLD_GRID > 2.75) & (THRESHOLD_GRID < 3.25))
    assert rows.sum() == 5 and any(not torch.equal(token[n][0][rows], static[n][0][rows]) for n in token)
    for n, r in q.routers.items():
        for got, t, s in zip((r.thresholds, r.widths), token[n], static[n]):
            assert torch.equal(got[rows], s[rows]) and torch.equal(got[~rows], t[~rows]), n


def test_cli_interactive_chat_drops_old_turns_and_quits_cleanly(tiny_model_dir):
    """mobiq-run on a terminal: a chat longer than the tiny model's 128-token context keeps going, says which
    turns it left out, and an empty line quits with 0."""
    import pty

    master, slave = pty.openpty()
    lines = "".join(f"question number {i}, tell me more\n" for i in range(5)) + "\n"
    p = subprocess.Popen([sys.executable, "-m", "mobiquant.runtime.cli", str(tiny_model_dir), "-n", "40",
                          "--budget", "mid", "--threads", "1"], stdin=slave, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    os.close(slave)
    os.write(master, lines.encode())
    out, err = p.communicate(timeout=120)
    os.close(master)
    err = err.decode()
    assert p.returncode == 0, err
    assert "Traceback" not in err and "oldest turn(s) left out to fit the context" in err, err
    assert out.decode().count("> ") == 6  # five replies, then the quitting prompt


def test_an_untied_embedding_is_stored_in_8_bit_blocks_that_gather_block_quantized_reads():
    """The exporter's 8-bit embedding (untied models): ONNX Runtime's GatherBlockQuantized returns exactly
    dequantize_rows, each value within half a step of the float row."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from mobiquant.exporter.graph import EMBEDDING_BLOCK, MS_DOMAIN, dequantize_rows, quantize_rows

    rows = np.random.default_rng(0).standard_normal((50, 4 * EMBEDDING_BLOCK)).astype(np.float32)
    rows[3] = 0.0  # a constant block: scale 1, exact zeros
    rows[7, :EMBEDDING_BLOCK] = 2.5  # one value in a block
    codes, scale, zero = quantize_rows(rows)
    node = helper.make_node("GatherBlockQuantized", ["codes", "ids", "scale", "zero"], ["out"], domain=MS_DOMAIN,
                            gather_axis=0, quantize_axis=1, block_size=EMBEDDING_BLOCK, bits=8)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, None])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(scale, "scale"),
                               numpy_helper.from_array(zero, "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS_DOMAIN, 1)])
    ids = np.array([[0, 3, 7, 49, 7]])
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"ids": ids})[0][0]
    want = dequantize_rows(codes, scale, zero)[ids[0]]
    np.testing.assert_array_equal(got, want)
    step = np.repeat(scale, EMBEDDING_BLOCK, axis=1)[ids[0]]
    assert (np.abs(want - rows[ids[0]]) <= step / 2 + 1e-6).all()
    assert (want[1] == 0).all() and np.allclose(want[2, :EMBEDDING_BLOCK], 2.5, rtol=1e-6)



@pytest.mark.parametrize("n,k,group,slices", [(37, 128, 64, 4), (16, 64, 32, 2), (50, 576, 64, 4)])
def test_a_tied_embedding_is_read_from_the_lm_head_slices(n, k, group, slices):
    """head_rows (standard ONNX ops over the head's packed slices) against runtime/format.py's float64 W^(S)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from mobiquant.exporter.graph import OPSET, GraphBuilder, head_rows
    from mobiquant.runtime import format as F

    sliced = F.quantize(np.random.default_rng(n).standard_normal((n, k)).astype(np.float32), group, slices)
    g = GraphBuilder()
    head_rows(g, "ids", g.const(sliced.packed, "slices"), g.const(sliced.scales, "scales"),
              g.const(sliced.zero_points, "zero"), slices, k, group, "rows")
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "T"])],
                              [helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)], g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    ids = np.array([[0, n - 1, 15, min(16, n - 1), 3], [n // 2, 1, 1, n - 1, 0]])
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"ids": ids})[0]
    want = sliced.dequantize(slices)[ids]
    assert got.shape == (2, 5, k)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


def test_the_tied_tiny_model_stores_no_embedding_of_its_own(tiny_model_dir):
    import onnx

    graph = onnx.load(str(tiny_model_dir / "model.onnx"), load_external_data=False).graph
    assert not [t.name for t in graph.initializer if t.name.startswith("embed_tokens")]
    first = graph.node[0]
    assert first.input[0] == "input_ids" and any(n.op_type == "GatherElements" for n in graph.node)


def test_footprint_counts_every_weight_byte_once_when_all_slices_are_read(tiny_model_dir):
    """Reading every slice of every linear is the whole file's linear slices plus their parameters as the int8-mode
    op reads them (binary16, and a float32 per row) (the tied embedding adds nothing: its rows are the head's);
    reading none of the routed slices leaves only those parameters and the head."""
    import onnx

    from mobiquant.tools.footprint import bytes_per_token

    graph = onnx.load(str(tiny_model_dir / "model.onnx")).graph
    init = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    linears = [n for n in graph.node if n.op_type == "ResidualSliceMatMul"]
    assert all(a.i == 4 for n in linears for a in n.attribute if a.name == "accuracy_level")
    params = sum(init[n.input[2]].astype(np.float16).nbytes * 2 + 4 * init[n.input[2]].shape[0] for n in linears)
    weights = sum(init[n.input[1]].nbytes for n in linears) + params
    row = 0.0  # read from the head, whose bytes are counted already
    slices = int(json.loads((tiny_model_dir / "mobiq.json").read_text())["num_slices"])
    assert bytes_per_token(tiny_model_dir, 2.0 * slices, slices) == pytest.approx(weights + row)
    routed = sum(init[n.input[1]].nbytes for n in linears if "lm_head" not in n.input[1])
    assert bytes_per_token(tiny_model_dir, 0.0, slices) == pytest.approx(weights + row - routed)


def test_an_untied_model_exports_its_embedding_in_8_bit_blocks_and_verifies(tmp_path):
    """Untied weights: the embedding cannot come from the head; the file stores it in 8-bit blocks, the export's
    verification against PyTorch (same rows) passes, and the runtime generates."""
    import onnx

    from mobiquant.exporter.thresholds import fit_thresholds
    from mobiquant.runtime import Model

    source = resolve(str(write_tiny_llama(tmp_path / "hf", seed=3, tied=False)))
    model = load_float_model(source)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    q = build_quantized(model, slice_model(model, 64))
    fit_thresholds(q, [torch.from_numpy(np.random.default_rng(0).integers(3, 99, (2, 64)))])
    config = ckpt.CheckpointConfig(source.name, source.identity, source.architecture, 4, 64, 4, "minmax", "random")
    ckpt.save(q, config, tmp_path / "checkpoint")
    export(tmp_path / "checkpoint", tmp_path / "model", context=128)  # verifies against PyTorch or raises
    graph = onnx.load(str(tmp_path / "model" / "model.onnx"), load_external_data=False).graph
    assert any(n.op_type == "GatherBlockQuantized" for n in graph.node)
    assert not any(n.op_type == "GatherElements" for n in graph.node)
    runtime = Model.load(tmp_path / "model", threads=1)
    runtime.codec.stop_ids = frozenset()
    gen = runtime.generate("hi", max_new_tokens=4, chat=False)
    list(gen)
    assert len(gen.stats.steps) == 4 and gen.stop_reason == "max tokens"


def test_teacher_forced_greedy_equals_step_by_step_greedy():
    """The verification's PyTorch side: one forward over prompt + continuation gives PyTorch's own greedy
    continuation when that continuation is fed, and flags the first token where a different one departs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mobiquant.exporter.onnx_export import _greedy_torch

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    prompt = np.array([[1, 5, 9, 12, 30]], np.int64)
    ids = torch.from_numpy(prompt)
    with torch.no_grad():
        for _ in range(12):  # the reference: the whole sequence rerun for every token
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
        greedy = ids[0, prompt.shape[1]:].tolist()
        assert _greedy_torch(model, prompt, greedy) == greedy
        other = greedy[:7] + [(greedy[7] + 1) % 64] + greedy[8:]
        got = _greedy_torch(model, prompt, other)
    assert got[:7] == other[:7] and got[7] == greedy[7] != other[7]
