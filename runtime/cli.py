"""``mobiq-run``: generate text from an exported MoBiQuant model at a chosen or device-driven budget."""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from .budget import DEFAULT_REEVALUATE_EVERY, AutoBudget, BudgetError, PolicyConfig, describe, load_config, parse_budget
from .generate import BudgetControl, ContextError, GenerationStats, fit_context, generate
from .modelfile import ModelFileError, locate
from .ops import OpLibraryError
from .sampling import Sampler, SamplingConfig, SamplingError
from .signals import SysfsSource, read_snapshot

EPILOG = """\
budgets: low=3, mid=4, high=6, max=8 average bits (the model file may define its own), any number
in [2, 8], or auto: battery, temperature and Raspberry Pi throttling pick the budget, re-evaluated
every --reevaluate-every tokens without reloading (no battery = mains power = max).
Fewer bits read fewer weight bytes per token: faster and cooler, at some cost in quality.

examples:
  mobiq-run models/smollm2-135m --budget low -p "Write a haiku about rain."
  echo "Summarise Persuasion in one line." | mobiq-run models/smollm2-135m --stats
  mobiq-run models/smollm2-135m --signals          # what auto would choose here, and why
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mobiq-run", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model directory (its model.onnx runs), or one .onnx file beside its mobiq.json")
    p.add_argument("--budget", default="auto", help="low|mid|high|max|<bits>|auto (default: auto)")
    p.add_argument("-p", "--prompt", help="prompt text; without it: interactive chat on a terminal, or stdin")
    p.add_argument("-n", "--max-new", type=int, default=128, help="most tokens to generate (default: 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); higher = more varied")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default: 0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.1, help="penalise repeated tokens (default: 1.1)")
    p.add_argument("--seed", type=int, help="random seed for sampling (default: random)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap the prompt in the model's chat template (default when the model has one)")
    mode.add_argument("--raw", dest="chat", action="store_false", help="continue the prompt as plain text")
    p.add_argument("--threads", type=int, help="intra-op threads (default: ONNX Runtime's choice, all cores)")
    p.add_argument("--stats", action="store_true", help="print speed, bits read and peak memory at the end")
    p.add_argument("-v", "--verbose", action="store_true", help="log every budget change with its reason")
    auto = p.add_argument_group("device-aware budget (--budget auto)")
    auto.add_argument("--signals", action="store_true", help="print the device signals and the budget auto "
                                                             "would choose, then exit")
    auto.add_argument("--signals-root", type=Path, default=Path("/"), help="read sysfs below DIR (default: /)")
    auto.add_argument("--policy", type=Path, help="policy TOML file (thresholds, hysteresis, dwell)")
    auto.add_argument("--max-bits", type=float, help="never read more than this many bits")
    auto.add_argument("--min-bits", type=float, help="never read fewer than this many bits")
    auto.add_argument("--reevaluate-every", type=int, default=DEFAULT_REEVALUATE_EVERY,
                      help=f"tokens between two reads of the signals (default: {DEFAULT_REEVALUATE_EVERY})")
    return p


def _policy(args, named) -> PolicyConfig:
    """The auto policy: levels map to the model's named budgets unless the --policy file names its own."""
    config = load_config(args.policy, named) if args.policy else PolicyConfig(named=named)
    changes = {}
    if args.max_bits is not None:
        changes["ceiling_bits"] = args.max_bits
    if args.min_bits is not None:
        changes["floor_bits"] = args.min_bits
    if changes:
        from dataclasses import asdict

        config = PolicyConfig(**{**asdict(config), **changes})
    return config


def _read_prompt(args) -> str | None:
    if args.prompt is not None:
        return args.prompt
    if sys.stdin.isatty():
        return None
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"[mobiq-run] stdin expected UTF-8 text; got invalid bytes at offset {e.start}") from e


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_new < 1:
        parser.error(f"-n/--max-new expected >= 1; got {args.max_new}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads expected >= 1; got {args.threads}")
    if args.reevaluate_every < 1:
        parser.error(f"--reevaluate-every expected >= 1; got {args.reevaluate_every}")
    try:
        if args.signals:
            policy = _policy(args, locate(args.model).named_budgets)
            auto = AutoBudget(SysfsSource(args.signals_root), policy)
            decision = auto.update()
            print(describe(auto.snapshot, decision))
            return 0
        return _run(args, parser)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (ModelFileError, OpLibraryError, BudgetError, SamplingError, ContextError, ValueError, OSError) as e:
        print(str(e).splitlines()[0] if str(e) else type(e).__name__, file=sys.stderr)
        return 2


