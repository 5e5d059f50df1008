"""The Python API for applications: load once, generate many times, change the budget any time.

    from mobiquant.runtime import Model
    model = Model.load("models/smollm2-135m")
    for piece in model.generate("Tell me about Bath.", budget="low"):
        print(piece, end="", flush=True)
    chat = model.chat(system="You are terse.")
    for piece in chat.send("Hello!"):             # the history is kept; old turns drop to fit
        ...

Threading contract (tested in tests/test_api_threads.py):

- ``set_budget`` (bits, a named budget or ``"auto"``, and switching between them) and ``cancel`` may
  be called from any thread at any moment; the next token follows them. Nothing is reloaded.
- With ``"auto"`` the device's signals are read on a background thread every ``every`` tokens, never
  on the token path; listeners (``on_budget_change``) run there with no lock of the model held, so they
  may call ``set_budget``/``cancel``.
- ``cancel()`` ends every generation created before the call: the running one after its current token,
  and those not yet started (they yield nothing). Generations created after it are unaffected.
  ``Generation.cancel()`` ends that one only.
- One generation computes at a time. A generation takes the model at its first ``next()`` (waiting for
  the one before it, or raising :class:`ModelBusy` after ``timeout`` seconds) and holds it until it
  ends, is closed, or is garbage collected. A generation whose consumer stops pulling for
  ``idle_release_s`` seconds (default 2) while another one waits is *released*: it yields nothing more
  (``stop_reason == "released"``) and the waiting one runs.
- The last generation's keys and values are kept: a prompt that repeats its tokens (the system prompt,
  earlier turns of a chat) computes only the rest.
- ``set_kv_bits`` (32, 16, 8, 4 or ``"auto"``) takes effect when the next generation starts: a cache keeps
  the precision it was made with (a kept prefix at another precision is recomputed). ``"auto"`` (the
  default) decides once per generation start (runtime/budget.py ``kv_bits_for``) from the budget's newest
  snapshot when the budget is ``"auto"`` too, else from one read of the signals.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from . import kvcache
from .budget import DEFAULT_REEVALUATE_EVERY, AutoBudget, Decision, PolicyConfig, kv_bits_for, parse_budget
from .control import BudgetControl
from .generate import GenerationStats, PrefixCache, generate
from .prompt import Message, Prompt, chat_prompt, raw_prompt
from .sampling import Sampler, SamplingConfig
from .session import ModelSession
from .signals import SignalSource, SysfsSource
from .text import TextCodec

DEFAULT_IDLE_RELEASE_S = 2.0


class ModelBusy(TimeoutError):
    """Another generation held the model for longer than the caller's timeout."""


