"""The generation loop: prefill, then one token at a time with the KV cache.

The budget is read from a :class:`~.control.BudgetControl` before every step, so
another thread (a UI) or the device policy (``auto``) can change precision
mid-generation; the next step simply feeds another ``target_bits``. A hot device
at its quality floor is paced: the loop waits the budget's pause after a token
(``cancel`` ends the wait). Each step reports what it cost and the bits it read.
This is the only decoding loop of the runtime: ``Model`` and ``mobiq-run`` use it.

A :class:`PrefixCache` carries the KV cache from one generation to the next:
the new prompt's tokens shared with what the cache holds (a chat's earlier
turns, a fixed system prompt) are not computed again, only the rest is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .control import BudgetControl
from .sampling import Sampler
from .session import ContextError, KVCache, ModelSession


@dataclass
class Step:
    token: int
    text: str
    target_bits: float
    avg_bits: float  # bits the step actually read (nan for non-elastic models)
    seconds: float


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose keys and values came from the PrefixCache
    prefill_seconds: float = 0.0
    paused_seconds: float = 0.0  # pacing waits (not part of any step's seconds)
    steps: list[Step] = field(default_factory=list)
    stop_reason: str = ""  # stop token | max tokens | cancelled (set when the loop ends)
    kv_bits: int = 0       # the KV cache's precision, and why it was chosen (api.Model sets them)
    kv_reason: str = ""
    kv_cache_bytes: int = 0  # the cache's buffers at the end (their whole capacity)

    @property
    def decode_tokens_per_s(self) -> float:
        decode = self.steps[1:]  # the first token comes from the prefill
        return len(decode) / sum(s.seconds for s in decode) if decode else float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        computed = self.prompt_tokens - self.reused_tokens
        return computed / self.prefill_seconds if self.prefill_seconds else float("nan")

    @property
    def avg_bits(self) -> float:
        bits = [s.avg_bits for s in self.steps if not np.isnan(s.avg_bits)]
        return float(np.mean(bits)) if bits else float("nan")


class PrefixCache:
    """The tokens whose keys and values a KV cache holds, kept between generations of one session."""

    def __init__(self):
        self.ids: list[int] = []
        self.cache: KVCache | None = None

    def start(self, session: ModelSession, prompt: list[int], room: int) -> KVCache:
        """A cache holding the longest prefix of ``prompt`` (all but its last token at most) it already
        has, with room for ``room`` positions in all (fresh buffers when nothing is shared)."""
        shared = 0
        for a, b in zip(self.ids, prompt[:-1]):
            if a != b:
                break
            shared += 1
        if self.cache is None or shared == 0 or session.cache_bits(self.cache) != session.kv_bits:
            return session.empty_cache(room)  # nothing shared, or kept at another precision
        return KVCache(self.cache.buffers, shared, self.cache.binding, self.cache.positions_per_row)

    def keep(self, ids: list[int], cache: KVCache) -> None:
        self.ids, self.cache = ids[:cache.length], cache


def generate(session: ModelSession, prompt: list[int], max_new: int, sampler: Sampler, budget: BudgetControl,
             stop_ids: frozenset[int], decode: Callable[[int], str], stats: GenerationStats | None = None,
             cancel: threading.Event | None = None, prefix: PrefixCache | None = None) -> Iterator[Step]:
    """Yield one Step per generated token until a stop token, max_new tokens or ``cancel``; with
    ``prefix``, start from the keys and values it holds and leave this generation's there."""
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt)
    history = list(prompt)
    bits = budget.read(0).bits
    t = time.perf_counter()
    room = len(prompt) + max_new
    cache = prefix.start(session, prompt, room) if prefix else session.empty_cache(room)
    stats.reused_tokens = cache.length
    logits, cache = session.prefill_last(np.array([prompt[cache.length:]], np.int64), cache, bits)
    stats.prefill_seconds = time.perf_counter() - t
    if prefix:
        prefix.keep(history, cache)
    stats.kv_cache_bytes = cache.nbytes
    last_seconds = stats.prefill_seconds
    cancel = cancel or threading.Event()
    for i in range(max_new):
        token = sampler(logits[0, -1], history)
        if token in stop_ids:
            stats.stop_reason = "stop token"
            return
        step = Step(token, decode(token), bits, session.last_avg_bits, last_seconds)
        stats.steps.append(step)
        stats.stop_reason = "max tokens"  # until a later step says otherwise
        yield step
        history.append(token)
        if i + 1 == max_new:
            return
        now = budget.read(i + 1)
        if now.pause_s:
            t = time.perf_counter()
            cancel.wait(now.pause_s)
            stats.paused_seconds += time.perf_counter() - t
        if cancel.is_set():
            stats.stop_reason = "cancelled"
            return
        bits = now.bits
        t = time.perf_counter()
        logits, cache = session.forward(np.array([[token]], np.int64), cache, bits)
        last_seconds = time.perf_counter() - t
        stats.kv_cache_bytes = cache.nbytes
        if prefix:
            prefix.keep(history, cache)
