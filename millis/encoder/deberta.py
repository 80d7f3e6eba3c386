"""DeBERTa-v2 / v3 on the compact encoder (millis.encoder.bert_weights' roles): BERT's post-LayerNorm layers, with
no absolute positions (v3: position_biased_input false) and a disentangled attention. Head h's score of query i for
key j (HF's DisentangledSelfAttention, share_att_key):

    s_ij = (q_i . k_j  +  q_i . Kr[c]  +  k_j . Qr[c]) / sqrt(hd (1 + terms)),   c = clamp(S + bucket(i - j), 0, 2S - 1)

Kr, Qr: the relative embeddings (LayerNorm'd with norm_rel_ebd) through the layer's own key and query projections,
biases in: weights alone, so made once at load (`position_tables`). The second term is c2p, the third p2c
(pos_att_type names which a model has; terms counts them). S: position_buckets (or max_relative_positions without
buckets); bucket: HF's make_log_bucket_position (exact within S / 2, logarithmic out to max_relative_positions).
The classifier head is ContextPooler's dense + GELU on the first token, then the classifier: BERT's pooler roles.
"""
from __future__ import annotations

import ctypes

import numpy as np

from millis.common.errors import MillisError
from millis.encoder.modernbert import layer_norm
from millis.encoder.source import type_vocab_size
from millis.encoder.weight_formats import f32, q7_0

FAMILY = "deberta-v2"
TERMS = ("c2p", "p2c")  # bert_forward.c's dis bits 1, 2
# the relative embeddings and their LayerNorm (the LayerNorm where norm_rel_ebd has layer_norm)
REL = {"rel_emb": ("encoder.rel_embeddings.weight",)}
REL_NORM = {"rel_lnw": ("encoder.LayerNorm.weight",), "rel_lnb": ("encoder.LayerNorm.bias",)}
# DeBERTa's attention names -> BERT's (the rest are BERT's: attention.output, intermediate, output)
NAMES = {"attention.self.query_proj.": "attention.self.query.", "attention.self.key_proj.": "attention.self.key.",
         "attention.self.value_proj.": "attention.self.value."}


