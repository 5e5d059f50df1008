"""Tokenizer, chat template and streaming detokenization (tokenizers + jinja2, no transformers)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


class TextCodec:
    def __init__(self, model_dir: Path, meta: dict):
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        template = model_dir / "chat_template.jinja"
        self.chat_template = template.read_text() if template.is_file() else None
        self.bos_id = self._id(meta.get("bos_token"))
        stops = set(meta.get("eos_token_ids") or [])
        for tok in [*(meta.get("eos_tokens") or []), "<|endoftext|>"]:
            if (i := self._id(tok)) is not None:
                stops.add(i)
        self.stop_ids = frozenset(stops)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The model's chat template applied to ``messages``, ending with the assistant's turn."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if self.chat_template is None:
            raise ValueError("[mobiq] this model has no chat template; use a raw prompt")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=True)

    def decoder(self) -> "StreamDecoder":
        return StreamDecoder(self.tokenizer)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece
