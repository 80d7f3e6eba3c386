"""A BERT checkpoint's architecture and weights by role, without torch: the one map from Hugging Face tensor
names to the compact encoder's parts (millis.gpu.encoder builds torch tensors from it, millis.encoder.native
reads numpy arrays from it), and a numpy loader of a local directory, so that loading a native artifact
imports no torch (its ~0.9 s import was most of the load).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from millis.common.errors import MillisError
from millis.encoder import deberta, modernbert
from millis.encoder.source import NO_TOKEN_TYPE, SPLADE, Pooling, position_offset

ACTS = ("gelu",)  # BERT's erf GELU; tanh variants would need their own epilogue
# model_types of BERT's post-LayerNorm layers (RoBERTa: positions offset, one type; DistilBERT: other names, no types;
# MPNet: other names, no types, positions offset, a relative-position bias in attention); and ModernBERT's
# pre-LayerNorm layers with rotary positions, sliding-window layers and a GLU (millis.encoder.modernbert); DeBERTa-v2 /
# v3's disentangled attention (millis.encoder.deberta)
FAMILIES = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", modernbert.FAMILY, deberta.FAMILY)
RELATIVE_BIAS = frozenset({"mpnet"})  # attention adds a learned bias per relative-position bucket
# the classifier head's activation after its first dense layer (BERT's pooler, RoBERTa's head: tanh; DistilBERT's
# pre_classifier: ReLU; ELECTRA's head, DeBERTa's ContextPooler: erf GELU)
HEAD_ACT = {"distilbert": "relu", "electra": "gelu", modernbert.FAMILY: "gelu", deberta.FAMILY: "gelu"}
TASKS = ("classify", "embed")


@dataclass(frozen=True)
class EncoderConfig:
    """The architecture, read from a BERT config.json."""

    hidden: int              # H
    layers: int
    heads: int               # nh; head size hd = H / nh
    intermediate: int        # FFN width
    vocab: int
    max_positions: int       # absolute position embeddings: T <= max_positions
    type_vocab: int          # token type (segment) embeddings
    eps: float = 1e-12       # LayerNorm epsilon
    pos_offset: int = 0      # position table rows before position 0 (RoBERTa, XLM-R: pad_token_id + 1)
    family: str = "bert"     # config.json's model_type: how bert_names reads its weights
    rel_buckets: int = 0     # MPNet: the relative-position bias table's rows (relative_attention_num_buckets)
    embedding: int = 0       # ELECTRA-small: the embeddings' width E, projected up to H after their LayerNorm (0: H)
    # ModernBERT (millis.encoder.modernbert): rotary positions' base in the global and the sliding-window layers (0:
    # absolute position embeddings), the window (|q - k| <= window), which layers slide, the classifier's pooling
    rope_theta: float = 0.0
    rope_local_theta: float = 0.0
    window: int = 0
    local_layers: tuple[int, ...] = ()
    head_pooling: str = "cls"  # the rows a classifier's head reads: cls (the first), or mean (of the real tokens)
    absolute: bool = True    # an absolute position table (DeBERTa-v3: none)
    # DeBERTa (millis.encoder.deberta): the disentangled attention's terms (c2p, p2c), position_buckets (0: none),
    # max_relative_positions, and whether the relative embeddings are LayerNorm'd
    dis_terms: tuple[str, ...] = ()
    dis_buckets: int = 0
    dis_max_rel: int = 0
    rel_norm: bool = False
    tied_vocab: bool = True  # a masked-LM head's vocabulary matrix is the word embeddings (tie_word_embeddings)

    @property
    def prenorm(self) -> bool:
        """ModernBERT's layout: pre-LayerNorm layers, a GLU feed-forward (Wi (2I, H)), rotary positions."""
        return self.family == modernbert.FAMILY

    @property
    def distance_bias(self) -> bool:
        """Attention adds a bias by the tokens' distance (MPNet's, ModernBERT's window, DeBERTa's positions): the
        native bf16 attention adds none."""
        return bool(self.rel_buckets or self.window or self.disentangled)

    @property
    def disentangled(self) -> bool:
        """DeBERTa's layout: BERT's layers, attention with content-to-position terms (millis.encoder.deberta)."""
        return self.family == deberta.FAMILY

    @property
    def ffn_in(self) -> int:
        """Rows of the feed-forward's first matrix: I, or 2I for a GLU's value and gate."""
        return 2 * self.intermediate if self.prenorm else self.intermediate

    @property
    def embedding_width(self) -> int:
        """The embedding tables' and their LayerNorm's width: E, or H where there is no projection."""
        return self.embedding or self.hidden

    @property
    def head_act(self) -> str:
        """The classifier head's activation (HEAD_ACT)."""
        return HEAD_ACT.get(self.family, "tanh")

    @classmethod
    def from_hf(cls, cfg: dict) -> "EncoderConfig":
        if cfg.get("model_type") not in FAMILIES:
            raise MillisError(f"millis's compact encoder (CUDA and native CPU) supports BERT-family models "
                              f"(BERT, MiniLM, bge, DistilBERT, RoBERTa, XLM-RoBERTa, MPNet, ELECTRA, ModernBERT, "
                              f"DeBERTa-v2 / v3), "
                              f"not {cfg.get('model_type') or '(none)'!r}")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise MillisError(f"position_embedding_type {cfg['position_embedding_type']!r} is not supported "
                              f"(absolute only)")
        if cfg.get("millis_pruned"):  # heads x head size != hidden: not this kernel's layout (yet)
            raise MillisError("millis's compact encoder (CUDA and native CPU) does not run models with pruned "
                              "attention heads; serve them with ONNX Runtime")
        if cfg.get("is_decoder"):  # HF masks such a BERT causally; this encoder attends both ways
            raise MillisError("is_decoder: true (causal attention) is not supported by millis's compact encoder "
                              "(CUDA and native CPU): it attends both ways; serve it with ONNX Runtime")
        family = cfg["model_type"]
        if family == modernbert.FAMILY:
            return cls(**modernbert.config_fields(cfg))
        if family == deberta.FAMILY:
            return cls(**deberta.config_fields(cfg))
        # ELECTRA's embeddings are embedding_size wide (ElectraConfig's default 128), projected to hidden_size where
        # the two differ (HF's embeddings_project: electra-small)
        embedding = int(cfg.get("embedding_size", 128)) if family == "electra" else 0
        if family in NO_TOKEN_TYPE:  # no token types: one row of zeros (bert_names)
            cfg = {**cfg, "type_vocab_size": 1}
        if family == "distilbert":  # DistilBertConfig's names
            cfg = {**cfg, "hidden_size": cfg["dim"], "num_hidden_layers": cfg["n_layers"],
                   "num_attention_heads": cfg["n_heads"], "intermediate_size": cfg["hidden_dim"],
                   "hidden_act": cfg.get("activation", "gelu")}
        if cfg.get("hidden_act", "gelu") not in ACTS:
            raise MillisError(f"hidden_act {cfg['hidden_act']!r} is not supported; supported: {', '.join(ACTS)}")
        # RoBERTa's positions count from padding_idx + 1 (HF: create_position_ids_from_input_ids)
        offset = position_offset(family, cfg)
        return cls(hidden=int(cfg["hidden_size"]), layers=int(cfg["num_hidden_layers"]),
                   heads=int(cfg["num_attention_heads"]), intermediate=int(cfg["intermediate_size"]),
                   vocab=int(cfg["vocab_size"]), max_positions=int(cfg.get("max_position_embeddings", 512)) - offset,
                   type_vocab=int(cfg.get("type_vocab_size", 2)), eps=float(cfg.get("layer_norm_eps", 1e-12)),
                   pos_offset=offset, family=family, tied_vocab=bool(cfg.get("tie_word_embeddings", True)),
                   rel_buckets=int(cfg.get("relative_attention_num_buckets", 32)) if family in RELATIVE_BIAS else 0,
                   embedding=embedding if embedding != int(cfg["hidden_size"]) else 0)


