"""``make scale-run``: the exporter and runtime at the scale users bring, on this machine.

A seeded random model with the shapes of Llama-3.2-1B (hidden 2048, 16 layers, 32/8 heads, FFN 8192, vocabulary
128,256, tied embeddings; default rotary, as the graph builds it) goes through ``mobiq-export quantize`` (the fast
recipe with fewer calibration windows and steps, ``SCALED_RECIPE``: the same work per token, so the same memory per
step, in a fraction of the time), ``mobiq-export onnx`` (with its verification), ``mobiq-run`` and ``mobiq-bench
decode``. Each step runs as its own process; its wall time and peak resident memory (``wait4``) are printed as a
table and written to ``--json``. The weights are random: perplexity and text mean nothing here, scale is the point.

    python -m mobiquant.tools.scale_run [--json docs/results/llama-1b-scale.json] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .fetch import cache_dir

SHAPES = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
              intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=8192,
              rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
# fast recipe fields changed for the scale run: 8 x 128 calibration tokens (fast: 32 x 256), 4 + 4 steps per block
SCALED_RECIPE = dict(samples=8, seq_len=128, clip_steps=4, router_steps=4, threshold_samples=2,
                     threshold_seq_len=256, sensitivity_samples=1)
PROMPT = "It is a truth universally acknowledged"


def write_random_model(folder: Path, seed: int = 0) -> Path:
    """The random 1B-shaped Llama as a Hugging Face folder, with a word-level tokenizer of the same vocabulary
    (characters, then tokens named <i>); written once, reused after."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    specials = ["<unk>", "<s>", "</s>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    names = specials + chars
    vocab = {t: i for i, t in enumerate(names + [f"<{i}>" for i in range(SHAPES["vocab_size"] - len(names))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES))
    model.save_pretrained(tmp)
    tmp.replace(folder)
    return folder


def run_step(name: str, argv: list[str], log: Path) -> dict:
    """Run ``argv`` as a child process (output to ``log``); its wall time and peak resident memory."""
    print(f"[scale] {name}: {' '.join(argv)}", file=sys.stderr, flush=True)
    t = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    row = {"step": name, "wall_s": round(time.time() - t, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024),
           "exit": proc.returncode, "log": str(log)}
    print(f"[scale] {name}: {row['wall_s']:.0f} s, peak {row['peak_rss_mib']} MiB, exit {row['exit']}",
          file=sys.stderr, flush=True)
    if proc.returncode:
        tail = log.read_text().strip().splitlines()[-5:]
        raise SystemExit(f"[scale] {name} failed (exit {proc.returncode}); last lines of {log}:\n" + "\n".join(tail))
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scale_run", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=None, help="working folder (default: $MOBIQ_CACHE/scale/llama-1b-shapes)")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    p.add_argument("--threads", type=int, default=2, help="threads for mobiq-run and mobiq-bench (default 2)")
    args = p.parse_args(argv)
    work = args.work or cache_dir() / "scale" / "llama-1b-shapes"
    work.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    t = time.time()
    folder = write_random_model(work / "hf")
    rows = [{"step": "random model", "wall_s": round(time.time() - t, 1), "note": "written once, then reused"}]
    checkpoint, model = work / "checkpoint", work / "model"
    sets = [a for k, v in SCALED_RECIPE.items() for a in ("--set", f"{k}={v}")]
    rows.append(run_step("quantize", [str(bin_dir / "mobiq-export"), "quantize", str(folder), "-o", str(checkpoint),
                                      "--quiet", *sets], work / "quantize.log"))
    rows.append(run_step("onnx", [str(bin_dir / "mobiq-export"), "onnx", str(checkpoint), "-o", str(model)],
                         work / "onnx.log"))
    rows.append(run_step("mobiq-run", [str(bin_dir / "mobiq-run"), str(model), "--budget", "low", "--raw", "-n", "32",
                                       "--threads", str(args.threads), "--stats", "-p", PROMPT], work / "run.log"))
    bench_json = work / "bench.json"
    rows.append(run_step("mobiq-bench decode", [str(bin_dir / "mobiq-bench"), "decode", str(model), "--depths", "32",
                                                "--kv-bits", "8", "--threads", str(args.threads), "--json",
                                                str(bench_json)], work / "bench.log"))
    sizes = {f.name: f.stat().st_size for f in model.iterdir() if f.is_file()}
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "shapes": SHAPES,
              "recipe": {"name": "fast", **SCALED_RECIPE}, "steps": rows,
              "model_bytes": sum(sizes.values()), "bench": json.loads(bench_json.read_text())}
    print(f"\n{'step':<20} {'wall s':>8} {'peak MiB':>9}")
    for row in rows:
        print(f"{row['step']:<20} {row['wall_s']:>8.0f} {row.get('peak_rss_mib', ''):>9}")
    print(f"model directory: {sum(sizes.values()) / 2**20:.0f} MiB; decode: see {work / 'bench.log'}")
    print((work / "bench.log").read_text())
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
