"""A tiny random Gemma 3 as a Hugging Face folder (character tokenizer, no chat template, no downloads).

Three layers, sliding / full / sliding, with a window of 8 tokens so prompts of a few
dozen tokens already cross it; two rope bases; a query_pre_attn_scalar that is not
head_dim; a final logit softcap; norm weights drawn away from zero so that (1 + w)
and w give different models.
"""

from __future__ import annotations

from pathlib import Path

from tiny_llama import VOCAB, write_char_tokenizer

WINDOW = 8


def write_tiny_gemma3(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    write_char_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
        final_logit_softcapping=2.0, initializer_range=0.1, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    return folder