# Each part: the HF tensors stacked (in order, along rows) into it. GEMM weights are (out, in) as HF keeps them.
EMBEDDINGS = {"word": ("embeddings.word_embeddings.weight",), "pos": ("embeddings.position_embeddings.weight",),
              "typ": ("embeddings.token_type_embeddings.weight",), "emb_lnw": ("embeddings.LayerNorm.weight",),
              "emb_lnb": ("embeddings.LayerNorm.bias",)}
GEMM_PARTS = ("wqkv", "wo", "w1", "w2")  # the layer's matrices (the W8A8 / native quantizers' inputs)
# ELECTRA-small: (H, E), (H,) after the embeddings' LayerNorm (EncoderConfig.embedding)
PROJECTION = {"emb_pw": ("embeddings_project.weight",), "emb_pb": ("embeddings_project.bias",)}
HEAD = {"pool_w": ("pooler.dense.weight",), "pool_b": ("pooler.dense.bias",),  # task classify
        "cls_w": ("classifier.weight",), "cls_b": ("classifier.bias",)}


def layer_parts(i: int) -> dict[str, tuple[str, ...]]:
    """Layer i's parts in LayerWeights' field order: q, k, v stacked so one GEMM projects all three."""
    p = f"encoder.layer.{i}."
    at, qkv = p + "attention.", ("query", "key", "value")
    return {"wqkv": tuple(f"{at}self.{n}.weight" for n in qkv), "bqkv": tuple(f"{at}self.{n}.bias" for n in qkv),
            "wo": (at + "output.dense.weight",), "bo": (at + "output.dense.bias",),
            "ln1w": (at + "output.LayerNorm.weight",), "ln1b": (at + "output.LayerNorm.bias",),
            "w1": (p + "intermediate.dense.weight",), "b1": (p + "intermediate.dense.bias",),
            "w2": (p + "output.dense.weight",), "b2": (p + "output.dense.bias",),
            "ln2w": (p + "output.LayerNorm.weight",), "ln2b": (p + "output.LayerNorm.bias",)}


