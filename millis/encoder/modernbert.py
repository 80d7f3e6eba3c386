"""ModernBERT (answerdotai/ModernBERT-base / -large, gte-modernbert, modernbert-embed) on the compact encoder:
its config.json read into EncoderConfig's fields, its tensors under BERT's names, and the two tables its
attention adds (numpy, no torch: the native loader imports none).

ModernBERT's layer is pre-LayerNorm: x += Wo attn(LN_a(x)); x += Wd (gelu(a) * g) with (a, g) = LN_m(x) Wi
(a GLU: Wi is (2I, D)); layer 0 has no LN_a (the embeddings' LayerNorm is its input), and a final LayerNorm
follows the last layer. Positions are rotary (q and k rotated by half-dimension pairs, HF's rotate_half), at one
base in the global layers and another in the sliding-window layers, where a query attends only keys within
`window` positions (HF: local_attention / 2, |q - k| <= window). There are no position or token-type tables.

The roles map onto BERT's per-layer parts (bert_weights.layer_parts), so every consumer reads one layout:
LN1 is the layer's mlp_norm (before the MLP), LN2 the next layer's attn_norm (the final norm after the last),
the biases ModernBERT leaves out (attention_bias, mlp_bias, norm_bias false) are zeros. The task head is
head.dense, GELU, head.norm, then the classifier, on the [CLS] row or on the mean of the rows (classifier_pooling
"cls" or "mean": AnswerDotAI's checkpoints say "mean").
"""
from __future__ import annotations

import numpy as np

from millis.common.errors import MillisError

FAMILY = "modernbert"
WINDOW_BIAS = -1e30  # a sliding-window layer's score of a key out of the window (softmax: 0; every kernel clamps it)
HEAD_NORM = {"head_lnw": ("head.norm.weight",), "head_lnb": ("head.norm.bias",)}  # after the head's GELU


def config_fields(cfg: dict) -> dict:
    """EncoderConfig's fields from a ModernBERT config.json (transformers 4.48+'s and 5's spellings both)."""
    for key, want in (("hidden_activation", "gelu"), ("classifier_activation", "gelu")):
        if cfg.get(key, "gelu") != want:
            raise MillisError(f"{key} {cfg[key]!r} is not supported by millis's compact encoder; supported: {want}")
    layers = int(cfg["num_hidden_layers"])
    kinds = cfg.get("layer_types")
    if kinds is None:  # transformers 4's form: every n-th layer global, from layer 0
        every = int(cfg.get("global_attn_every_n_layers", 3))
        kinds = ["full_attention" if i % every == 0 else "sliding_attention" for i in range(layers)]
    if len(kinds) != layers or set(kinds) - {"full_attention", "sliding_attention"}:
        raise MillisError(f"layer_types must name {layers} layers, each full_attention or sliding_attention")
    rope = cfg.get("rope_parameters") or {}
    for kind, params in rope.items():
        if (params or {}).get("rope_type", "default") != "default":
            raise MillisError(f"rope_type {params['rope_type']!r} ({kind}) is not supported; supported: default")
    theta = float((rope.get("full_attention") or {}).get("rope_theta", cfg.get("global_rope_theta", 160000.0)))
    # transformers 4: local_rope_theta 10,000 unless given, null meaning the global base; 5: rope_parameters' 10,000
    local = (rope.get("sliding_attention") or {}).get("rope_theta", cfg.get("local_rope_theta", 10000.0))
    window = int(cfg.get("local_attention", 128)) // 2
    if window < 1 and "sliding_attention" in kinds:
        raise MillisError(f"local_attention {cfg.get('local_attention')!r}: a sliding window must span 2 tokens "
                          f"or more")
    pooling = cfg.get("classifier_pooling", "cls")
    if pooling not in ("cls", "mean"):
        raise MillisError(f"classifier_pooling {pooling!r} is not supported; supported: cls, mean")
    return dict(hidden=int(cfg["hidden_size"]), layers=layers, heads=int(cfg["num_attention_heads"]),
                intermediate=int(cfg["intermediate_size"]), vocab=int(cfg["vocab_size"]),
                max_positions=int(cfg.get("max_position_embeddings", 8192)), type_vocab=1,
                eps=float(cfg.get("norm_eps", 1e-5)), family=FAMILY, rope_theta=theta,
                rope_local_theta=float(theta if local is None else local),
                window=window,
                local_layers=tuple(i for i, k in enumerate(kinds) if k == "sliding_attention"),
                head_pooling=pooling)


