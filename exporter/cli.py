"""``mobiq-export``: quantize a model into a MoBiQuant checkpoint, evaluate it (and export ONNX).

    mobiq-export quantize MODEL -o CHECKPOINT [--recipe fast|paper] [--calib NAME|FILE] [--slices 4] [--group-size G]
    mobiq-export thresholds CHECKPOINT [--uniform | --routing token|static] [--router-fit ridge|mlp] [--set FIELD=VALUE]
    mobiq-export eval CHECKPOINT [--corpus NAME ...] [--baselines] [--json FILE] [--max-tokens N]
    mobiq-export onnx ...   (added by exporter/onnx_export.py: add_onnx_command(subparsers))

MODEL is a registry name from ``models/`` (``smollm2-135m``, ``gemma3-270m``) or a
local Hugging Face folder. Errors are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="calibrate MODEL and write a MoBiQuant checkpoint")
    p.add_argument("model", help="registry name (see models/) or a Hugging Face folder")
    p.add_argument("-o", "--output", required=True, type=Path, help="checkpoint folder to write")
    p.add_argument("--recipe", default="fast", choices=("fast", "paper"),
                   help="fast: minutes on 2 CPU cores (default); paper: 128 x 2048 tokens, 20 epochs, GPU if present")
    p.add_argument("--calib", default="austen-train", help="calibration corpus name or text file (default austen-train)")
    p.add_argument("--slices", type=int, default=4, help="2-bit slices per weight (default 4: reads of 2/4/6/8 bits)")
    p.add_argument("--group-size", type=int, default=None, help="group size (default: the model entry's)")
    _add_set(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_device(p)
    p.set_defaults(func=_run_quantize)


def _recipe_fields() -> dict[str, type]:
    """The Recipe fields --set may change, with the type of their values (int, float, str or bool)."""
    from dataclasses import fields

    from .calibrate import Recipe

    kinds = {"int": int, "float": float, "str": str, "bool": bool}
    return {f.name: kinds[f.type] for f in fields(Recipe) if f.type in kinds and f.name != "name"}


BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _recipe_field(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    kinds = _recipe_fields()
    if not sep or name not in kinds:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE with FIELD one of {', '.join(kinds)}; got {text!r}")
    if kinds[name] is bool:
        if value.lower() not in BOOLEANS:
            raise argparse.ArgumentTypeError(f"{name} expected true or false; got {value!r}")
        return name, BOOLEANS[value.lower()]
    try:
        return name, kinds[name](value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} expected a {kinds[name].__name__}; got {value!r}") from None


def _add_set(p) -> None:
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", type=_recipe_field,
                   help="change one field of the recipe (repeatable), e.g. --set samples=8 --set clip_steps=4 "
                        "(fewer calibration windows and steps: faster, lower quality; used by tools/scale_run.py), "
                        "--set token_above_base=true (token routing at 4 bits and above too: measured no better "
                        "than static there, and router work at run time), --set check_routing=false (token "
                        "routing at every budget below 4 bits, not only where it validates better). "
                        "Fields: " + ", ".join(_recipe_fields()))


def _run_quantize(args) -> int:
    from .quantize import quantize

    quantize(args.model, args.output, args.recipe, args.calib, args.slices, args.group_size, progress=not args.quiet,
             recipe_overrides=dict(args.set), device=args.device)
    return 0


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1; got {text!r}")
    return int(text)


def _add_thresholds(sub) -> None:
    p = sub.add_parser("thresholds", help="refit a checkpoint's routers, allocation and threshold tables in place "
                                          "(no recalibration; minutes)")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--uniform", action="store_true",
                   help="every router reads the budget's bits (no sensitivity probe)")
    p.add_argument("--routing", choices=("token", "static"), default=None,
                   help="token: refit every router to rank its tokens by their measured sensitivity and split "
                        "tokens where that is cheaper (router work at run time wherever a router splits); "
                        "static: per-router widths only, one fractional router per budget (no router work). "
                        "Default: the recipe's")
    p.add_argument("--router-fit", choices=("ridge", "mlp"), default=None,
                   help="token routing: a linear score (ridge) or the router MLP (default: the recipe's)")
    p.add_argument("--probe-windows", type=_positive_int, default=None,
                   help="calibration windows (512 tokens) whose per-token sensitivity is probed: more fit the "
                        "routers better, each costs ~2.5 min for SmolLM2 on 2 cores (default: the recipe's, fast: 1, paper: 8, "
                        "or the model's probe_windows in models/<name>/model.toml if more: Gemma-3-270M 4)")
    _add_set(p)
    p.add_argument("--quiet", action="store_true", help="no progress")
    _add_device(p)
    p.set_defaults(func=_run_thresholds)


def _run_thresholds(args) -> int:
    from .quantize import refit_thresholds

    overrides = {**dict(args.set), **{k: v for k, v in (("routing", args.routing), ("router_fit", args.router_fit),
                                                        ("sensitivity_samples", args.probe_windows)) if v is not None}}
    refit_thresholds(args.checkpoint, per_router=not args.uniform, progress=not args.quiet, device=args.device,
                     **overrides)
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a checkpoint at several budgets (and baselines)")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--corpus", nargs="+", default=["austen-test", "brown", "lee"],
                   help="corpora (names or text files; default austen-test brown lee)")
    p.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3, 3.5, 4, 5, 6, 8])
    p.add_argument("--baselines", action="store_true",
                   help="also fp32, PTQ-b, RTN-b (b = 2,3,4,6,8), sliced8-b, random-b and ptq3-read4")
    p.add_argument("--rows", nargs="+", default=None,
                   help="only these row names (e.g. fp32 mobiquant ptq-3 random-3)")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=40960,
                   help="scored tokens per corpus, rounded up to whole windows (default 40960; 0 = all)")
    p.add_argument("--json", type=Path, default=None, help="write the tables here (one object per corpus, in a list)")
    _add_device(p)
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    from .evaluate import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoint, args.corpus, args.budgets, args.baselines, args.context,
                        args.max_tokens or None, args.json, rows=args.rows, device=args.device)
    return 0


def _add_device(p) -> None:
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where calibration, sensitivity, thresholds and evaluation run (default: cuda when present "
                        "for the paper recipe, cpu for fast)")


def _add_onnx(sub) -> None:
    # ---- ONNX export: owned by exporter/onnx_export.py (add_onnx_command(subparsers)) ----
    try:
        from . import onnx_export
    except ModuleNotFoundError as e:
        if e.name and e.name.endswith("onnx_export"):
            return  # not written yet: no onnx subcommand
        raise
    add = getattr(onnx_export, "add_onnx_command", None)
    if add is not None:
        add(sub)
    # ---- end ONNX ----


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mobiq-export", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_quantize(sub)
    _add_thresholds(sub)
    _add_eval(sub)
    _add_onnx(sub)
    return parser


WORKSTATION_MODULES = ("torch", "transformers", "onnx", "onnxscript", "safetensors", "tqdm", "gguf")


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules (blocked) or a broken install
        return False


def main(argv: list[str] | None = None) -> int:
    missing = [m for m in WORKSTATION_MODULES if not _installed(m)]
    if missing:
        print(f"mobiq-export: the exporter needs the workstation extra ({', '.join(missing)} not installed): "
              f"pip install 'mobiquant[export]'", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    from mobiquant.tools.models import ModelError

    from . import memory
    from .blockwise import CalibrationError
    from .checkpoint import CheckpointError
    from mobiquant.runtime.format import FormatError

    try:
        status = args.func(args)
        print(f"[mobiq-export] {args.command}: peak resident memory {memory.peak_mb():.0f} MiB", file=sys.stderr)
        return status
    except (ModelError, CalibrationError, CheckpointError, FormatError, FileNotFoundError) as e:
        print(f"mobiq-export: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mobiq-export: interrupted (quantize resumes from the last finished block)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
