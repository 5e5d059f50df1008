"""``mobiq-run``: generate text from an exported MoBiQuant model at a chosen or device-driven budget."""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from . import kvcache
from .budget import (DEFAULT_REEVALUATE_EVERY, AutoBudget, BudgetError, PolicyConfig, describe, kv_bits_for, load_config,
                     parse_budget)
from .generate import GenerationStats
from .modelfile import ModelFileError, locate, verify_checksums
from .ops import OpLibraryError
from .sampling import SamplingConfig, SamplingError
from .session import ContextError
from .text import TextFileError
from .signals import SysfsSource

EPILOG = """\
budgets: low=3, mid=4, high=6, max=8 average bits (the model file may define its own), any number
in [2, 8], or auto: battery, temperature and Raspberry Pi throttling pick the budget, re-evaluated
every --reevaluate-every tokens without reloading (no battery = mains power = max). auto never goes
below the model's low (its quality floor); a device still too hot there pauses after each token.
Fewer bits read fewer weight bytes per token: faster and cooler, at some cost in quality. Where the
model's routers pick slices per token, the bits actually read are held at the budget on average.
Interactive chat keeps its turns, drops the oldest whole ones when the context is full; Ctrl-C stops
a reply, an empty line or Ctrl-D quits.

examples:
  mobiq-run models/smollm2-135m --budget low -p "Write a haiku about rain."
  echo "Summarise Persuasion in one line." | mobiq-run models/smollm2-135m --stats
  mobiq-run models/smollm2-135m --signals          # what auto would choose here, and why
  mobiq-run models/smollm2-135m --verify           # every file against the checksums of the export
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
    p.add_argument("--kv-bits", default="auto", choices=["auto", "32", "16", "8", "4"],
                   help="KV cache precision: 8 bits are within 1%% of a float cache's perplexity at 0.27x its memory, "
                        "4 bits 0.14x (some quality lost); auto = 8, or 4 when memory is short or the device hot "
                        "(default: auto)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: ONNX Runtime's choice, all cores)")
    p.add_argument("--stats", action="store_true", help="print speed, bits read and peak memory at the end")
    p.add_argument("-v", "--verbose", action="store_true", help="log every budget change with its reason")
    p.add_argument("--verify", action="store_true", help="check every file of the model against the sha256 "
                   "recorded at export (reads all of it), print the result and exit: 0 intact, 1 mismatch")
    auto = p.add_argument_group("device-aware budget (--budget auto)")
    auto.add_argument("--signals", action="store_true", help="print the device signals and the budget auto "
                                                             "would choose, then exit")
    auto.add_argument("--signals-root", type=Path, default=Path("/"), help="read sysfs below DIR (default: /)")
    auto.add_argument("--policy", type=Path, help="policy TOML file (thresholds, hysteresis, dwell)")
    auto.add_argument("--max-bits", type=float, help="never read more than this many bits")
    auto.add_argument("--min-bits", type=float, help="never read fewer than this many bits (default: the model's low, "
                                                                 "its quality floor)")
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
        if args.verify:
            return _verify(args.model)
        if args.signals:
            info = locate(args.model)
            policy = _policy(args, info.named_budgets)
            auto = AutoBudget(SysfsSource(args.signals_root), policy)
            decision = auto.update()
            print(describe(auto.snapshot, decision))
            kv = info.meta.get("kv_cache")
            if kv:  # what --kv-bits auto would pick for this model's whole context
                mb = {b: kvcache.bytes_per_position(b, kv["kv_heads"], kv["head_dim"], kv["layers"]) * info.context
                      / 2**20 for b in (8, 4)}
                print("KV cache (--kv-bits auto): %d bits (%s)" % kv_bits_for(auto.snapshot, policy, mb))
            return 0
        return _run(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (ModelFileError, OpLibraryError, BudgetError, SamplingError, ContextError, TextFileError, ValueError,
            OSError) as e:
        print(str(e).splitlines()[0] if str(e) else type(e).__name__, file=sys.stderr)
        return 2


def _run(args) -> int:
    from .api import Model

    started = time.perf_counter()
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    model = Model.load(args.model, args.threads)
    if model.session.blocked:
        model.set_kv_bits(args.kv_bits, signals_root=args.signals_root)
    elif args.kv_bits not in ("auto", "32"):
        _say(f"[mobiq-run] note: {model.info.meta.get('kind')} model has a float32 cache; --kv-bits is ignored")
    budget = parse_budget(args.budget, model.info.named_budgets)
    if budget == "auto":
        first = model.set_budget("auto", policy=_policy(args, model.info.named_budgets),
                                 signals_root=args.signals_root, every=args.reevaluate_every)
        if args.verbose or args.stats:
            _say(f"[budget] auto: {_describe(first)}")
    else:
        model.set_budget(budget)
    if not model.session.elastic:
        _say(f"[mobiq-run] note: {model.info.meta.get('kind')} model has a fixed precision; --budget is ignored")
    chat = model.codec.chat_template is not None if args.chat is None else args.chat
    prompt = _read_prompt(args)
    if prompt is None:
        return _interactive(model, sampling, args, chat)
    gen = model.generate(prompt, max_new_tokens=args.max_new, chat=chat, sampling=sampling)
    _stream(model, gen, args, started)
    return 0


def _verify(model: str) -> int:
    info = locate(model)  # sizes are checked here
    lines = verify_checksums(info)
    print("\n".join(lines))
    bad = sum(line.startswith("MISMATCH") for line in lines)
    print(f"{info.directory}: {len(lines) - bad} of {len(lines)} files intact" + (", re-export or copy the model again"
                                                                                 if bad else ""))
    return 1 if bad else 0


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _describe(decision) -> str:
    pacing = f", pausing {decision.pause_s:.2f} s per token" if decision.pause_s else ""
    return f"{decision.target_bits:g} bits{pacing} ({decision.reason})"


def _stream(model, gen, args, started: float | None = None) -> None:
    """Print ``gen``'s pieces as they come, budget changes with -v, the stats with --stats."""
    if gen.prompt.dropped_turns:
        _say(f"[mobiq-run] the {gen.prompt.dropped_turns} oldest turn(s) left out to fit the context "
             f"({model.info.context} tokens)")
    if gen.prompt.cut_tokens:
        _say(f"[mobiq-run] the first {gen.prompt.cut_tokens} tokens of the prompt left out to fit the context "
             f"({model.info.context} tokens)")
    seen = len(model.budget_changes)
    first_token = None
    for piece in gen:
        if first_token is None and started is not None:
            first_token = time.perf_counter() - started
            if args.verbose:
                _say(f"[kv] cache {gen.stats.kv_bits} bits ({gen.stats.kv_reason})")
        if args.verbose and len(model.budget_changes) > seen:
            for index, decision in model.budget_changes[seen:]:
                _say(f"\n[budget] token {index}: {_describe(decision)}")
            seen = len(model.budget_changes)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats:
        _print_stats(gen.stats, first_token, model.budget_changes)


