"""The embedding API's contract (runtime/api.py): budgets, auto, cancel and listeners from other threads,
two threads on one Model, half-consumed generations, and chats longer than the context.

References are independent runs: the same prompt generated alone, greedily, on a fresh Model.
"""

from __future__ import annotations

import threading
import time

import pytest

from mobiquant.runtime import Model
from mobiquant.runtime.api import ModelBusy
from mobiquant.runtime.budget import PolicyConfig
from mobiquant.runtime.sampling import SamplingConfig
from mobiquant.runtime.signals import Snapshot

GREEDY = SamplingConfig(repetition_penalty=1.0)


def load(path, **kw) -> Model:
    m = Model.load(path, threads=1, **kw)
    m.codec.stop_ids = frozenset()  # a random model may say EOS at any point: let every run go to max tokens
    return m


def run_alone(path, prompt: str, n: int, budget="max") -> str:
    return "".join(load(path).generate(prompt, budget=budget, max_new_tokens=n, chat=False, sampling=GREEDY))


def wait_until(condition, timeout=10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.005)


def in_thread(fn) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


# --- budget, auto and listeners --------------------------------------------------------------------------------

def test_set_budget_from_another_thread_reaches_the_next_token(tiny_model_dir):
    m = load(tiny_model_dir)
    gen = m.generate("hello", budget="max", max_new_tokens=12, chat=False, sampling=GREEDY)
    for i, _ in enumerate(gen):
        if i == 3:
            in_thread(lambda: m.set_budget(3.0)).join(5)
    bits = [s.target_bits for s in gen.stats.steps]
    assert bits[:4] == [8.0] * 4 and bits[5:] == [3.0] * 7, bits


def test_switching_to_auto_mid_generation_is_seen_by_the_running_generation(tiny_model_dir):
    """The old API replaced its control object on set_budget("auto"): the running generation never saw it."""
    m = load(tiny_model_dir)
    hot = lambda: Snapshot(battery_present=False, on_ac=True, cpu_celsius=79.0)  # noqa: E731 — low, paced
    policy = PolicyConfig(named=m.info.named_budgets, pace_s_per_c=0.001)
    gen = m.generate("hello", budget="max", max_new_tokens=12, chat=False, sampling=GREEDY)
    for i, _ in enumerate(gen):
        if i == 2:
            in_thread(lambda: m.set_budget("auto", signals=hot, policy=policy)).join(5)
        if i == 6:
            m.set_budget("max")
    bits = [s.target_bits for s in gen.stats.steps]
    low = m.info.named_budgets["low"]
    assert bits[:3] == [8.0] * 3 and bits[3:7] == [low] * 4 and bits[7:] == [8.0] * 5, bits
    assert gen.stats.paused_seconds > 0  # 79 °C at the floor: paced


def test_device_heats_up_mid_generation_later_tokens_read_fewer_bits_and_pause(tiny_model_dir):
    """auto re-reads the signals every 4 tokens on a background thread; the device passes 83 °C at the third read
    (1: set_budget, 2: started at token 0, 3: started at token 4)."""
    m = load(tiny_model_dir)
    reads = []

    def device() -> Snapshot:
        reads.append(time.monotonic())
        return Snapshot(battery_present=False, on_ac=True, cpu_celsius=55.0 if len(reads) < 3 else 84.0)

    policy = PolicyConfig(named=m.info.named_budgets, pace_max_s=0.01)
    first = m.set_budget("auto", signals=device, policy=policy, every=4)
    assert (first.level, first.target_bits) == ("max", 8.0)
    gen = m.generate("hello", max_new_tokens=24, chat=False, sampling=GREEDY)
    for i, _ in enumerate(gen):
        if i == 5:  # let the third read land (the generator waits meanwhile)
            wait_until(lambda: m.decision.level == "low")
    steps = gen.stats.steps
    (index, decision), = m.budget_changes
    assert 5 <= index <= 8 and "84" in decision.reason and decision.pause_s == 0.01
    early, late = [s.avg_bits for s in steps[:index]], [s.avg_bits for s in steps[index:]]
    assert [s.target_bits for s in steps[index:]] == [m.info.named_budgets["low"]] * len(late)
    assert max(late) < min(early), f"bits read did not drop after the heat-up: {early} -> {late}"
    assert gen.stats.paused_seconds >= 0.01 * (len(late) - 1) * 0.9


