"""``mobiq-export onnx CHECKPOINT -o DIR``: the deployable model directory, verified.

Writes ``DIR/model.onnx`` + ``DIR/model.onnx.data`` (every large tensor external,
page-aligned so ONNX Runtime can map it and untouched slices stay on disk), the
tokenizer files, and ``DIR/mobiq.json`` (format version, slices, group size, named
budgets, context, source model, chat template, stop tokens). The same facts are in
the graph's ``metadata_props``. After writing, the file is verified: ONNX Runtime
against the PyTorch quantized model on the same tokens at every named budget
(logits within tolerance, identical greedy continuations) and ``onnx.checker``.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from mobiquant.runtime import format as F
from mobiquant.runtime import kvcache, ops
from mobiquant.runtime.modelfile import (DATA_FILE, FORMAT_NAME, FORMAT_VERSION, META_FILE, MODEL_FILE, NAMED_BUDGETS,
                                         record_files)

from . import checkpoint as ckpt
from . import memory
from . import head
from .budgets import file_perplexities, measure_named_budgets, validation_windows
from .graph import (DecoderSpec, Fp32Linear, LinearKind, TensorSink, build_decoder, dequantize_rows, embedding_rows,
                    quantize_rows)
from .linears import MatMulNBitsLinear, MoBiQuantLinear
from .qmodel import THRESHOLD_GRID, grid_index
from .quantize import token_dependent_fraction
from .source import Source, load_float_model, resolve

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
MAX_DEFAULT_CONTEXT = 8192  # the model's own context, up to this (rotary tables: 64 KB per 1k positions and base)
EXACT_TOLERANCE = 1e-4  # exact-float graph vs PyTorch: max |difference| / max |logits|
INT8_TOLERANCE = 0.15  # int8-activation file vs the exact graph: max |difference| / max |logits| (warning)
INT8_MIN_TOP1 = 0.8  # ... and agreement of the argmax over the prompt's positions (warning)


class ExportError(RuntimeError):
    """The exported file does not match its PyTorch reference (lists every output that differs)."""


def save_model(build: Callable[[TensorSink], onnx.ModelProto], out_dir: Path, meta: dict) -> Path:
    """model.onnx + model.onnx.data from ``build(sink)``, ``meta`` as metadata_props; both replace older files
    only once complete."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data_tmp = out_dir / (DATA_FILE + ".partial")
    with TensorSink(data_tmp, DATA_FILE) as sink:
        model = build(sink)
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    model_tmp = out_dir / (MODEL_FILE + ".partial")
    model_tmp.write_bytes(model.SerializeToString())
    data_tmp.replace(out_dir / DATA_FILE)
    model_tmp.replace(out_dir / MODEL_FILE)
    return out_dir / MODEL_FILE


def model_metadata(source: Source, config: ckpt.CheckpointConfig | None, kind: str, context: int,
                   tokenizer_dir: Path, routing: str | None = None, spec: DecoderSpec | None = None) -> dict:
    """What the runtime needs besides the graph (also stored as metadata_props)."""
    gen = {}
    if (tokenizer_dir / "generation_config.json").is_file():
        gen = json.loads((tokenizer_dir / "generation_config.json").read_text())
    tok_cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    eos = gen.get("eos_token_id", [])
    meta = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": kind, "source_model": source.name,
        "source_identity": source.identity, "architecture": source.architecture, "context": context,
        "bos_token": tok_cfg.get("bos_token"), "eos_tokens": [tok_cfg.get("eos_token")],
        "eos_token_ids": eos if isinstance(eos, list) else [eos],
    }
    if spec is not None:  # a KVAttention graph: the session sizes its cache blocks from these
        meta["kv_cache"] = {"head_dim": spec.head_dim, "kv_heads": spec.kv_heads, "layers": spec.num_layers,
                            "bits": list(kvcache.BITS), "default_bits": kvcache.DEFAULT_BITS}
    if config is not None:
        meta.update({"routing": routing, "layout": F.LAYOUT_VERSION, "num_slices": config.num_slices, "group_size": config.group_size,
                     "slice_bits": F.SLICE_BITS, "lm_head_slices": config.lm_head_slices, "recipe": config.recipe,
                     "named_budgets": NAMED_BUDGETS, "bits_range": [2.0, 2.0 * config.num_slices]})
    return meta