def _interactive(model, sampling, args, chat) -> int:
    _say(f"mobiq-run: {model.info.meta.get('source_model')} — empty line or Ctrl-D to quit, Ctrl-C stops a reply")
    conversation = model.chat() if chat else None
    while True:
        try:
            line = input("> ")
        except EOFError:
            return 0
        if not line.strip():
            return 0
        gen = (conversation.send(line, args.max_new, sampling) if conversation is not None else
               model.generate(line, max_new_tokens=args.max_new, chat=False, sampling=sampling))
        try:
            _stream(model, gen, args)
        except KeyboardInterrupt:
            gen.close()  # the reply so far stays in the conversation
            _say("\n[mobiq-run] stopped")


def _print_stats(stats: GenerationStats, first_token_seconds: float | None, changes) -> None:
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    reused = f" ({stats.reused_tokens} kept from the previous turn)" if stats.reused_tokens else ""
    lines = [f"prompt {stats.prompt_tokens} tokens{reused}, prefill {stats.prefill_tokens_per_s:.1f} tok/s",
             f"generated {len(stats.steps)} tokens ({stats.stop_reason}), decode {stats.decode_tokens_per_s:.1f} tok/s",
             f"average bits read {stats.avg_bits:.2f}", f"peak memory {peak_mb:.0f} MB",
             f"KV cache {stats.kv_bits} bits ({stats.kv_reason}), {stats.kv_cache_bytes / 2**20:.1f} MB allocated"]
    if stats.paused_seconds:
        lines.append(f"paused {stats.paused_seconds:.2f} s to let the device cool (pacing)")
    if first_token_seconds is not None:
        lines.append(f"time to first token {first_token_seconds:.2f} s (from start)")
    if changes:
        lines.append("budget changes: " + "; ".join(f"token {i}: {_describe(d)}" for i, d in changes))
    print("[stats] " + "\n[stats] ".join(lines), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