def test_slow_signal_reads_never_block_a_token(tiny_model_dir):
    """A source that takes 0.3 s (a vcgencmd call) read at every token: tokens keep their own pace."""
    m = load(tiny_model_dir)
    calls = []

    def slow() -> Snapshot:
        calls.append(None)
        time.sleep(0.3)
        return Snapshot(battery_present=False, on_ac=True, cpu_celsius=50.0)

    m.set_budget("auto", signals=slow, every=1)
    started = time.monotonic()
    gen = m.generate("hello", max_new_tokens=30, chat=False, sampling=GREEDY)
    assert len(list(gen)) > 0 and len(gen.stats.steps) == 30
    took = time.monotonic() - started
    assert max(s.seconds for s in gen.stats.steps[1:]) < 0.25
    assert took < 0.3 * 29 / 2, f"{took:.2f} s for 30 tokens: the signal reads were on the token path"
    assert 2 <= len(calls) < 30  # reads happened, one at a time


def test_a_listener_may_call_back_into_the_model(tiny_model_dir):
    """The old BudgetControl held its lock while calling listeners: set_budget from a listener deadlocked."""
    m = load(tiny_model_dir)
    temps = iter([55.0, 55.0] + [79.0] * 1000)
    seen = []

    def listener(old, new):
        seen.append((old.level, new.level))
        m.set_budget(5.0)  # re-entry: leave auto for fixed bits

    m.set_budget("auto", signals=lambda: Snapshot(battery_present=False, on_ac=True, cpu_celsius=next(temps)),
                 on_budget_change=listener, every=2)
    result = {}

    def consume():
        gen = m.generate("hello", max_new_tokens=20, chat=False, sampling=GREEDY)
        for i, _ in enumerate(gen):
            if i == 3:
                wait_until(lambda: seen and m.control.auto is None)
        result["bits"] = [s.target_bits for s in gen.stats.steps]

    t = in_thread(consume)
    t.join(30)
    assert not t.is_alive(), "deadlock: a listener calling set_budget"
    assert seen == [("max", "low")] and result["bits"][-1] == 5.0, (seen, result)
    assert m.decision is None and m.control.bits == 5.0


def test_a_failing_signal_source_keeps_the_budget_and_says_why(tiny_model_dir, caplog):
    m = load(tiny_model_dir)
    calls = iter(range(1000))

    def flaky() -> Snapshot:
        if next(calls) >= 1:
            raise OSError("sensor gone")
        return Snapshot(battery_present=False, on_ac=True)

    m.set_budget("auto", signals=flaky, every=1)
    gen = m.generate("hello", max_new_tokens=8, chat=False, sampling=GREEDY)
    list(gen)
    assert [s.target_bits for s in gen.stats.steps] == [8.0] * 8
    wait_until(lambda: m.control.error is not None)
    assert "sensor gone" in str(m.control.error)


# --- cancel --------------------------------------------------------------------------------------------------

def test_cancel_before_the_first_token_is_not_lost(tiny_model_dir):
    """The old generate cleared the cancel flag when it took the lock: a cancel just before it was erased."""
    m = load(tiny_model_dir)
    gen = m.generate("hello", max_new_tokens=8, chat=False, sampling=GREEDY)
    m.cancel()
    assert list(gen) == [] and gen.stop_reason == "cancelled"
    later = m.generate("hello", max_new_tokens=8, chat=False, sampling=GREEDY)  # created after the cancel
    assert len(list(later)) > 0 and later.stop_reason == "max tokens"


