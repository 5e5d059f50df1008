"""The Python API for applications: load once, generate many times, change the budget any time.

    from mobiquant.runtime import Model
    model = Model.load("models/smollm2-135m")
    for piece in model.generate("Tell me about Bath.", budget="low"):
        print(piece, end="", flush=True)
    model.set_budget("max")          # from any thread, also during a generation

Threading: one generation runs at a time per Model (others wait on a lock); run
``generate`` on a worker thread and call ``set_budget``/``cancel`` from the UI
thread — the next token uses the new budget, nothing is reloaded. The last
generation's keys and values are kept (``Model.prefix``): a prompt that repeats
its tokens (the chat template's system prompt, earlier turns) computes only the rest.
``budget="auto"`` follows the device (battery, temperature, throttling); pass
``signals=`` your own callable returning a ``signals.Snapshot`` (e.g. from the
desktop's power profile) and ``on_budget_change=`` to hear about changes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from .budget import AutoBudget, Decision, PolicyConfig, parse_budget
from .generate import BudgetControl, GenerationStats, PrefixCache, fit_context, generate
from .sampling import Sampler, SamplingConfig
from .session import ModelSession
from .signals import SignalSource, SysfsSource
from .text import TextCodec


class Model:
    def __init__(self, session: ModelSession, codec: TextCodec):
        self.session, self.codec = session, codec
        self.info = session.info
        self._lock = threading.Lock()
        self._control = BudgetControl(self.info.named_budgets["mid"])
        self._cancel = threading.Event()
        self.last_stats = GenerationStats()
        self.prefix = PrefixCache()  # keys and values of the last generation, reused where a prompt repeats them

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None) -> "Model":
        session = ModelSession(path, threads)
        return cls(session, TextCodec(session.info.directory, session.info.meta))

    def set_budget(self, budget: str | float, signals: SignalSource | None = None,
                   policy: PolicyConfig | None = None, signals_root: str | Path | None = None,
                   on_budget_change: Callable[[Decision | None, Decision], None] | None = None) -> None:
        """low|mid|high|max, bits in [2, 8], or "auto" (device-driven; the policy's levels map to this
        model's named budgets unless ``policy`` says otherwise)."""
        value = parse_budget(str(budget), self.info.named_budgets) if isinstance(budget, str) else float(budget)
        if value == "auto":
            auto = AutoBudget(signals or SysfsSource(Path(signals_root or "/")),
                              policy or PolicyConfig(named=self.info.named_budgets))
            if on_budget_change:
                auto.listeners.append(on_budget_change)
            self._control = BudgetControl(None, auto)
        else:
            parse_budget(str(value), self.info.named_budgets)  # range check
            self._control.set(value)

    def cancel(self) -> None:
        """Stop the running generation after its current token."""
        self._cancel.set()

    def generate(self, prompt: str, budget: str | float | None = None, max_new_tokens: int = 128,
                 chat: bool | None = None, sampling: SamplingConfig | None = None) -> Iterator[str]:
        """Text pieces as they are produced. ``chat`` defaults to the model's chat template when it has one."""
        if not prompt.strip():
            raise ValueError("[mobiq] prompt expected non-empty text; got an empty prompt")
        if budget is not None:
            self.set_budget(budget)
        use_chat = self.codec.chat_template is not None if chat is None else chat
        text = self.codec.render_chat([{"role": "user", "content": prompt}]) if use_chat else prompt
        ids = fit_context(self.codec.encode(text, bos=not use_chat), max_new_tokens, self.info.context)
        decoder = self.codec.decoder()
        with self._lock:
            self._cancel.clear()
            self.last_stats = GenerationStats()
            for step in generate(self.session, ids, max_new_tokens, Sampler(sampling or SamplingConfig()),
                                 self._control, self.codec.stop_ids, decoder.push, self.last_stats, self._cancel,
                                 self.prefix):
                if step.text:
                    yield step.text

    @property
    def budget_changes(self):
        return self._control.changes