def _run(args, parser) -> int:
    from .api import Model

    started = time.perf_counter()
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    model = Model.load(args.model, args.threads)
    budget = parse_budget(args.budget, model.info.named_budgets)
    if budget == "auto":
        control = BudgetControl(None, AutoBudget(SysfsSource(args.signals_root), _policy(args, model.info.named_budgets)),
                                args.reevaluate_every)
        if args.verbose or args.stats:
            first = control.auto.update()
            print(f"[budget] auto: {first.target_bits:g} bits ({first.reason})", file=sys.stderr)
    else:
        control = BudgetControl(budget)
    if not model.session.elastic:
        print(f"[mobiq-run] note: {model.info.meta.get('kind')} model has a fixed precision; --budget is ignored",
              file=sys.stderr)
    chat = model.codec.chat_template is not None if args.chat is None else args.chat
    prompt = _read_prompt(args)
    if prompt is None:
        return _interactive(model, control, sampling, args, chat)
    if not prompt.strip():
        raise ValueError("[mobiq-run] prompt expected non-empty text; got an empty prompt")
    messages = [{"role": "user", "content": prompt}]
    stats = _answer(model, control, sampling, args, chat, messages, started)
    if args.stats:
        _print_stats(stats, started, control)
    return 0


def _answer(model, control, sampling, args, chat, messages, started=None) -> GenerationStats:
    text = model.codec.render_chat(messages) if chat else messages[-1]["content"]
    ids = model.codec.encode(text, bos=not chat)
    fitted = fit_context(ids, args.max_new, model.info.context)
    if len(fitted) < len(ids):
        print(f"[mobiq-run] prompt truncated to its last {len(fitted)} tokens (context {model.info.context})",
              file=sys.stderr)
    stats = GenerationStats()
    decoder = model.codec.decoder()
    seen_changes = len(control.changes)
    pieces = []
    for step in generate(model.session, fitted, args.max_new, Sampler(sampling), control, model.codec.stop_ids,
                         decoder.push, stats, prefix=model.prefix):
        if started is not None and len(stats.steps) == 1:
            stats.first_token_seconds = time.perf_counter() - started
        if args.verbose and len(control.changes) > seen_changes:
            for index, decision in control.changes[seen_changes:]:
                print(f"\n[budget] token {index}: {decision.target_bits:g} bits ({decision.reason})", file=sys.stderr)
            seen_changes = len(control.changes)
        pieces.append(step.text)
        sys.stdout.write(step.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    messages.append({"role": "assistant", "content": "".join(pieces)})
    return stats


def _interactive(model, control, sampling, args, chat) -> int:
    print(f"mobiq-run: {model.info.meta.get('source_model')} — empty line or Ctrl-D to quit", file=sys.stderr)
    messages: list[dict[str, str]] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            return 0
        if not line.strip():
            return 0
        messages.append({"role": "user", "content": line})
        stats = _answer(model, control, sampling, args, chat, messages if chat else messages[-1:])
        if args.stats:
            _print_stats(stats, None, control)


def _print_stats(stats: GenerationStats, started: float | None, control: BudgetControl) -> None:
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    reused = f" ({stats.reused_tokens} kept from the previous turn)" if stats.reused_tokens else ""
    lines = [f"prompt {stats.prompt_tokens} tokens{reused}, prefill {stats.prefill_tokens_per_s:.1f} tok/s",
             f"generated {len(stats.steps)} tokens, decode {stats.decode_tokens_per_s:.1f} tok/s",
             f"average bits read {stats.avg_bits:.2f}", f"peak memory {peak_mb:.0f} MB"]
    first = getattr(stats, "first_token_seconds", None)
    if first is not None:
        lines.append(f"time to first token {first:.2f} s (from start)")
    if control.changes:
        lines.append("budget changes: " + "; ".join(f"token {i}: {d.target_bits:g} ({d.reason})"
                                                    for i, d in control.changes))
    print("[stats] " + "\n[stats] ".join(lines), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
