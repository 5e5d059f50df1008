"""A tiny random Llama as a Hugging Face folder with a character tokenizer (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
SPECIALS = ["<unk>", "<s>", "</s>"]
VOCAB = len(SPECIALS) + len(CHARS)
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def write_char_tokenizer(folder: Path) -> Path:
    """tokenizer.json (one token per character, BOS <s> = 1, EOS </s> = 2) and its config files."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return folder


def write_tiny_llama(folder: Path, seed: int = 0, layers: int = 2, tied: bool = True) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    write_char_tokenizer(folder)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, rope_theta=10000.0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    return folder