class _Ownership:
    """Which generation may compute; hands the model over when its holder ends, idles while others wait, or
    is garbage collected (the holder is held weakly)."""

    def __init__(self, idle_release_s: float):
        self.idle_release_s = idle_release_s
        self._cond = threading.Condition()
        self._holder: weakref.ref | None = None
        self._in_step = False
        self._idle_since = 0.0

    def _current(self) -> "Generation | None":
        return self._holder() if self._holder is not None else None

    def _gone(self, _ref) -> None:
        with self._cond:
            self._cond.notify_all()

    def acquire(self, gen: "Generation", timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while (holder := self._current()) is not None and holder is not gen:
                now = time.monotonic()
                idle_until = self._idle_since + self.idle_release_s
                if not self._in_step and now >= idle_until:
                    holder._released = True
                    break
                if deadline is not None and now >= deadline:
                    raise ModelBusy(f"[mobiq] model expected free within {timeout:g} s; another generation holds it")
                wait = None if self._in_step else idle_until - now
                if deadline is not None:
                    wait = deadline - now if wait is None else min(wait, deadline - now)
                del holder
                self._cond.wait(wait)
            # a new holder's idle time starts now (not at the previous holder's last step)
            self._holder, self._in_step, self._idle_since = weakref.ref(gen, self._gone), False, time.monotonic()

    def begin_step(self, gen: "Generation") -> bool:
        with self._cond:
            if self._current() is not gen:
                return False
            self._in_step = True
            return True

    def end_step(self, gen: "Generation") -> None:
        with self._cond:
            if self._current() is gen:
                self._in_step, self._idle_since = False, time.monotonic()
                self._cond.notify_all()

    def release(self, gen: "Generation") -> None:
        with self._cond:
            if self._current() is gen:
                self._holder, self._in_step = None, False
                self._cond.notify_all()


class Generation:
    """One reply, streamed: iterate it for text pieces. ``stats``, ``text`` and ``stop_reason`` (stop token,
    max tokens, cancelled, released, closed, error) describe it; ``cancel()``/``close()`` end it."""

    def __init__(self, model: "Model", prompt: Prompt, max_new: int, sampling: SamplingConfig,
                 timeout: float | None, on_finish: Callable[["Generation"], None] | None = None):
        self.model, self.prompt, self.max_new = model, prompt, max_new
        self.stats = GenerationStats()
        self.text = ""
        self.stop_reason: str | None = None
        self._sampler = Sampler(sampling)
        self._timeout, self._on_finish = timeout, on_finish
        self._cancel = threading.Event()
        self._released = False
        self._steps = None

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> str:
        if self.done:
            raise StopIteration
        own = self.model._ownership
        if self._steps is None:
            own.acquire(self, self._timeout)
            if self._cancel.is_set():
                self._finish("cancelled")
        if self.done or not own.begin_step(self):
            self._finish(self.stop_reason or "released")
            raise StopIteration
        try:
            if self._steps is None:  # the first step; choosing the cache precision is work, not idling
                self.stats.kv_bits, self.stats.kv_reason = self.model._choose_kv_bits()
                self._steps = generate(self.model.session, self.prompt.ids, self.max_new, self._sampler,
                                       self.model.control, self.model.codec.stop_ids,
                                       self.model.codec.decoder().push, self.stats, self._cancel, self.model.prefix)
            while True:
                piece = next(self._steps).text
                if piece:
                    self.text += piece
                    return piece
        except StopIteration:
            self._finish(self.stats.stop_reason or "max tokens")
            raise
        except BaseException:
            self._finish("error")
            raise
        finally:
            own.end_step(self)

    def close(self) -> None:
        """End this generation now (its model is free for the next one)."""
        if not self.done:
            self._finish("closed")

    def _finish(self, reason: str) -> None:
        if self.done:
            return
        self.stop_reason = "released" if self._released and reason != "error" else reason
        if self._steps is not None:
            self._steps.close()
        self.model._ownership.release(self)
        self.model.last_stats = self.stats
        if self._on_finish is not None:
            self._on_finish(self)

    def __repr__(self) -> str:
        return f"<Generation {len(self.stats.steps)} tokens, {self.stop_reason or 'running'}>"


class Conversation:
    """A chat that remembers its turns. ``send`` renders every turn that fits the context (the oldest whole
    turns drop out first; the system message stays) and appends the reply when the generation ends."""

    def __init__(self, model: "Model", system: str | None = None):
        self.model = model
        self.messages: list[Message] = [{"role": "system", "content": system}] if system else []

    def send(self, text: str, max_new_tokens: int = 128, sampling: SamplingConfig | None = None,
             timeout: float | None = None) -> Generation:
        if not text.strip():
            raise ValueError("[mobiq] message expected non-empty text; got an empty message")
        prompt = chat_prompt(self.model.codec, self.messages + [{"role": "user", "content": text}], max_new_tokens,
                             self.model.info.context)
        return self.model._start(prompt, max_new_tokens, sampling, timeout, self._finished)

    def _finished(self, gen: Generation) -> None:
        self.messages = gen.prompt.messages + [{"role": "assistant", "content": gen.text}]


class Model:
    def __init__(self, session: ModelSession, codec: TextCodec, idle_release_s: float = DEFAULT_IDLE_RELEASE_S):
        self.session, self.codec = session, codec
        self.info = session.info
        self.control = BudgetControl(self.info.named_budgets["mid"])
        self.last_stats = GenerationStats()
        self.prefix = PrefixCache()  # keys and values of the last generation, reused where a prompt repeats them
        self._ownership = _Ownership(idle_release_s)
        self._live: weakref.WeakSet[Generation] = weakref.WeakSet()
        self._live_lock = threading.Lock()
        self._kv: tuple[int | str, SignalSource | None, PolicyConfig | None] = ("auto", None, None)

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None,
             idle_release_s: float = DEFAULT_IDLE_RELEASE_S, kv_bits: int | str = "auto") -> "Model":
        session = ModelSession(path, threads)
        model = cls(session, TextCodec(session.info.directory, session.info.meta), idle_release_s)
        model.set_kv_bits(kv_bits)
        return model

    def set_kv_bits(self, bits: int | str, signals: SignalSource | None = None,
                    policy: PolicyConfig | None = None, signals_root: str | Path | None = None) -> None:
        """The KV cache precision from the next generation on: 32, 16, 8, 4, or "auto" (8, or 4 under memory
        pressure or heat; the signals are read once per generation start). Baseline models (a float32 cache)
        take 32 or auto only."""
        if bits != "auto":
            bits = kvcache.check_bits(int(bits))
            if not self.session.blocked and bits != 32:
                raise ValueError(f"[mobiq] {self.info.meta.get('kind')} model has a float32 cache; kv_bits "
                                 f"expected 32 or auto; got {bits}")
        source = signals or (SysfsSource(Path(signals_root)) if signals_root else None)
        self._kv = (bits, source, policy)

    def _choose_kv_bits(self) -> tuple[int, str]:
        """Sets the session's cache precision for a generation starting now; (bits, why)."""
        bits, source, policy = self._kv
        if not self.session.blocked:
            return 32, "float32 cache (baseline model)"
        if bits == "auto":
            auto = self.control.auto
            source = source or (auto.source if auto else SysfsSource())
            policy = policy or (auto.config if auto else PolicyConfig(named=self.info.named_budgets))
            mb = {b: self.session.cache_bytes_per_position(b) * self.info.context / 2**20 for b in (8, 4)}
            try:  # auto's newest snapshot when the budget follows the device too (no second read)
                snapshot = auto.snapshot if auto and auto.snapshot and source is auto.source else source()
                bits, why = kv_bits_for(snapshot, policy, mb)
            except Exception as e:  # noqa: BLE001 — a failing signal source keeps the default precision
                bits, why = kvcache.DEFAULT_BITS, f"signals unreadable ({e}) → {kvcache.DEFAULT_BITS} bits"
        else:
            why = "fixed"
        self.session.set_kv_bits(bits)
        return bits, why

    def set_budget(self, budget: str | float, signals: SignalSource | None = None,
                   policy: PolicyConfig | None = None, signals_root: str | Path | None = None,
                   on_budget_change: Callable[[Decision, Decision], None] | None = None,
                   every: int = DEFAULT_REEVALUATE_EVERY) -> Decision | None:
        """low|mid|high|max, bits in [2, 8], or "auto" (device-driven every ``every`` tokens; the policy's levels
        map to this model's named budgets unless ``policy`` says otherwise). Returns auto's first decision."""
        value = parse_budget(str(budget), self.info.named_budgets)
        if value != "auto":
            self.control.fix(value)
            return None
        auto = AutoBudget(signals or SysfsSource(Path(signals_root or "/")),
                          policy or PolicyConfig(named=self.info.named_budgets))
        if on_budget_change:
            auto.listeners.append(on_budget_change)
        return self.control.follow(auto, every)

    @property
    def decision(self) -> Decision | None:
        """What ``auto`` decided last (bits, level, reason, pacing); None with a fixed budget."""
        auto = self.control.auto
        return auto.decision if auto else None

    @property
    def budget_changes(self) -> list[tuple[int, Decision]]:
        return self.control.changes

    def cancel(self) -> None:
        """End every generation created before this call (see the module's threading contract)."""
        with self._live_lock:
            live = list(self._live)
        for gen in live:
            gen.cancel()

    def generate(self, prompt: str, budget: str | float | None = None, max_new_tokens: int = 128,
                 chat: bool | None = None, sampling: SamplingConfig | None = None,
                 timeout: float | None = None) -> Generation:
        """Text pieces as they are produced. ``chat`` defaults to the model's chat template when it has one."""
        if not prompt.strip():
            raise ValueError("[mobiq] prompt expected non-empty text; got an empty prompt")
        if budget is not None:
            self.set_budget(budget)
        use_chat = self.codec.chat_template is not None if chat is None else chat
        fitted = (chat_prompt(self.codec, [{"role": "user", "content": prompt}], max_new_tokens, self.info.context)
                  if use_chat else raw_prompt(self.codec, prompt, max_new_tokens, self.info.context))
        return self._start(fitted, max_new_tokens, sampling, timeout)

    def chat(self, system: str | None = None) -> Conversation:
        if self.codec.chat_template is None:
            raise ValueError("[mobiq] this model has no chat template; use generate(..., chat=False)")
        return Conversation(self, system)

    def _start(self, prompt: Prompt, max_new: int, sampling: SamplingConfig | None, timeout: float | None,
               on_finish: Callable[[Generation], None] | None = None) -> Generation:
        gen = Generation(self, prompt, max_new, sampling or SamplingConfig(), timeout, on_finish)
        with self._live_lock:
            self._live.add(gen)
        return gen