def test_cancel_from_another_thread_stops_after_the_current_token(tiny_model_dir):
    m = load(tiny_model_dir)
    gen = m.generate("hello", max_new_tokens=60, chat=False, sampling=GREEDY)
    for i, _ in enumerate(gen):
        if i == 4:
            in_thread(m.cancel).join(5)
    assert gen.stop_reason == "cancelled" and len(gen.stats.steps) == 5
    assert m.last_stats is gen.stats


def test_cancel_ends_a_pacing_pause_at_once(tiny_model_dir):
    m = load(tiny_model_dir)
    hot = PolicyConfig(named=m.info.named_budgets, pace_max_s=30.0)
    m.set_budget("auto", signals=lambda: Snapshot(on_ac=True, cpu_celsius=90.0), policy=hot)
    gen = m.generate("hello", max_new_tokens=4, chat=False, sampling=GREEDY)
    next(gen)
    timer = threading.Timer(0.3, gen.cancel)
    timer.start()
    started = time.monotonic()
    assert list(gen) == [] and gen.stop_reason == "cancelled"
    assert time.monotonic() - started < 5.0


# --- two threads, abandoned and busy generations ------------------------------------------------------------

def test_two_threads_on_one_model_serialize_and_match_running_alone(tiny_model_dir):
    prompts = {"a": "hello there", "b": "0123456789"}
    alone = {k: run_alone(tiny_model_dir, p, 10) for k, p in prompts.items()}
    m = load(tiny_model_dir)
    m.set_budget("max")
    got: dict[str, list[str]] = {"a": [], "b": []}
    errors = []

    def worker(key):
        try:
            for _ in range(3):
                got[key].append("".join(m.generate(prompts[key], max_new_tokens=10, chat=False, sampling=GREEDY)))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [in_thread(lambda k=k: worker(k)) for k in prompts]
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads), errors
    assert got == {k: [v] * 3 for k, v in alone.items()}


def test_a_half_consumed_generation_is_released_when_another_waits(tiny_model_dir):
    m = load(tiny_model_dir, idle_release_s=0.2)
    m.set_budget("max")
    stalled = m.generate("hello there", max_new_tokens=20, chat=False, sampling=GREEDY)
    first = next(stalled)  # holds the model, then its consumer goes away to do something else
    other = "".join(m.generate("0123456789", max_new_tokens=10, chat=False, sampling=GREEDY, timeout=10))
    assert other == run_alone(tiny_model_dir, "0123456789", 10)  # the shared KV buffers were not corrupted
    assert list(stalled) == [] and stalled.stop_reason == "released" and first


def test_a_dropped_generation_frees_the_model_at_once(tiny_model_dir):
    m = load(tiny_model_dir, idle_release_s=60.0)
    gen = m.generate("hello", max_new_tokens=20, chat=False, sampling=GREEDY)
    next(gen)
    del gen  # garbage: the model is free, no idle wait
    started = time.monotonic()
    assert "".join(m.generate("hello", max_new_tokens=4, chat=False, sampling=GREEDY, timeout=5))
    assert time.monotonic() - started < 5


def test_a_busy_model_times_out_with_model_busy(tiny_model_dir):
    m = load(tiny_model_dir, idle_release_s=60.0)
    held = m.generate("hello", max_new_tokens=20, chat=False, sampling=GREEDY)
    next(held)
    waiter = m.generate("hi", max_new_tokens=4, chat=False, sampling=GREEDY, timeout=0.2)
    with pytest.raises(ModelBusy, match="expected free within 0.2 s"):
        next(waiter)
    held.close()
    assert held.stop_reason == "closed"
    assert m.generate("hi", max_new_tokens=4, chat=False, sampling=GREEDY, timeout=1).__next__()


# --- chats longer than the context ----------------------------------------------------------------------------

