"""The desktop example (examples/chat_window.py) under a virtual X server: a prompt streams a reply from the
worker thread, the budget changes mid-reply, Stop ends a reply; the window's text and state are checked and a
screenshot is written to the test's output folder (and to $MOBIQ_SCREENSHOT_DIR when set)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parent.parent / "examples" / "chat_window.py"


@pytest.fixture(scope="module")
def display():
    if shutil.which("Xvfb") is None:
        pytest.fail("Xvfb expected on PATH for the GUI test; `make setup` installs it (Debian package xvfb)")
    read, write = os.pipe()
    server = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "800x600x24", "-nolisten", "tcp"],
                              pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read) as f:
        number = f.readline().strip()
    assert number, "Xvfb did not report its display"
    yield f":{number}"
    server.terminate()
    server.wait(10)


def load_example():
    spec = importlib.util.spec_from_file_location("chat_window", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pump(root, until, timeout=30.0) -> None:
    end = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < end, "the window did not get there in time"
        root.update()
        time.sleep(0.005)


def test_chat_window_streams_switches_budget_mid_reply_and_stops(tiny_model_dir, display, tmp_path):
    import tkinter as tk

    from PIL import ImageGrab

    from mobiquant.runtime import Model

    app = load_example()
    model = Model.load(tiny_model_dir, threads=1)
    model.codec.stop_ids = frozenset()  # a random model may end at once: let replies run to their length
    forward = model.session.forward

    def slow_device(*args, **kwargs):  # 15 ms per step: a reply takes long enough to act on it mid-way
        time.sleep(0.015)
        return forward(*args, **kwargs)

    model.session.forward = slow_device
    root = tk.Tk(screenName=display)
    try:
        window = app.ChatWindow(root, model, budget="max", max_new_tokens=60)
        root.update()
        window.entry.insert(0, "hello")
        window.send_button.invoke()
        gen = window.generation
        assert str(window.stop_button["state"]) == "normal" and str(window.send_button["state"]) == "disabled"
        pump(root, lambda: len(gen.stats.steps) >= 8)
        window.budget_box.set("low")
        window.budget_box.event_generate("<<ComboboxSelected>>")
        pump(root, lambda: window.generation is None)

        low = model.info.named_budgets["low"]
        bits = [s.target_bits for s in gen.stats.steps]
        assert len(bits) == 60 and bits[:8] == [8.0] * 8 and bits[-1] == low and sorted(set(bits)) == [low, 8.0]
        text = window.transcript_text
        assert text.startswith("You: hello\nAssistant: ") and gen.text and gen.text in text, text
        status = window.status.get()
        assert "budget low" in status and "bits read" in status and "tok/s" in status and "max tokens" in status
        assert str(window.send_button["state"]) == "normal" and str(window.stop_button["state"]) == "disabled"
        shot = ImageGrab.grab(xdisplay=display)
        shot.save(tmp_path / "chat-window.png")
        if os.environ.get("MOBIQ_SCREENSHOT_DIR"):
            shot.save(Path(os.environ["MOBIQ_SCREENSHOT_DIR"]) / "chat-window-test.png")
        lo, hi = shot.convert("L").getextrema()
        assert hi - lo > 100, "the screenshot is blank"

        window.entry.insert(0, "and again")
        window.send_button.invoke()
        second = window.generation
        pump(root, lambda: len(second.stats.steps) >= 3)
        window.stop_button.invoke()
        pump(root, lambda: window.generation is None)
        assert second.stop_reason == "cancelled" and len(second.stats.steps) < 60
        assert window.transcript_text.endswith("[stopped]\n\n")
        # the stopped reply is kept (the first turn no longer fits the tiny model's 128-token context)
        assert window.chat.messages[-2:] == [{"role": "user", "content": "and again"},
                                             {"role": "assistant", "content": second.text}]
    finally:
        root.destroy()
