"""A Hugging Face config.json -> the ModelConfig millis's decoders compute with, or a clear refusal.

Every field of these architectures that changes the math is either read or refused: a model millis would
compute otherwise than transformers is never loaded silently.
"""
from __future__ import annotations

from millis.common.errors import MillisError
from millis.gen.config import LLAMA_TYPES, MODEL_TYPES, GPT2Config, LlamaConfig, ModelConfig, eos_ids

GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # the tanh GELU millis's GPT-2 computes (the same function)


def hf_model_config(d: dict, tied: bool) -> ModelConfig:
    """`d`: config.json (plus generation_config's eos ids); `tied`: the checkpoint has no separate lm_head."""
    mt = d.get("model_type")
    eos, more = eos_ids(d.get("eos_token_id"), d.get("generation_config", {}).get("eos_token_id"))
    common = dict(bos_id=d.get("bos_token_id"), eos_id=eos, stop_ids=more, tie_head=tied)
    if mt == "gpt2":
        check_gpt2(d)
        return GPT2Config(vocab_size=d["vocab_size"], dim=d["n_embd"], n_layers=d["n_layer"], n_heads=d["n_head"],
                          n_kv_heads=d["n_head"], max_seq=d["n_positions"], norm_eps=d.get("layer_norm_epsilon", 1e-5),
                          **common)
    if mt not in LLAMA_TYPES:
        raise MillisError(f"unsupported model_type {mt!r}; supported: {', '.join(MODEL_TYPES)}")
    if d.get("hidden_act", "silu") != "silu" or d.get("attention_bias") or d.get("mlp_bias"):
        raise MillisError(f"unsupported {mt} variant: hidden_act must be silu, without attention/mlp biases")
    rope = rope_of(d)
    nh = d["num_attention_heads"]
    return LlamaConfig(
        vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=nh,
        n_kv_heads=d.get("num_key_value_heads") or nh, max_seq=d.get("max_position_embeddings", 2048),
        hidden_dim=d["intermediate_size"], norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
        rope_type=rope.get("rope_type", rope.get("type", "default")), rope_factor=rope.get("factor", 1.0),
        rope_low_freq_factor=rope.get("low_freq_factor", 1.0), rope_high_freq_factor=rope.get("high_freq_factor", 4.0),
        rope_original_max_seq=rope.get("original_max_position_embeddings", 8192), qkv_bias=mt == "qwen2",
        sliding_window=sliding_window(d, mt), head_dim_override=d.get("head_dim") or 0, **common)


def rope_of(d: dict) -> dict:
    """The RoPE settings: `rope_parameters` (transformers 5) or `rope_scaling` (4). Both, disagreeing on the type or
    the factor (a model card's yarn `rope_scaling` added to a config transformers 5 saved): transformers takes
    `rope_scaling` then, with the top-level rope_theta (or 10000), which millis does not guess at: refused."""
    params, scaling = d.get("rope_parameters") or {}, d.get("rope_scaling") or {}
    if params and scaling:
        def kind(r: dict) -> tuple:
            return r.get("rope_type", r.get("type", "default")), float(r.get("factor", 1.0))
        if kind(params) != kind(scaling):
            raise MillisError(f"config.json has rope_parameters {kind(params)[0]} x{kind(params)[1]:g} and rope_scaling "
                              f"{kind(scaling)[0]} x{kind(scaling)[1]:g}: keep one (transformers uses rope_scaling, "
                              f"with the top-level rope_theta)")
    return params or scaling


def sliding_window(d: dict, mt: str) -> int:
    """The window every layer attends within (0: none), as transformers applies it: Llama has none; Qwen2 only
    with use_sliding_window, and only on the layers `layer_types` (or layer >= max_window_layers) names; a mix
    of windowed and full layers is refused (millis windows all layers or none)."""
    # Mistral's and Qwen2's config classes default the window to 4096 where config.json leaves the key out (null: none)
    window = d.get("sliding_window", 4096 if mt in ("mistral", "qwen2") else None) or 0
    if not window or mt == "llama" or mt == "qwen2" and not d.get("use_sliding_window"):
        return 0
    n = d["num_hidden_layers"]
    types = d.get("layer_types")
    if types is None and mt == "qwen2":
        first = d.get("max_window_layers", n)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    if types is None:  # Mistral: every layer
        return int(window)
    sliding = [t == "sliding_attention" for t in types]
    if not any(sliding):
        return 0
    if not all(sliding):
        raise MillisError(f"{mt}: {sum(sliding)} of {len(sliding)} layers attend within a sliding window and the "
                          f"others to every position (layer_types / max_window_layers): millis windows all layers "
                          f"or none")
    return int(window)


def check_gpt2(d: dict) -> None:
    """Refuse the GPT-2 settings millis's GPT-2 does not compute (each changed the logits by 0.6-3.8)."""
    why = []
    if d.get("activation_function", "gelu_new") not in GPT2_ACTIVATIONS:
        why.append(f"activation_function {d['activation_function']!r} (millis computes {GPT2_ACTIVATIONS[0]})")
    if d.get("scale_attn_weights", True) is not True:
        why.append("scale_attn_weights false (millis divides the scores by sqrt(head_dim))")
    if d.get("scale_attn_by_inverse_layer_idx"):
        why.append("scale_attn_by_inverse_layer_idx")
    if d.get("n_inner") not in (None, 4 * d["n_embd"]):
        why.append(f"n_inner {d['n_inner']} (millis's MLP is 4 x n_embd = {4 * d['n_embd']})")
    if why:
        raise MillisError(f"unsupported gpt2 variant: {'; '.join(why)}")
