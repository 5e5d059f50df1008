"""Prompts that fit the context: the one place where text becomes the token ids a generation starts from.

A raw prompt keeps its BOS and its last tokens. A chat keeps its system message and its newest turns: the
oldest whole turns (a user message and the replies after it) are dropped until the rendered conversation
plus ``max_new`` tokens fits the model's context; if the newest user message alone is still too long, the
start of its text is cut (never the chat template's own tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .session import ContextError
from .text import TextCodec

Message = dict[str, str]


@dataclass
class Prompt:
    ids: list[int]
    messages: list[Message] = field(default_factory=list)  # the chat as fitted (empty for a raw prompt)
    dropped_turns: int = 0  # oldest whole turns left out
    cut_tokens: int = 0  # tokens cut from the start of the raw text or of the newest user message


def _room(max_new: int, context: int) -> int:
    if not 1 <= max_new < context:
        raise ContextError(f"[mobiq] max new tokens expected in [1, {context - 1}] (context {context}); got {max_new}")
    return context - max_new


def raw_prompt(codec: TextCodec, text: str, max_new: int, context: int) -> Prompt:
    ids, room = codec.encode(text, bos=True), _room(max_new, context)
    if len(ids) <= room:
        return Prompt(ids)
    head = ids[:1] if codec.bos_id is not None else []
    return Prompt(head + ids[len(ids) - room + len(head):], cut_tokens=len(ids) - room)


def _turns(messages: list[Message]) -> tuple[list[Message], list[list[Message]]]:
    """(system messages, turns): each turn starts at a user message."""
    head = [m for m in messages[:1] if m.get("role") == "system"]
    turns: list[list[Message]] = []
    for m in messages[len(head):]:
        if m.get("role") == "user" or not turns:
            turns.append([])
        turns[-1].append(m)
    return head, turns


def chat_prompt(codec: TextCodec, messages: list[Message], max_new: int, context: int) -> Prompt:
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("[mobiq] chat expected messages ending with a user message")
    room = _room(max_new, context)
    head, turns = _turns(messages)

    def ids_of(kept: list[list[Message]]) -> list[int]:
        return codec.encode(codec.render_chat(head + [m for t in kept for m in t]), bos=False)

    dropped = 0
    ids = ids_of(turns)
    while len(ids) > room and len(turns) > 1:
        turns, dropped = turns[1:], dropped + 1
        ids = ids_of(turns)
    cut = 0
    if len(ids) > room:  # the newest user message alone is too long: cut the start of its text
        last = turns[-1][0]
        content = codec.encode(last["content"], bos=False)
        keep = len(content) - (len(ids) - room)
        while len(ids) > room:
            if keep <= 0:
                raise ContextError(f"[mobiq] the chat template needs more than {room} tokens of the context "
                                   f"{context} with {max_new} new tokens; lower --max-new")
            turns[-1] = [{**last, "content": codec.decode(content[-keep:])}]
            ids = ids_of(turns)
            cut, keep = len(content) - keep, keep - max(1, len(ids) - room)
    return Prompt(ids, head + [m for t in turns for m in t], dropped, cut)
