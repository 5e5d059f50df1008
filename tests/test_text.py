"""Text in and out (runtime/text.py): streaming detokenization against the tokenizer's own batch decode, chat
templates rendered with the globals Hugging Face templates use, stop tokens read from the model's files."""

from __future__ import annotations

import json

import pytest

from mobiquant.runtime.text import TextCodec, TextFileError

SAMPLE = "Héllo wörld — naïve café, 🌊 waves; 東京 and ß. " * 3


@pytest.fixture(scope="module")
def byte_bpe(tmp_path_factory):
    """A byte-level BPE tokenizer trained here (multi-byte characters split across tokens), as a model directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("bpe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<s>", "</s>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20, SAMPLE], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    return folder


def test_streaming_pieces_join_to_the_batch_decode_and_never_split_a_character(byte_bpe):
    codec = TextCodec(byte_bpe, {})
    ids = codec.encode(SAMPLE, bos=False)
    assert len(ids) > len(SAMPLE.split())  # multi-byte characters span several tokens
    decoder = codec.decoder()
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == codec.decode(ids) == SAMPLE
    assert "" in pieces  # some tokens held back: a character was incomplete
    assert all("\ufffd" not in p for p in pieces)


def test_special_tokens_are_not_streamed(byte_bpe):
    codec = TextCodec(byte_bpe, {})
    decoder = codec.decoder()
    ids = codec.encode("the fox", bos=False)
    text = "".join(decoder.push(i) for i in [*ids[:2], codec._id("<|end|>"), *ids[2:]])
    assert text == "the fox"


def test_stop_tokens_come_from_the_model_files_not_a_hard_coded_name(byte_bpe):
    codec = TextCodec(byte_bpe, {"eos_token_ids": [1]})
    # generation_config [2, 3], tokenizer_config eos </s> (2), mobiq.json [1]; <|endoftext|> (0) is not a stop here
    assert codec.stop_ids == frozenset({1, 2, 3})
    assert codec.bos_id == 1 and codec.eos_token == "</s>"


TEMPLATE = """{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}\
{% endif %}{% if loop.index > 3 %}{% break %}{% endif %}[{{ m['role'] }}] {{ m['content'] | tojson }}{{ eos_token }}\
{% endfor %}{% if add_generation_prompt %}[assistant] {{ strftime_now('%Y') }}{% endif %}"""


def test_chat_templates_get_the_hugging_face_globals(byte_bpe, tmp_path):
    import datetime

    (byte_bpe / "chat_template.jinja").write_text(TEMPLATE)
    try:
        codec = TextCodec(byte_bpe, {})
        text = codec.render_chat([{"role": "user", "content": "café"}])
        assert text == f'<s>[user] "café"</s>[assistant] {datetime.date.today().year}'
        four = [{"role": "user", "content": str(i)} for i in range(5)]
        assert codec.render_chat(four).count("[user]") == 3  # loopcontrols' break
        with pytest.raises(TextFileError, match="no tools"):
            codec.render_chat([{"role": "tool", "content": "x"}])
    finally:
        (byte_bpe / "chat_template.jinja").unlink()


def test_a_template_in_tokenizer_config_is_used_when_there_is_no_jinja_file(byte_bpe, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(byte_bpe, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ messages[0]['content'] }}!"}))
    assert TextCodec(folder, {}).render_chat([{"role": "user", "content": "hi"}]) == "hi!"


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json: expected the model's tokenizer; got no such file"),
    (lambda d: (d / "tokenizer.json").write_text("{}"), "tokenizer.json: expected a tokenizers JSON file"),
    (lambda d: (d / "generation_config.json").write_bytes(b"\xff\xfe"), "generation_config.json: expected readable JSON"),
    (lambda d: (d / "tokenizer_config.json").write_text("[]"), "tokenizer_config.json: expected a JSON object"),
    (lambda d: (d / "chat_template.jinja").write_bytes(b"\xff{{"), "chat_template.jinja: expected UTF-8 text"),
])
def test_bad_text_files_are_one_line_errors_naming_the_file(byte_bpe, tmp_path, damage, message):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(byte_bpe, folder)
    damage(folder)
    with pytest.raises(TextFileError) as e:
        TextCodec(folder, {})
    assert message in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