# RobertaClassificationHead is BERT's pooler + classifier under other names: dense, tanh, out_proj on token 0
ROBERTA_HEAD = {"classifier.dense.": "pooler.dense.", "classifier.out_proj.": "classifier."}
# DistilBERT's names -> BERT's (its head: pre_classifier, ReLU, classifier)
DISTILBERT = {"transformer.layer.": "encoder.layer.", "attention.q_lin.": "attention.self.query.",
              "attention.k_lin.": "attention.self.key.", "attention.v_lin.": "attention.self.value.",
              "attention.out_lin.": "attention.output.dense.", "sa_layer_norm.": "attention.output.LayerNorm.",
              "ffn.lin1.": "intermediate.dense.", "ffn.lin2.": "output.dense.",
              "output_layer_norm.": "output.LayerNorm.", "pre_classifier.": "pooler.dense."}
# MPNet's names -> BERT's (its attention's output projection and LayerNorm; the rest are BERT's)
MPNET = {"attention.attn.q.": "attention.self.query.", "attention.attn.k.": "attention.self.key.",
         "attention.attn.v.": "attention.self.value.", "attention.attn.o.": "attention.output.dense.",
         "attention.LayerNorm.": "attention.output.LayerNorm."}
REL_BIAS = "encoder.relative_attention_bias.weight"  # MPNet: (buckets, heads)


def bert_names(state: dict, cfg: EncoderConfig) -> dict:
    """The weights under BERT's names: 'bert.' / 'roberta.' (a *ForSequenceClassification's base) dropped; old
    checkpoints' LayerNorm gamma / beta; RoBERTa's classification head as pooler + classifier; the position table from
    cfg.pos_offset's row on (a view: no copy), so that row t is position t as in BERT."""
    if cfg.prenorm:
        return modernbert.bert_roles(state, cfg.layers)
    out, renames = {}, {"distilbert": DISTILBERT, "mpnet": MPNET, deberta.FAMILY: deberta.NAMES}.get(cfg.family, {})
    for k, v in state.items():
        k = k.removeprefix("bert.").removeprefix("roberta.").removeprefix("distilbert.").removeprefix("mpnet.") \
            .removeprefix("electra.").removeprefix("deberta.") \
            .replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if "classifier.out_proj.weight" in state:  # RoBERTa's head is the pooler: a pooler of its base is not
            if k.startswith("pooler."):
                continue
            k = next((k.replace(a, b, 1) for a, b in ROBERTA_HEAD.items() if k.startswith(a)), k)
        for a, b in renames.items():
            k = k.replace(a, b, 1)
        out[k] = v
    pos, word, typ = EMBEDDINGS["pos"][0], EMBEDDINGS["word"][0], EMBEDDINGS["typ"][0]
    if cfg.pos_offset and pos in out:
        out[pos] = out[pos][cfg.pos_offset:]
    if (cfg.family in NO_TOKEN_TYPE or (typ not in out and cfg.disentangled)) and word in out:
        out[typ] = out[word][:1] * 0  # no token types (DeBERTa-v3: type_vocab_size 0): a row of zeros, every type 0
    return out