def bert_roles(state: dict, layers: int) -> dict:
    """ModernBERT's tensors (under 'model.' in a task checkpoint, or none in a base one) under BERT's names, the
    biases it leaves out as zeros (numpy or torch: what `state` holds), q / k / v split from Wqkv."""
    s = {k.removeprefix("model."): v for k, v in state.items()}
    word = s.get("embeddings.tok_embeddings.weight")
    if word is None:
        raise MillisError("the weights have no 'embeddings.tok_embeddings.weight': not a ModernBERT checkpoint")

    def zeros(n: int):
        return word[0, :1].repeat(n) * 0 if not isinstance(word, np.ndarray) else np.zeros(n, word.dtype)

    def norm(prefix: str, dst: str, out: dict) -> None:
        if prefix + ".weight" in s:
            w = s[prefix + ".weight"]
            out[dst + ".weight"], out[dst + ".bias"] = w, s.get(prefix + ".bias", zeros(len(w)))

    # no token types: one row of zeros, every token type 0 (as bert_names gives NO_TOKEN_TYPE families)
    out: dict = {"embeddings.word_embeddings.weight": word, "embeddings.token_type_embeddings.weight": word[:1] * 0}
    norm("embeddings.norm", "embeddings.LayerNorm", out)
    for i in range(layers):
        src, dst = f"layers.{i}.", f"encoder.layer.{i}."
        at = dst + "attention."
        qkv = s.get(src + "attn.Wqkv.weight")
        if qkv is not None:
            if qkv.shape[0] % 3:
                raise MillisError(f"the weights' layers.{i}.attn.Wqkv.weight has {qkv.shape[0]} rows: not q, k, v "
                                  f"stacked")
            D = qkv.shape[0] // 3
            b = s.get(src + "attn.Wqkv.bias", zeros(3 * D))
            for j, n in enumerate(("query", "key", "value")):
                out[f"{at}self.{n}.weight"], out[f"{at}self.{n}.bias"] = qkv[j * D:(j + 1) * D], b[j * D:(j + 1) * D]
        for name, part in (("attn.Wo", at + "output.dense"), ("mlp.Wi", dst + "intermediate.dense"),
                           ("mlp.Wo", dst + "output.dense")):
            if src + name + ".weight" in s:
                w = s[src + name + ".weight"]
                out[part + ".weight"], out[part + ".bias"] = w, s.get(src + name + ".bias", zeros(w.shape[0]))
        norm(src + "mlp_norm", at + "output.LayerNorm", out)
        norm(f"layers.{i + 1}.attn_norm" if i + 1 < layers else "final_norm", dst + "output.LayerNorm", out)
    if "head.dense.weight" in s:  # the classification head: dense, GELU, LayerNorm (then the classifier)
        w = s["head.dense.weight"]
        out["pooler.dense.weight"], out["pooler.dense.bias"] = w, s.get("head.dense.bias", zeros(len(w)))
        norm("head.norm", "head.norm", out)
    for k in ("classifier.weight", "classifier.bias"):
        if k in s:
            out[k] = s[k]
    return out


def rope_table(theta: float, head_dim: int, positions: int) -> np.ndarray:
    """(positions, head_dim) float32: cos then sin of position p times HF's inverse frequencies, the half-dimension
    pairs (i, i + hd / 2) rotated by angle i (as HF computes them: fp32 products, cos / sin of those)."""
    inv = (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))).astype(np.float32)
    freqs = np.arange(positions, dtype=np.float32)[:, None] * inv[None, :]          # (P, hd / 2)
    return np.ascontiguousarray(np.concatenate([np.cos(freqs), np.sin(freqs)], 1), np.float32)


def window_table(window: int, heads: int, max_positions: int, pad: int = 16) -> tuple[np.ndarray, int]:
    """A sliding-window layer's mask as bert_forward.c's relative bias (relative_bias_table's layout): (heads, span)
    whose entry mid + q - k is 0 where |q - k| <= window, else WINDOW_BIAS; returns (table, mid)."""
    mid = max_positions - 1 + pad
    qk = np.arange(-mid, mid + 1)
    row = np.where(np.abs(qk) <= window, 0.0, WINDOW_BIAS).astype(np.float32)
    return np.ascontiguousarray(np.broadcast_to(row, (heads, len(row)))), mid


def check_native(enc, precision: str) -> None:
    """What millis.encoder.native.NativeBert does not run of a ModernBERT: int8-row (its residual rows for each
    sequence's ends are fitted to BERT's [CLS] / [SEP] activations), and q / k biases (the kernels rotate q and k
    before the attention adds its biases; ModernBERT's attention_bias is false)."""
    if precision == "int8-row":
        raise MillisError("native int8-row does not run ModernBERT (its end rows are BERT's); int7-row and the "
                          "other precisions do")
    D = enc.cfg.hidden
    if any(np.any(np.asarray(lw.bqkv)[:2 * D] != 0) for lw in enc.layers):
        raise MillisError("a ModernBERT with attention_bias (q / k biases) does not run on the native kernels; "
                          "serve it with ONNX Runtime")


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis, returned in float32 (ModernBERT's classifier head on (B, D) rows; DeBERTa's
    relative embeddings, in float64 first)."""
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return ((x - mean) / np.sqrt(var + eps) * w + b).astype(np.float32)