def test_a_long_chat_drops_whole_old_turns_keeps_the_system_prompt_and_reuses_its_cache(tiny_model_dir):
    m = load(tiny_model_dir)  # context 128, one token per character
    chat = m.chat(system="Be brief.")
    system_ids = m.codec.encode(m.codec.render_chat([{"role": "system", "content": "Be brief."}])[:-len("<s>assistant\n")],
                                bos=False)
    dropped = []
    for turn in range(8):
        gen = chat.send(f"question {turn}: " + "x" * 20, max_new_tokens=16, sampling=GREEDY)
        list(gen)
        ids = gen.prompt.ids
        assert len(ids) + 16 <= m.info.context
        assert ids[:len(system_ids)] == system_ids, "the chat template's opening was cut"
        assert chat.messages[0] == {"role": "system", "content": "Be brief."}
        assert chat.messages[-2]["content"] == f"question {turn}: " + "x" * 20
        assert [x["role"] for x in chat.messages[1:]] == ["user", "assistant"] * ((len(chat.messages) - 1) // 2)
        dropped.append(gen.prompt.dropped_turns)
        if gen.prompt.dropped_turns:
            assert gen.stats.reused_tokens >= len(system_ids)  # the system prompt's keys and values are reused
    assert dropped[0] == 0 and max(dropped) >= 1
    assert len(chat.messages) <= 1 + 2 * 4  # history no longer grows without bound


def test_a_message_longer_than_the_context_loses_its_start_not_the_template(tiny_model_dir):
    m = load(tiny_model_dir)
    text = "".join(chr(ord("a") + i % 26) for i in range(400))
    gen = m.chat(system="S").send(text, max_new_tokens=8)
    rendered = m.codec.decode(gen.prompt.ids)
    assert len(gen.prompt.ids) <= m.info.context - 8 and gen.prompt.cut_tokens > 0
    assert rendered.startswith("system\nS") and rendered.endswith(text[-50:] + "\nassistant\n"), rendered
    assert len(list(gen)) > 0


def test_a_raw_prompt_keeps_its_bos_and_its_end(tiny_model_dir):
    m = load(tiny_model_dir)
    gen = m.generate("z" * 500 + "END", max_new_tokens=8, chat=False)
    assert gen.prompt.ids[0] == m.codec.bos_id and len(gen.prompt.ids) == m.info.context - 8
    assert m.codec.decode(gen.prompt.ids).endswith("zzEND")


def test_a_new_holder_is_not_released_for_the_previous_ones_idle_time(tiny_model_dir):
    """A generation that takes the model long after the previous one ended, and needs a while before its first
    step (here: a slow signal read for --kv-bits auto), keeps it while another waits: its idle time starts when
    it takes the model."""
    from mobiquant.runtime.signals import Snapshot

    def slow_signals():
        time.sleep(0.4)
        return Snapshot()

    m = load(tiny_model_dir, idle_release_s=0.2)
    m.set_budget("max")
    m.set_kv_bits("auto", signals=slow_signals)
    "".join(m.generate("hello there", max_new_tokens=2, chat=False, sampling=GREEDY))
    time.sleep(0.5)  # the model has been idle longer than idle_release_s
    first = m.generate("hello there", max_new_tokens=10, chat=False, sampling=GREEDY)
    texts = {}
    a = in_thread(lambda: texts.setdefault("a", "".join(first)))
    time.sleep(0.1)  # first holds the model and is reading the signals
    b = in_thread(lambda: texts.setdefault("b", "".join(m.generate("0123456789", max_new_tokens=10, chat=False,
                                                                  sampling=GREEDY))))
    a.join(30), b.join(30)
    assert first.stop_reason == "max tokens" and texts["a"] == run_alone(tiny_model_dir, "hello there", 10)
    assert texts["b"] == run_alone(tiny_model_dir, "0123456789", 10)