def head_activation(x, act: str):
    """The classifier head's activation on its first dense layer's output (numpy or torch: both have the ops)."""
    if act == "relu":
        return x.clip(0)  # (numpy's and torch's alike: the lower bound)
    if act == "gelu":  # x * P(X <= x): erf's form, as HF's GELUActivation
        return gelu_erf(x) if isinstance(x, np.ndarray) else torch_gelu(x)
    return np.tanh(x) if isinstance(x, np.ndarray) else x.tanh()


def gelu_erf(x: np.ndarray) -> np.ndarray:
    """x * (1 + erf(x / sqrt 2)) / 2 in float64 (numpy has no erf: Abramowitz-Stegun 7.1.26, |error| <= 1.5e-7)."""
    z = np.abs(np.asarray(x, np.float64)) / np.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = np.sign(x) * (1.0 - poly * np.exp(-z * z))
    return (0.5 * x * (1.0 + erf)).astype(np.asarray(x).dtype)


def torch_gelu(x):
    import torch.nn.functional as F

    return F.gelu(x)


def relative_bias_table(rel: np.ndarray, max_positions: int, pad: int = 16) -> tuple[np.ndarray, int]:
    """MPNet's relative-position bias as bert_forward.c reads it: (heads, span) float32 whose entry mid + q - k is
    the bias query q adds to its score of key k, for |q - k| < max_positions (and `pad` spare entries each side: a
    lane block reads past its last query); returns (table, mid). The buckets are HF's relative_position_bucket
    (32 buckets, max distance 128, in float32 steps as torch takes them: the same bucket for every distance)."""
    mid = max_positions - 1 + pad
    qk = np.arange(-mid, mid + 1)                  # q - k; HF's relative_position is k - q, and its n is q - k
    buckets, max_exact = 16, 8                     # 32 // 2 per direction
    n = np.abs(qk)
    with np.errstate(divide="ignore"):
        large = max_exact + (np.log((n / max_exact).astype(np.float32)) / np.float32(np.log(128 / max_exact))
                             * np.float32(buckets - max_exact))
    large = np.minimum(np.where(n < max_exact, 0, large).astype(np.int64), buckets - 1)
    bucket = (qk < 0) * buckets + np.where(n < max_exact, n, large)
    return np.ascontiguousarray(np.asarray(rel, np.float32)[bucket].T), mid


def embedding_parts(cfg: EncoderConfig) -> dict[str, tuple[str, ...]]:
    """EMBEDDINGS less the position table where positions are rotary (ModernBERT) or relative alone (DeBERTa-v3)."""
    return {k: v for k, v in EMBEDDINGS.items() if not ((cfg.prenorm or not cfg.absolute) and k == "pos")}


def relative_parts(cfg: EncoderConfig) -> dict[str, tuple[str, ...]]:
    """DeBERTa's relative embeddings (and their LayerNorm); none for the other families."""
    return {**deberta.REL, **(deberta.REL_NORM if cfg.rel_norm else {})} if cfg.disentangled else {}


def head_parts(cfg: EncoderConfig) -> dict[str, tuple[str, ...]]:
    """The classifier head's parts: HEAD, and ModernBERT's LayerNorm after its activation."""
    return {**HEAD, **(modernbert.HEAD_NORM if cfg.prenorm else {})}


