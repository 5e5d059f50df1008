"""Tiny random Qwen2, Qwen3, Mistral and Phi-3 models as Hugging Face folders (character tokenizer, no downloads).

Each has what sets its architecture apart drawn away from HF's initial values, so a graph that ignored it would
not match: Qwen2's q/k/v biases are random (HF starts them at 0), Qwen3's q/k norm weights are random (HF: 1),
Mistral and Phi-3 attend within a sliding window of WINDOW tokens (prompts of a few dozen tokens cross it), and
Phi-3's linears are fused and its LM head untied.
"""

from __future__ import annotations

from pathlib import Path

from tiny_llama import CHAT_TEMPLATE, VOCAB, write_char_tokenizer

WINDOW = 8
ARCHITECTURES = ("qwen2", "qwen3", "mistral", "phi3")


def write_tiny(arch: str, folder: Path, seed: int = 0) -> Path:
    import torch
    import transformers as T

    write_char_tokenizer(folder)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config, cls = {
        "qwen2": (lambda: T.Qwen2Config(**common, tie_word_embeddings=True), T.Qwen2ForCausalLM),
        "qwen3": (lambda: T.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True), T.Qwen3ForCausalLM),
        "mistral": (lambda: T.MistralConfig(**common, sliding_window=WINDOW, tie_word_embeddings=True),
                    T.MistralForCausalLM),
        "phi3": (lambda: T.Phi3Config(**common, sliding_window=WINDOW, tie_word_embeddings=False, pad_token_id=0),
                 T.Phi3ForCausalLM),
    }[arch]
    model = cls(config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0.0, 0.5)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                p.normal_(1.0, 0.5)
    model.save_pretrained(folder)
    return folder
