"""Tokenizer, chat template, stop tokens and streaming detokenization (tokenizers + jinja2, no transformers).

Everything comes from the model directory's own files (docs/design.md, "The model file"):

    tokenizer.json           the tokenizer (required)
    chat_template.jinja      the chat template, else tokenizer_config.json's "chat_template"
    tokenizer_config.json    bos/eos tokens (strings) for the template and the stop set
    generation_config.json   eos_token_id (int or list): the stop set
    mobiq.json               bos_token, eos_tokens, eos_token_ids as recorded by the exporter

Templates are rendered as Hugging Face renders them: a sandbox, ``trim_blocks``/``lstrip_blocks``, the
``loopcontrols`` extension, the globals ``bos_token``, ``eos_token``, ``raise_exception`` and
``strftime_now``, and a ``tojson`` that keeps non-ASCII text. A missing, unreadable or malformed file is
a :class:`TextFileError` with one line naming it.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class TextFileError(ValueError):
    """A tokenizer or template file that is missing, unreadable or malformed."""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TextFileError(f"[mobiq] {path}: expected readable JSON; got {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(data, dict):
        raise TextFileError(f"[mobiq] {path}: expected a JSON object; got {type(data).__name__}")
    return data


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _load_tokenizer(path: Path) -> Tokenizer:
    if not path.is_file():
        raise TextFileError(f"[mobiq] {path}: expected the model's tokenizer; got no such file")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 — tokenizers raises a bare Exception for malformed files
        raise TextFileError(f"[mobiq] {path}: expected a tokenizers JSON file; got an unreadable one "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e


class TextCodec:
    def __init__(self, model_dir: Path, meta: dict):
        model_dir = Path(model_dir)
        self.tokenizer = _load_tokenizer(model_dir / "tokenizer.json")
        config = _read_json(model_dir / "tokenizer_config.json")
        generation = _read_json(model_dir / "generation_config.json")
        template = model_dir / "chat_template.jinja"
        try:
            self.chat_template = template.read_text(encoding="utf-8") if template.is_file() else None
        except (OSError, UnicodeDecodeError) as e:
            raise TextFileError(f"[mobiq] {template}: expected UTF-8 text; got {type(e).__name__}") from e
        if self.chat_template is None and isinstance(config.get("chat_template"), str):
            self.chat_template = config["chat_template"]
        self.bos_token = meta.get("bos_token") or _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token")) or next(iter(meta.get("eos_tokens") or []), None)
        self.bos_id = self._id(self.bos_token)
        self.stop_ids = frozenset(self._stop_ids(meta, config, generation))
        self._template = None

    def _stop_ids(self, meta: dict, config: dict, generation: dict) -> set[int]:
        ids = generation.get("eos_token_id", [])
        stops = set(ids if isinstance(ids, list) else [ids]) | set(meta.get("eos_token_ids") or [])
        for token in [*(meta.get("eos_tokens") or []), _token_text(config.get("eos_token"))]:
            if (i := self._id(token)) is not None:
                stops.add(i)
        return {i for i in stops if isinstance(i, int)}

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The model's chat template applied to ``messages``, ending with the assistant's turn."""
        from jinja2 import TemplateError

        if self.chat_template is None:
            raise TextFileError("[mobiq] this model has no chat template; use a raw prompt")
        try:
            return self._compiled().render(messages=messages, add_generation_prompt=True)
        except TemplateError as e:
            raise TextFileError(f"[mobiq] chat template: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e

    def _compiled(self):
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if self._template is None:
            def raise_exception(message):
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
                x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
            env.globals.update(raise_exception=raise_exception, bos_token=self.bos_token or "",
                               eos_token=self.eos_token or "",
                               strftime_now=lambda fmt: datetime.now().strftime(fmt))
            try:
                self._template = env.from_string(self.chat_template)
            except TemplateError as e:
                raise TextFileError(f"[mobiq] chat template: expected valid Jinja; got {e}") from e
        return self._template

    def decoder(self) -> "StreamDecoder":
        return StreamDecoder(self.tokenizer)


class StreamDecoder:
    """Token ids in, text pieces out, never splitting a UTF-8 character; constant work per token."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        return self.stream.step(self.tokenizer, token_id) or ""