def default_context(config) -> int:
    """The context a file is exported for: the model's own, up to MAX_DEFAULT_CONTEXT."""
    return min(int(config.max_position_embeddings), MAX_DEFAULT_CONTEXT)


def export(checkpoint_dir: Path, out_dir: Path, context: int | None = None, accuracy_level: int = ops.ACCURACY_INT8,
           verify_tokens: int = 32, attention: str = "kv", head_follows: bool = True) -> Path:
    """Checkpoint -> verified model directory. ``attention`` "gqa" writes the same file with ONNX Runtime's
    GroupQueryAttention and a float32 cache instead of KVAttention, ``head_follows`` False one whose LM head reads
    every slice at every budget (controls for measurements)."""
    meta_raw, config = ckpt.read_meta(checkpoint_dir)
    source = resolve(config.model)
    model = load_float_model(source)
    tied = _tied(model)
    qmodel, _ = ckpt.load(checkpoint_dir, model, source.identity)  # the float linears are freed here
    context = context or default_context(model.config)
    spec = DecoderSpec.from_hf_config(model.config, context)
    print(f"[export] building graph ({spec.num_layers} layers, context {context}; {memory.summary()})",
          file=sys.stderr, flush=True)
    meta = model_metadata(source, config, "mobiquant", context, source.folder,
                          (meta_raw.get("allocation") or {}).get("routing", "static"), spec if attention == "kv" else None)
    embedding_bits = use_stored_embedding(model, spec, qmodel, tied)
    weights = _float_tensors(model)  # embedding, norms, biases (views)

    def graph(level: int):
        return lambda sink: build_decoder(spec, weights, MoBiQuantLinear(qmodel, level), embedding_bits=embedding_bits,
                                          attention=attention, sink=sink)

    path = write_model_dir(graph(accuracy_level), meta, source.folder, out_dir)
    print(f"[export] wrote {path} ({_size_mb(out_dir):.0f} MB; {memory.summary()}); measuring its named budgets",
          file=sys.stderr, flush=True)
    named, ppl = measure_named_budgets(out_dir, 2.0 * config.num_slices)
    if head_follows:  # bits and head depth chosen together, over a few more budgets than the fewest in band
        if more := head.budgets_to_measure(named, ppl):
            ppl.update(file_perplexities(out_dir, more))
        named, head_slices, head_report = head.decide(qmodel, validation_windows(out_dir), named, ppl)
    else:
        head_slices, head_report = {name: config.num_slices for name in named}, {}
    if any(k < config.num_slices for k in head_slices.values()):  # the head follows the budget: rewrite the file
        qmodel.set_head_slices(head.slices_per_row(head_slices, named, config.num_slices))
        path = write_model_dir(graph(accuracy_level), meta, source.folder, out_dir)
        with_head = file_perplexities(out_dir, [named[n] for n in head_report])
        for name, row in head_report.items():
            row["file_ppl"] = round(with_head[row["bits"]], 4)
        print("[export] with its head following the budget: " + ", ".join(
            f"{name} PPL {ppl[row['bits']]:.2f} -> {row['file_ppl']:.2f}" for name, row in head_report.items()),
              file=sys.stderr, flush=True)
    print(f"[export] verifying against PyTorch ({memory.summary()})", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        exact = path
        if accuracy_level != ops.ACCURACY_F32:  # the same graph with exact float activations, to hold to PyTorch
            exact = write_model_dir(graph(ops.ACCURACY_F32), meta, source.folder, Path(tmp))
        # the file's named budgets and the generic grid (3, 4, 6, 8 bits: token-dependent and constant rows)
        budgets = {**{f"{b:g} bits": b for b in NAMED_BUDGETS.values() if b not in named.values()}, **named}
        verify(exact, path, qmodel, verify_tokens, budgets)
    dependent = token_dependent_fraction(qmodel)
    set_metadata(out_dir, {"named_budgets": named, "validation_ppl": {f"{b:g}": p for b, p in sorted(ppl.items())},
                           "lm_head_slices_by_budget": head_slices, "lm_head_measurement": head_report,
                           "token_dependent_routers": {name: dependent[f"{grid_bits(b):g}"] for name, b in named.items()},
                           **({"routing_by_budget": allocation["routing_by_budget"]}
                              if "routing_by_budget" in (allocation := meta_raw.get("allocation") or {}) else {})})
    print(f"[export] named budgets: {named}", file=sys.stderr)
    return path


def _tied(model) -> bool:
    """Whether the float model's LM head is its token embedding (shared, or equal)."""
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return embed.data_ptr() == head.data_ptr() or (embed.shape == head.shape and torch.equal(embed, head))


def _float_tensors(model) -> dict[str, np.ndarray]:
    """The float tensors a graph reads besides the linears' slices (embedding, norms, biases), HF-named numpy views."""
    return {k: v.detach().numpy() for k, v in model.state_dict().items() if v.is_floating_point()}


def use_stored_embedding(model, spec: DecoderSpec, qmodel, tied: bool) -> int:
    """How the file stores the token embedding, and the same embedding given to the PyTorch model so that
    verification holds the graph to it (the LM head is already its own sliced copy). Tied weights: read from the
    LM head's slices at full depth (embedding_bits 0, no bytes of its own); else 8-bit blocks (8)."""
    head = qmodel.linears["lm_head"]
    if tied:  # unscaled rows: Gemma's module and the graph both multiply by sqrt(hidden) afterwards
        rows = head.read(head.num_slices)
    else:
        embed = {"model.embed_tokens.weight": model.get_input_embeddings().weight.detach().numpy()}
        rows = dequantize_rows(*quantize_rows(embedding_rows(embed, spec)))
        if spec.family == "gemma3":
            rows = rows / np.float32(spec.hidden ** 0.5)
        rows = torch.from_numpy(np.ascontiguousarray(rows, np.float32))
    model.get_input_embeddings().weight.data = rows
    return 0 if tied else 8


def grid_bits(bits: float) -> float:
    """The threshold-grid value a budget of ``bits`` uses."""
    return float(THRESHOLD_GRID[grid_index(bits)])


def set_metadata(out_dir: Path, updates: dict) -> None:
    """Rewrite mobiq.json and the graph's metadata_props (the graph file is small: tensors are external)."""
    meta = {**json.loads((out_dir / META_FILE).read_text()), **updates}
    meta.pop("files", None)  # recorded anew below, after model.onnx changes
    model = onnx.load(str(out_dir / MODEL_FILE), load_external_data=False)
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    tmp = out_dir / (MODEL_FILE + ".partial")
    tmp.write_bytes(model.SerializeToString())
    tmp.replace(out_dir / MODEL_FILE)
    _write_meta(out_dir, meta)


def export_baseline(model_name: str, kind: str, out_dir: Path, context: int | None = None) -> Path:
    """fp32 or MatMulNBits-int4 export of the same source model, for side-by-side speed/quality."""
    source = resolve(model_name)
    model = load_float_model(source)
    floats = _float_tensors(model)
    context = context or default_context(model.config)
    spec = DecoderSpec.from_hf_config(model.config, context)
    linear: LinearKind = Fp32Linear() if kind == "fp32" else MatMulNBitsLinear(4, source.group_size)
    return write_model_dir(lambda sink: build_decoder(spec, floats, linear, attention="gqa", sink=sink),  # ORT's own
                           model_metadata(source, None, kind, context, source.folder), source.folder, out_dir)


def write_model_dir(build: Callable[[TensorSink], onnx.ModelProto], meta: dict, tokenizer_dir: Path,
                    out_dir: Path) -> Path:
    """``build(sink)`` -> DIR/model.onnx + model.onnx.data (tensors >= 1 KiB external and page-aligned, written as
    the graph is built), checked, with the tokenizer files and mobiq.json beside it."""
    path = save_model(build, out_dir, meta)
    ops.register_schema()
    onnx.checker.check_model(str(path))  # from the file: a graph with its tensors inline may pass 2 GB
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out_dir / name)
    _write_meta(out_dir, meta)
    return path


