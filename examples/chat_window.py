"""A desktop chat window over the MoBiQuant runtime (Tk, from Python's standard library).

    python examples/chat_window.py models/smollm2-135m [--budget auto] [--threads 2]

The model is loaded once. Each reply streams from a worker thread through a queue; Tk's widgets are
touched only on the UI thread. The budget selector (low … max, auto) and the Stop button act on the
running reply from the UI thread — the runtime's threading contract (runtime/api.py) makes that safe:
the next token reads the new budget, Stop ends the reply after the current token. The status line shows
the budget, the bits the last token read and the decode speed.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import tkinter as tk
from tkinter import ttk

from mobiquant.runtime import Model

BUDGETS = ("low", "mid", "high", "max", "auto")


class ChatWindow:
    """The window's state lives here; ``poll`` (every 30 ms on the UI thread) applies what the worker sent."""

    def __init__(self, root: tk.Tk, model: Model, budget: str = "auto", max_new_tokens: int = 256):
        self.root, self.model, self.max_new_tokens = root, model, max_new_tokens
        self.chat = model.chat() if model.codec.chat_template is not None else None
        self.events: queue.Queue = queue.Queue()
        self.generation = None
        root.title(f"MoBiQuant — {model.info.meta.get('source_model', model.info.directory.name)}")
        root.geometry("720x480")

        self.transcript = tk.Text(root, wrap="word", state="disabled", height=20)
        self.transcript.tag_configure("user", foreground="#1f4e8c", font=("TkDefaultFont", 10, "bold"))
        self.transcript.tag_configure("note", foreground="#888888")
        self.transcript.pack(fill="both", expand=True, padx=8, pady=(8, 4))

        bar = ttk.Frame(root)
        bar.pack(fill="x", padx=8)
        self.entry = ttk.Entry(bar)
        self.entry.pack(side="left", fill="x", expand=True)
        self.entry.bind("<Return>", lambda _: self.send())
        self.send_button = ttk.Button(bar, text="Send", command=self.send)
        self.send_button.pack(side="left", padx=4)
        self.stop_button = ttk.Button(bar, text="Stop", command=self.stop, state="disabled")
        self.stop_button.pack(side="left")
        ttk.Label(bar, text="  Budget").pack(side="left")
        self.budget = tk.StringVar(value=budget)
        self.budget_box = ttk.Combobox(bar, textvariable=self.budget, values=BUDGETS, width=6, state="readonly")
        self.budget_box.pack(side="left", padx=4)
        self.budget_box.bind("<<ComboboxSelected>>", lambda _: self.apply_budget())

        self.status = tk.StringVar(value="ready")
        ttk.Label(root, textvariable=self.status, anchor="w").pack(fill="x", padx=8, pady=(4, 8))
        self.apply_budget()
        self.entry.focus_set()
        root.after(30, self.poll)

    # --- UI thread ---------------------------------------------------------------------------------------
    def apply_budget(self) -> None:
        self.budget_name = self.budget.get()  # a plain copy: the worker thread must not read a Tk variable
        decision = self.model.set_budget(self.budget_name)
        self.describe_budget = f"auto: {decision.level} ({decision.reason})" if decision else self.budget_name
        if self.generation is None:
            self.status.set(f"ready · budget {self.describe_budget}")

    def send(self) -> None:
        text = self.entry.get().strip()
        if not text or self.generation is not None:
            return
        self.entry.delete(0, "end")
        self.write(f"You: {text}\n", "user")
        self.write("Assistant: ")
        self.generation = (self.chat.send(text, self.max_new_tokens) if self.chat is not None else
                           self.model.generate(text, max_new_tokens=self.max_new_tokens, chat=False))
        self.send_button.configure(state="disabled")
        self.stop_button.configure(state="normal")
        threading.Thread(target=self.work, args=(self.generation,), name="mobiq-reply", daemon=True).start()

    def stop(self) -> None:
        if self.generation is not None:
            self.generation.cancel()

    def write(self, text: str, tag: str | None = None) -> None:
        self.transcript.configure(state="normal")
        self.transcript.insert("end", text, tag or ())
        self.transcript.see("end")
        self.transcript.configure(state="disabled")

    def poll(self) -> None:
        try:
            while True:
                kind, value = self.events.get_nowait()
                if kind == "piece":
                    self.write(value)
                elif kind == "status":
                    self.status.set(value)
                elif kind == "done":
                    self.finish(value)
        except queue.Empty:
            pass
        self.root.after(30, self.poll)

    def finish(self, gen) -> None:
        note = {"cancelled": " [stopped]", "error": " [error]"}.get(gen.stop_reason, "")
        self.write(f"{note}\n\n", "note")
        self.generation = None
        self.send_button.configure(state="normal")
        self.stop_button.configure(state="disabled")

    @property
    def transcript_text(self) -> str:
        return self.transcript.get("1.0", "end-1c")

    # --- worker thread: never touches a widget ---------------------------------------------------------------
    def work(self, gen) -> None:
        try:
            for piece in gen:
                self.events.put(("piece", piece))
                self.events.put(("status", self.live_line(gen)))
        except Exception as e:  # noqa: BLE001 — shown in the window instead of killing the thread silently
            self.events.put(("piece", f"\n[{e}]"))
        self.events.put(("status", self.live_line(gen) + f" · {gen.stop_reason}"))
        self.events.put(("done", gen))

    def live_line(self, gen) -> str:
        steps = gen.stats.steps
        last = steps[-1] if steps else None
        bits = f"{last.avg_bits:.2f} bits read (target {last.target_bits:g})" if last else "prefill"
        speed = gen.stats.decode_tokens_per_s
        decision = self.model.decision
        budget = f"auto → {decision.level}" if decision else self.budget_name
        pacing = f" · pacing {decision.pause_s:.2f} s" if decision and decision.pause_s else ""
        return (f"budget {budget}{pacing} · {bits} · {len(steps)} tokens"
                + (f" · {speed:.1f} tok/s" if speed == speed else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="an exported model directory")
    p.add_argument("--budget", default="auto", choices=BUDGETS)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    try:
        model = Model.load(args.model, args.threads)
    except (ValueError, OSError) as e:
        print(str(e).splitlines()[0], file=sys.stderr)
        return 2
    root = tk.Tk()
    ChatWindow(root, model, args.budget)
    root.mainloop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