def check_parts(state: dict, task: str, cfg: EncoderConfig) -> None:
    """A clear error for a checkpoint that lacks a part the encoder reads (state: under bert_names; MPNet's
    relative-position bias and ELECTRA-small's embedding projection too)."""
    if task not in TASKS:
        raise MillisError(f"unknown task {task!r}; supported tasks: {', '.join(TASKS)}")
    if task == "classify" and ("classifier.weight" not in state or "pooler.dense.weight" not in state):
        raise MillisError("task classify needs a sequence-classification checkpoint (pooler + classifier)")
    parts = [*embedding_parts(cfg).values(), *(n for i in range(cfg.layers) for n in layer_parts(i).values()),
             *(head_parts(cfg).values() if task == "classify" else ()), *([(REL_BIAS,)] if cfg.rel_buckets else []),
             *(PROJECTION.values() if cfg.embedding else ()), *relative_parts(cfg).values()]
    for names in parts:
        for n in names:
            if n not in state:
                raise MillisError(f"the weights have no {n!r}: not a BERT checkpoint")


def check_shapes(enc) -> None:
    """A clear error for weights whose shapes disagree with config.json (enc: BertArrays, or a millis.gpu.Encoder:
    numpy arrays or torch tensors). The native kernels take every table size, width and stride from the config and
    read the arrays unchecked, so a short one was read past its end (a 10-row word table under vocab_size 1000
    crashed on id 10)."""
    c = enc.cfg
    H, I, E = c.hidden, c.intermediate, c.embedding_width
    if len(enc.layers) != c.layers:
        raise MillisError(f"the weights have {len(enc.layers)} layers, config.json's num_hidden_layers {c.layers}")
    want = {"word": (c.vocab, E), "pos": (c.max_positions, E), "typ": (c.type_vocab, E), "emb_lnw": (E,),
            "emb_lnb": (E,)}
    parts = [(names, getattr(enc, k), want[k]) for k, names in embedding_parts(c).items()]
    if c.embedding:
        parts += [(PROJECTION["emb_pw"], enc.emb_pw, (H, E)), (PROJECTION["emb_pb"], enc.emb_pb, (H,))]
    if c.rel_buckets:
        parts.append(((REL_BIAS,), enc.rel, (c.rel_buckets, c.heads)))
    if c.disentangled:
        rel = relative_parts(c)
        parts += [(rel[k], getattr(enc, k), (2 * deberta.span(c), H) if k == "rel_emb" else (H,)) for k in rel]
    sizes = {"wqkv": (3 * H, H), "bqkv": (3 * H,), "wo": (H, H), "w1": (c.ffn_in, H), "b1": (c.ffn_in,), "w2": (H, I)}
    for i, lw in enumerate(enc.layers):
        parts += [(n, getattr(lw, k), sizes.get(k, (H,))) for k, n in layer_parts(i).items()]
    if enc.task == "classify":
        n = enc.cls_w.shape[0]
        heads = head_parts(c)
        parts += [(heads[k], getattr(enc, k), s) for k, s in (("pool_w", (H, H)), ("pool_b", (H,)), ("cls_w", (n, H)),
                                                              ("cls_b", (n,)), ("head_lnw", (H,)), ("head_lnb", (H,)))
                  if k in heads]
    for names, t, s in parts:
        got = tuple(t.shape)
        if got != s and not (names == EMBEDDINGS["pos"] and len(got) == 2 and got[0] >= s[0] and got[1] == E):
            at_least = "at least " if names == EMBEDDINGS["pos"] else ""
            raise MillisError(f"the weights' {' + '.join(names)} is {got}, but config.json needs {at_least}{s}")


# the head's parts by family, under bert_names' names: transform (dense, LayerNorm), the vocabulary matrix (absent
# where it is tied to the word embeddings: save_pretrained leaves it out) and its bias
ROBERTA_MLM = ("lm_head.dense.", "lm_head.layer_norm.", "lm_head.decoder.", "lm_head.bias")
MLM_HEADS = {"bert": ("cls.predictions.transform.dense.", "cls.predictions.transform.LayerNorm.",
                      "cls.predictions.decoder.", "cls.predictions.bias"),
             "distilbert": ("vocab_transform.", "vocab_layer_norm.", "vocab_projector.", "vocab_projector.bias"),
             "roberta": ROBERTA_MLM, "xlm-roberta": ROBERTA_MLM}