def _write_meta(out_dir: Path, meta: dict) -> None:
    """mobiq.json, with the sizes and checksums of the files beside it (always the last file written)."""
    (out_dir / META_FILE).write_text(json.dumps({**meta, "files": record_files(out_dir)}, indent=1))


@torch.no_grad()
def verify(exact_path: Path, file_path: Path, qmodel, new_tokens: int = 32,
           budgets: dict[str, float] | None = None) -> dict:
    """At every budget of ``budgets`` (name -> bits; default: the generic named budgets): the exact-float graph against PyTorch (logits within EXACT_TOLERANCE,
    identical greedy continuations) and, when it differs, the written int8-activation file against
    the exact graph (INT8_TOLERANCE, INT8_MIN_TOP1). Raises ExportError listing every mismatch."""
    from mobiquant.runtime.session import ModelSession

    # A float32 cache: what is verified is the graph (the cache precisions are held to float64 by the op tests);
    # every step at the asked bits, as PyTorch runs them (no BitsHold).
    # One session at a time (memory): the exact graph against PyTorch first, then the written file against its logits.
    exact = ModelSession(exact_path.parent, threads=2, kv_bits=32, hold=False)
    vocab = exact.vocab
    prompt = np.random.default_rng(0).integers(min(3, vocab - 1), min(vocab, 5000), (1, 16)).astype(np.int64)
    problems, report, exact_logits = [], {}, {}
    for name, bits in (budgets or NAMED_BUDGETS).items():
        qmodel.set_target_bits(bits)
        ref = qmodel.model(input_ids=torch.from_numpy(prompt)).logits.numpy()
        exact_logits[name], _ = exact.forward(prompt, exact.empty_cache(), bits)
        err = _rel(exact_logits[name], ref)
        ours = _greedy_ort(exact, prompt, bits, new_tokens)
        theirs = _greedy_torch(qmodel.model, prompt, ours)
        report[name] = {"bits": bits, "exact_logit_rel_err": err, "greedy_equal": ours == theirs}
        if err > EXACT_TOLERANCE:
            problems.append(f"budget {name} ({bits} bits): exact graph logits differ from PyTorch, "
                            f"max rel error {err:.2e} > {EXACT_TOLERANCE}")
        if ours != theirs:
            first = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
            problems.append(f"budget {name}: greedy continuation differs from PyTorch at token {first}: "
                            f"{ours[:first + 1]} vs {theirs[:first + 1]}")
    del exact
    written = (None if file_path == exact_path
               else ModelSession(file_path.parent, threads=2, kv_bits=32, hold=False))
    for name, row in report.items():
        if written is not None:
            got = exact_logits[name]
            file_logits, _ = written.forward(prompt, written.empty_cache(), row["bits"])
            row["int8_logit_rel_err"] = _rel(file_logits, got)
            row["int8_top1_agreement"] = float(np.mean(file_logits[0].argmax(-1) == got[0].argmax(-1)))
            if row["int8_logit_rel_err"] > INT8_TOLERANCE or row["int8_top1_agreement"] < INT8_MIN_TOP1:
                # A numeric-mode effect, not a graph bug (the kernels are held to their reference by the
                # op tests): reported, and a reason to export with --exact for this model.
                err, top1 = row["int8_logit_rel_err"], row["int8_top1_agreement"]
                print(f"[verify] warning: budget {name}: int8 activations move the logits by {err:.2e} "
                      f"({'>' if err > INT8_TOLERANCE else '<='} {INT8_TOLERANCE}) with top-1 agreement "
                      f"{top1:.2f} ({'<' if top1 < INT8_MIN_TOP1 else '>='} {INT8_MIN_TOP1}); consider --exact",
                      file=sys.stderr)
        print(f"[verify] {name:>4} ({row['bits']} bits): " + ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "bits"),
              file=sys.stderr, flush=True)
    if problems:
        raise ExportError("[export] verification failed:\n  " + "\n  ".join(problems))
    return report


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _greedy_ort(session, prompt: np.ndarray, bits: float, n: int) -> list[int]:
    cache = session.empty_cache(prompt.shape[1] + n)
    logits, cache = session.forward(prompt, cache, bits)
    out = []
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits, cache = session.forward(np.array([[out[-1]]], np.int64), cache, bits)
    return out


