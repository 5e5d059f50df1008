"""The budget the next token reads, shared by every thread (docs/design.md, "The budget policy").

A :class:`BudgetControl` holds either fixed bits or an :class:`~.budget.AutoBudget`. The generation
loop calls :meth:`BudgetControl.read` before every token; it never waits for device signals: with
``auto``, every ``every`` tokens it starts a background read of the signals (one at a time; a slow
``vcgencmd`` delays the decision, never the token) and uses the newest decision it has. Listeners of
the AutoBudget run on that background thread with no lock of the runtime held, so they may call back
into the model (``set_budget``, ``cancel``). :meth:`fix` and :meth:`follow` may be called from any
thread at any time; the next token read after them follows them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from .budget import DEFAULT_REEVALUATE_EVERY, AutoBudget, Decision

log = logging.getLogger("mobiquant.budget")


@dataclass(frozen=True)
class Budget:
    bits: float
    pause_s: float = 0.0  # wait this long after the token (pacing a hot device)


class BudgetControl:
    def __init__(self, bits: float, every: int = DEFAULT_REEVALUATE_EVERY):
        self._lock = threading.Lock()
        self._budget = Budget(float(bits))
        self._auto: AutoBudget | None = None
        self._fresh: Decision | None = None  # read by the background thread, not yet used by a token
        self._reading = False
        self.every = every
        self.changes: list[tuple[int, Decision]] = []  # (token index of a generation, decision it first used)
        self.error: Exception | None = None  # the last exception of a background read, if any

    @property
    def auto(self) -> AutoBudget | None:
        return self._auto

    @property
    def bits(self) -> float:
        return self._budget.bits

    def fix(self, bits: float) -> None:
        """Read ``bits`` from the next token on; stops following the device."""
        with self._lock:
            self._auto, self._fresh, self._budget = None, None, Budget(float(bits))

    def follow(self, auto: AutoBudget, every: int | None = None) -> Decision:
        """Follow ``auto`` from the next token on; its first decision is made now, on the caller's thread."""
        decision = auto.update()
        with self._lock:
            self._auto, self._fresh = auto, None
            self._budget = Budget(decision.target_bits, decision.pause_s)
            if every is not None:
                self.every = every
        return decision

    def read(self, step: int) -> Budget:
        """The budget of token ``step`` of a generation (0 = the prefill). Never blocks on signals."""
        with self._lock:
            if self._fresh is not None:
                decision, self._fresh = self._fresh, None
                budget = Budget(decision.target_bits, decision.pause_s)
                if budget != self._budget:
                    self.changes.append((step, decision))
                self._budget = budget
            start = self._auto is not None and step % self.every == 0 and not self._reading
            if start:
                self._reading = True
                auto = self._auto
            budget = self._budget
        if start:
            threading.Thread(target=self._read_signals, args=(auto,), name="mobiq-signals", daemon=True).start()
        return budget

    def _read_signals(self, auto: AutoBudget) -> None:
        try:
            decision = auto.update()
        except Exception as e:  # noqa: BLE001 — a failing source or listener must not stop generation
            log.warning("[mobiq] budget auto: reading the device failed (%s); keeping %g bits", e, self.bits)
            self.error, decision = e, None
        with self._lock:
            self._reading = False
            if decision is not None and self._auto is auto:
                self._fresh = decision