class MlmArrays:
    """A masked LM's head (SPLADE's: millis.encoder.splade) as float32 arrays: transform tw (H, H), tb, lnw, lnb;
    vocabulary wv (V, H), bv (V,)."""

    def __init__(self, state: dict, cfg):
        if cfg.family not in MLM_HEADS:
            raise MillisError(f"SPLADE on millis's encoders reads the masked-LM heads of {', '.join(MLM_HEADS)}, not "
                              f"{cfg.family}'s: serve it with ONNX Runtime, OpenVINO or torch")
        dense, norm, dec, bias = MLM_HEADS[cfg.family]
        # as transformers reads them: the word embeddings where tied (a stored copy unread), the decoder's own bias
        # where stored (tied to `bias` only while the embeddings are)
        names = {"tw": dense + "weight", "tb": dense + "bias", "lnw": norm + "weight", "lnb": norm + "bias",
                 "wv": EMBEDDINGS["word"][0] if cfg.tied_vocab else dec + "weight",
                 "bv": dec + "bias" if dec + "bias" in state else bias}
        for k, n in names.items():
            if n not in state:
                raise MillisError(f"the weights have no {n!r}: SPLADE needs the masked-LM head (a *ForMaskedLM "
                                  f"checkpoint)")
            setattr(self, k, np.ascontiguousarray(np.asarray(state[n], np.float32)))
        H, V = cfg.hidden, cfg.vocab
        for k, want in (("tw", (H, H)), ("tb", (H,)), ("lnw", (H,)), ("lnb", (H,)), ("wv", (V, H)), ("bv", (V,))):
            if getattr(self, k).shape != want:
                raise MillisError(f"the weights' {names[k]} is {getattr(self, k).shape}, config.json needs {want}")
        self.eps = cfg.eps


class LayerArrays(NamedTuple):  # millis.gpu.encoder.LayerWeights' fields, as float32 arrays
    wqkv: np.ndarray
    bqkv: np.ndarray
    wo: np.ndarray
    bo: np.ndarray
    ln1w: np.ndarray
    ln1b: np.ndarray
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    ln2w: np.ndarray
    ln2b: np.ndarray


class BertArrays:
    """The parts millis.encoder.native.NativeBert reads from an encoder (cfg, task, pooling, embeddings,
    layers, head, out_dim), as float32 numpy arrays: what millis.gpu.encoder.Encoder holds as tensors."""

    def __init__(self, cfg: EncoderConfig, state: dict[str, np.ndarray], task: str, pooling: Pooling):
        s = bert_names(state, cfg)
        check_parts(s, task, cfg)
        self.cfg, self.task, self.pooling = cfg, task, pooling

        def get(names: tuple[str, ...]) -> np.ndarray:
            parts = [np.asarray(s[n], np.float32) for n in names]
            if len({a.shape[1:] for a in parts}) > 1:  # (check_shapes checks the stack)
                raise MillisError(f"the weights' {' + '.join(names)} do not stack: {[a.shape for a in parts]}")
            return np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts))

        self.pos = None  # (rotary positions: no table)
        for k, names in embedding_parts(cfg).items():
            setattr(self, k, get(names))
        self.layers = [LayerArrays(**{k: get(n) for k, n in layer_parts(i).items()}) for i in range(cfg.layers)]
        self.rel = get((REL_BIAS,)) if cfg.rel_buckets else None
        self.emb_pw, self.emb_pb = (get(PROJECTION[k]) for k in PROJECTION) if cfg.embedding else (None, None)
        self.rel_emb = self.rel_lnw = self.rel_lnb = None
        for k, names in relative_parts(cfg).items():  # DeBERTa's
            setattr(self, k, get(names))
        if task == "classify":
            for k, names in head_parts(cfg).items():
                setattr(self, k, get(names))
        # SPLADE: the masked-LM head its vectors come from (millis.encoder.splade)
        self.mlm = MlmArrays(s, cfg) if task == "embed" and pooling.mode == SPLADE else None
        self.out_dim = self.cls_w.shape[0] if task == "classify" else cfg.vocab if self.mlm else cfg.hidden
        check_shapes(self)


def load_arrays(model_dir: Path, task: str, pooling: Pooling) -> BertArrays:
    """A local HF BERT directory (config.json + model.safetensors) as BertArrays; no torch."""
    from safetensors.numpy import load_file

    cfg_file, weights = model_dir / "config.json", model_dir / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise MillisError(f"{model_dir} needs config.json and model.safetensors (the native variant's weights)")
    return BertArrays(EncoderConfig.from_hf(json.loads(cfg_file.read_text())), load_file(str(weights)), task, pooling)
