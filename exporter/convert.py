"""GGUF -> fp32 Hugging Face folder, once per model (loading a GGUF takes ~20 s).

``python -m mobiquant.exporter.convert smollm2-135m`` prints the folder. The folder
is written to a temporary name and renamed when complete, so an interrupted run
never leaves a half-written model behind.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from mobiquant.tools.fetch import FetchError
from mobiquant.tools.models import ModelEntry, ModelError, load_entry

from . import memory

_MARKER = "mobiq-source.json"


def hf_folder(entry: ModelEntry) -> Path:
    """The converted fp32 folder of ``entry`` (converting it first if needed)."""
    out = entry.hf_dir
    marker = out / _MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("gguf_sha256") == entry.gguf_sha256:
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = entry.gguf_path()
    print(f"[convert] {entry.name}: dequantizing {gguf.name} to fp32 (once)", file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain fp32 now: drop the GGUF quantizer marker so the folder loads as a normal model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _MARKER).write_text(json.dumps({"model": entry.name, "gguf": gguf.name, "gguf_sha256": entry.gguf_sha256}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"[convert] {entry.name}: written to {out} ({memory.summary()})", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert a registry model's GGUF into an fp32 Hugging Face folder.")
    parser.add_argument("model", help="a name from models/ (e.g. smollm2-135m)")
    args = parser.parse_args(argv)
    try:
        print(hf_folder(load_entry(args.model)))
    except (ModelError, FetchError) as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