def config_fields(cfg: dict) -> dict:
    """EncoderConfig's fields of a DeBERTa-v2 / v3 config.json; what the compact encoder does not run is refused by
    name (each of these changes the forward: HF would run it, millis would compute another model)."""
    def refuse(what: str) -> MillisError:
        return MillisError(f"millis's compact encoder (CUDA and native CPU) does not run DeBERTa with {what}; serve "
                           f"it with ONNX Runtime or PyTorch")
    hidden = int(cfg["hidden_size"])
    names = cfg.get("pos_att_type") or []  # HF's: a "p2c|c2p" string split (the original v3 configs'), a list as it is
    names = [x.strip() for x in names.lower().split("|")] if isinstance(names, str) else list(names)
    terms, other = tuple(t for t in TERMS if t in names), [p for p in names if p not in TERMS]
    if not cfg.get("relative_attention", False):
        raise refuse("relative_attention false (absolute positions alone)")
    if other:
        raise refuse(f"pos_att_type {other!r} (c2p and p2c only)")
    if not cfg.get("share_att_key", False):
        raise refuse("share_att_key false (separate position projections)")
    if int(cfg.get("conv_kernel_size", 0) or 0) > 0:
        raise refuse(f"conv_kernel_size {cfg['conv_kernel_size']} (DeBERTa-v2-xlarge's convolution layer)")
    if int(cfg.get("embedding_size", hidden) or hidden) != hidden:
        raise refuse(f"embedding_size {cfg['embedding_size']} != hidden_size {hidden} (an embedding projection)")
    if int(cfg.get("attention_head_size", 0) or 0) not in (0, hidden // int(cfg["num_attention_heads"])):
        raise refuse(f"attention_head_size {cfg['attention_head_size']} (not hidden_size / heads)")
    if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("pooler_hidden_act", "gelu") != "gelu":
        raise refuse(f"hidden_act {cfg.get('hidden_act')!r} / pooler_hidden_act {cfg.get('pooler_hidden_act')!r} "
                     f"(gelu only)")
    if int(cfg.get("pooler_hidden_size", hidden) or hidden) != hidden:
        raise refuse(f"pooler_hidden_size {cfg['pooler_hidden_size']} != hidden_size {hidden}")
    norms = [x.strip() for x in str(cfg.get("norm_rel_ebd", "none")).lower().split("|")]
    if [x for x in norms if x not in ("none", "layer_norm")]:
        raise refuse(f"norm_rel_ebd {cfg['norm_rel_ebd']!r} (none or layer_norm)")
    positions = int(cfg.get("max_position_embeddings", 512))
    max_rel = int(cfg.get("max_relative_positions", -1))
    max_rel = positions if max_rel < 1 else max_rel
    buckets = int(cfg.get("position_buckets", -1))
    return dict(hidden=hidden, layers=int(cfg["num_hidden_layers"]), heads=int(cfg["num_attention_heads"]),
                intermediate=int(cfg["intermediate_size"]), vocab=int(cfg["vocab_size"]), max_positions=positions,
                type_vocab=max(1, type_vocab_size(FAMILY, cfg)), eps=float(cfg.get("layer_norm_eps", 1e-7)),
                family=FAMILY, absolute=bool(cfg.get("position_biased_input", True)), dis_terms=terms,
                dis_buckets=max(0, buckets), dis_max_rel=max_rel, rel_norm="layer_norm" in norms)


def span(cfg) -> int:
    """S: half the relative embeddings' rows (HF's pos_ebd_size)."""
    return cfg.dis_buckets or cfg.dis_max_rel


def buckets(rel: np.ndarray, cfg) -> np.ndarray:
    """HF's relative positions of i - j (build_relative_position): rel itself, or make_log_bucket_position's buckets,
    in float32 as torch computes them."""
    rel = np.asarray(rel, np.int64)
    if not (cfg.dis_buckets > 0 and cfg.dis_max_rel > 0):
        return rel
    mid = cfg.dis_buckets // 2
    abs_pos = np.where((rel < mid) & (rel > -mid), mid - 1, np.abs(rel))
    log_pos = np.ceil(np.log((abs_pos / np.float32(mid)).astype(np.float32)) /
                      np.log(np.float32((cfg.dis_max_rel - 1) / mid)) * np.float32(mid - 1)) + mid
    return np.where(abs_pos <= mid, rel, log_pos.astype(np.int64) * np.sign(rel))


def table_rows(cfg, max_len: int) -> np.ndarray:
    """(2 max_len - 1,) int32: entry max_len - 1 + (i - j) is the row c of the position tables for query i, key j."""
    S = span(cfg)
    d = np.arange(-(max_len - 1), max_len)
    return np.clip(S + buckets(d, cfg), 0, 2 * S - 1).astype(np.int32)


def relative_embeddings(rel_emb, rel_lnw, rel_lnb, cfg) -> np.ndarray:
    """The (2S, H) rows the layers project: LayerNorm'd where norm_rel_ebd asks (in float64, then float32)."""
    r = f32(rel_emb)[:2 * span(cfg)]
    if cfg.rel_norm:
        r = layer_norm(r.astype(np.float64), f32(rel_lnw).astype(np.float64), f32(rel_lnb).astype(np.float64), cfg.eps)
    return r


def scale(cfg) -> float:
    """The scores' scale: 1 / sqrt(hd (1 + terms))."""
    return 1.0 / float(np.sqrt((cfg.hidden // cfg.heads) * (1 + len(cfg.dis_terms))))


def position_tables(rel: np.ndarray, wqkv: np.ndarray, bqkv: np.ndarray, cfg, pad: int = 8) -> tuple[np.ndarray, ...]:
    """A layer's (pq, pk), each (heads, rows, hd) float32: rel (relative_embeddings) through its query and key
    projections (fp32 weights, biases in) times `scale`, rows padded with zeros to a multiple of `pad`."""
    H, nh = cfg.hidden, cfg.heads
    w, b = f32(wqkv), f32(bqkv)
    out = []
    for o in (0, 1):  # query, key
        t = (rel @ w[o * H:(o + 1) * H].T + b[o * H:(o + 1) * H]) * np.float32(scale(cfg))
        rows = -(-len(t) // pad) * pad
        t = np.concatenate([t, np.zeros((rows - len(t), H), np.float32)]) if rows > len(t) else t
        out.append(np.ascontiguousarray(t.reshape(rows, nh, H // nh).transpose(1, 0, 2), np.float32))
    return tuple(out)


def attach_native(nb, e, layers) -> None:
    """millis.encoder.native.NativeBert `nb`'s DeBERTa parts, its arrays kept in nb.keep: each layer's position tables
    a head (bert_layer's pk / pq: packed Mats from the fp32 weights, whatever the layers' precision: fp32, or with
    the int8 attention int8 rows with a scale each, multiplied as its scores are), the bucket rows of every distance
    and the scores' scale (bert_w's dis_*)."""
    from millis.kernels.native import TYPE_F32, TYPE_Q8_ROW, Mat, pack_matrix

    c, int8 = e.cfg, nb.attention == "int8"

    def keep(a):
        nb.keep.append(a)
        return a

    def mat(h: np.ndarray):  # one head's (rows, hd) table
        rows, hd = h.shape
        data, kind = (q7_0(h, per_row=True, levels=127), TYPE_Q8_ROW) if int8 else (h, TYPE_F32)
        return pack_matrix(nb.lib, Mat(kind, 0, keep(data).ctypes.data, rows, hd, data.nbytes // rows), nb.keep,
                           nb.threads)

    def heads(t: np.ndarray) -> int:  # (heads, rows, hd) -> the address of `heads` Mats
        return ctypes.addressof(keep((Mat * len(t))(*(mat(np.ascontiguousarray(h)) for h in t))))

    rel = relative_embeddings(e.rel_emb, e.rel_lnw, e.rel_lnb, c)
    for i, lw in enumerate(e.layers):  # rows in whole groups of the packed layout: 8 (fp32), 32 (int8 rows' panels)
        pq, pk = position_tables(rel, lw.wqkv, lw.bqkv, c, pad=32 if int8 else 8)
        layers[i].pq, layers[i].pk = heads(pq), heads(pk)
    m = nb.model
    m.dis, m.dis_rows = sum(1 << i for i, t in enumerate(TERMS) if t in c.dis_terms), pq.shape[1]
    m.dis_at, m.qk_scale = keep(table_rows(c, c.max_positions)).ctypes.data, scale(c)
