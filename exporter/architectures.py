"""The Hugging Face architectures the exporter takes, loaded as the block structures it builds.

Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms) and Gemma 3 load as they are: their
modules carry the names the quantizer and the graph builder use (``self_attn.q_proj`` ...). Phi-3 is a
Mistral whose q|k|v and gate|up linears are stored fused (in that row order) — it is loaded as that
Mistral, the fused weights split into views, so every later step sees one naming (docs/design.md,
"Architectures").
"""

from __future__ import annotations

from pathlib import Path

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
             "Gemma3ForCausalLM")


def load(folder: Path, architecture: str):
    """The float32 model of ``folder`` in eval mode (Phi-3 as the equivalent Mistral)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if architecture == "Phi3ForCausalLM":
        model = phi3_as_mistral(model)
    return model.eval()


def phi3_as_mistral(phi3):
    """A MistralForCausalLM computing what ``phi3`` computes, sharing its tensors (no copy)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    c = phi3.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    config = MistralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=head_dim, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), sliding_window=c.sliding_window,
        tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id)
    q, kv, inter = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim, c.intermediate_size
    state = {}
    for name, tensor in phi3.state_dict().items():
        if name.endswith("self_attn.qkv_proj.weight"):
            pre = name[: -len("qkv_proj.weight")]
            for part, rows in zip(("q", "k", "v"), torch.split(tensor, [q, kv, kv])):
                state[f"{pre}{part}_proj.weight"] = rows
        elif name.endswith("mlp.gate_up_proj.weight"):
            pre = name[: -len("gate_up_proj.weight")]
            state[f"{pre}gate_proj.weight"], state[f"{pre}up_proj.weight"] = torch.split(tensor, [inter, inter])
        else:
            state[name] = tensor
    with torch.device("meta"):
        mistral = MistralForCausalLM(config)
    mistral.load_state_dict(state, strict=True, assign=True)
    mistral.model.rotary_emb = type(mistral.model.rotary_emb)(config)  # its buffers are not in the state dict
    left = [name for name, t in [*mistral.named_parameters(), *mistral.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"[architectures] Phi-3 as Mistral left tensors unset: {', '.join(left)}")
    if config.tie_word_embeddings:
        mistral.tie_weights()
    mistral.generation_config = phi3.generation_config
    return mistral