def _greedy_torch(model, prompt: np.ndarray, ours: list[int]) -> list[int]:
    """PyTorch's argmax after the prompt and each prefix of ``ours``, from one forward pass over the sequence
    (causal: position i sees only what precedes it). Equal to ``ours`` exactly when PyTorch's own greedy
    continuation is ``ours``: by induction on the steps, at 1/n of the cost of rerunning the sequence per token.
    Like _greedy_ort, it never stops nor masks EOS (generate's min_new_tokens would mask it)."""
    ids = torch.from_numpy(np.concatenate([prompt, np.array([ours[:-1]], prompt.dtype)], 1))
    return model(input_ids=ids).logits[0, prompt.shape[1] - 1:].argmax(-1).tolist()


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 2**20


def add_onnx_command(subparsers) -> None:
    p = subparsers.add_parser("onnx", help="export a checkpoint to a verified ONNX model directory")
    p.add_argument("checkpoint", type=Path, help="checkpoint directory (from `mobiq-export quantize`)")
    p.add_argument("-o", "--out", type=Path, required=True, help="output model directory")
    p.add_argument("--context", type=int, default=None,
                   help=f"longest sequence the runtime will run (rotary table size; default: the model's own, "
                        f"up to {MAX_DEFAULT_CONTEXT})")
    p.add_argument("--exact", action="store_true",
                   help="exact float32 activations in the op (default: int8 activations, faster, as MatMulNBits "
                        "accuracy_level=4)")
    p.add_argument("--attention", choices=["kv", "gqa"], default="kv",
                   help="kv: KVAttention, a KV cache whose precision the runtime picks (default); gqa: ONNX Runtime's "
                        "GroupQueryAttention with a float32 cache (the previous design, kept as a measurement control)")
    p.add_argument("--fixed-head", action="store_true",
                   help="the LM head reads all its slices at every budget (default: fewer at a named budget where "
                        "the export measures that it pays; a measurement control)")
    p.set_defaults(func=_onnx_command)
    b = subparsers.add_parser("baseline", help="export the fp32 or MatMulNBits-int4 version of a source model")
    b.add_argument("model", help="registry name or Hugging Face folder")
    b.add_argument("kind", choices=["fp32", "matmulnbits-int4"])
    b.add_argument("-o", "--out", type=Path, required=True)
    b.add_argument("--context", type=int, default=None, help="as for onnx")
    b.set_defaults(func=lambda a: export_baseline(a.model, a.kind, a.out, a.context) and 0)


def _onnx_command(args) -> int:
    t = time.time()
    export(args.checkpoint, args.out, args.context, ops.ACCURACY_F32 if args.exact else ops.ACCURACY_INT8,
           attention=args.attention, head_follows=not args.fixed_head)
    print(f"[export] done in {time.time() - t:.0f} s: {args.out / MODEL_FILE}", file=sys.stderr)
    return 0
