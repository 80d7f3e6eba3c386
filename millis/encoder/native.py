"""A BERT-family encoder on millis's own C kernels (`kernels/bert_forward.c`): the whole forward pass
in one C call over the real tokens of a batch (padding is dropped, not computed), weights prepacked
once at load, the thread pool of the decoder (no barriers, sleeps when idle).

Precisions (PRECISIONS): `fp32`; `bf16`: bf16 weights against activations rounded to bf16 per row, fp32
accumulation (AVX-512 BF16's `vdpbf16ps`: twice fp32's multiply-adds per instruction; AMX's bf16 tiles
where the CPU and kernel allow them, kernels/amx.c; int8 / int7 can run 16 tokens or more on AMX's int8 tiles,
off while they measure slower: kernels.native.Q8_TILES); `int8`: Q8_0 weights (int8, one fp16 scale per 32)
against int8 activations quantized per 32 values (llama.cpp's Q8_1 scheme: integer sums never saturate); `int8-a16`:
the same weights against int16 activations per 32 (closer to fp32, a little slower); `int7`: weights in
[-63, 63] per 32 (Q7_0) against the same int8 activations: on AVX2 `vpmaddubsw` takes them made
unsigned (q + 128) against the signed weights read from memory (pairs stay under 2^15), a quarter fewer
instructions than Q8_0's sign fix-ups, for half a bit of weight precision; `int7-a7`: Q7_0 weights
against activations in [-63, 63] per 32: a pair stays under 2^14, so AVX2 adds two steps in int16 before
widening them (a quarter fewer multiplier-port instructions again), for half a bit of activation
precision; `int7-row`: int7-a7's values with one scale per weight row and one per token (per channel and
per token, as ORT's dynamic int8 and the GPU's W8A8): a row's integer sums run over all of K and the float
step comes once per row and token, not per 32 values (Zen 3: 1.2x the AVX2 tile's speed in L1; 0.85-1.10x
int7-a7's forward time, docs/encoders.md), for what one scale per token loses on activation outliers
(unsmoothed: MiniLM's cosine min to fp32 0.96-0.99 by text set; random-weight BERT shapes 0.999);
`int7-row-a8`: int7-row's weights against 8-bit activations per token (on AVX-512 VNNI as fast as int7-row;
AVX2 takes a madd per step); `int8-row`: weights in [-127, 127] with one scale per row against 8-bit
activations per token, and each sequence's first and last token ([CLS], [SEP]: the massive activations) given
a residual activation row that every matrix takes in the same pass (kernels/ends_rows.h): short texts keep
int8's fidelity at int7-row-a8's speed from 128 tokens (docs/encoders.md). The row precisions smooth each
matrix's input (millis.encoder.smooth: x / s against W * s, s from a data-free calibration at load): activation
outliers move into the per-row weight scales. The task head (pooling, normalisation, the pooler + classifier)
runs in fp32 numpy on the (B, D) rows, as millis.encoder.tasks does in torch.
"""
from __future__ import annotations

import ctypes
import threading

import numpy as np

from millis.common.errors import MillisError
from millis.encoder import deberta, modernbert
from millis.encoder.bert_weights import check_shapes, head_activation, relative_bias_table
from millis.encoder.weight_formats import f32, q7_0, to_bf16
from millis.encoder.smooth import GEMMS, alpha_for, input_amax, smoothing_scales
from millis.encoder.source import Pooling, pools_tokens
from millis.encoder.splade import splade_head
from millis.kernels.native import (TYPE_BF16_AMX, TYPE_BF16_PAIRS, TYPE_F32, TYPE_Q7_0, TYPE_Q7_A7, TYPE_Q7_ROW,
                                   TYPE_Q7_ROW8, TYPE_Q8_0, TYPE_Q8_ROW, TYPE_Q8_0_X16, XBLOCK_BYTES, Mat, add_amx_tiles,
                                   aligned_empty, contiguous_masks, init_amx, offsets, pack_matrix)

PRECISIONS = ("fp32", "bf16", "int8", "int8-a16", "int7", "int7-a7", "int7-row", "int7-row-a8", "int8-row")
Q7_TYPES = {"int7": TYPE_Q7_0, "int7-a7": TYPE_Q7_A7, "int7-row": TYPE_Q7_ROW, "int7-row-a8": TYPE_Q7_ROW8, "int8-row": TYPE_Q8_ROW}
ROW_PRECISIONS = ("int7-row", "int7-row-a8", "int8-row")  # one scale per weight row and per token; smoothed inputs
# bf16 in AMX tiles; the int8 ones with int8 tiles beside (row tiles: whole-row sums; Q8 tiles: per block)
AMX_PRECISIONS = ("bf16", "int8", *Q7_TYPES)
SOURCES = ("blockq.c", "packed.c", "repack.c", "packed16.c", "packedbf16.c", "amx.c", "bert_forward.c", "bert_batch.c", "pool.c")
# bert_forward.c ACT_*: what the matrices take; the activation bytes per 32 values (xblock, x16block, bf16 values)
ACT = {"fp32": 0, "bf16": 3, "int8": 1, "int8-a16": 2, **{p: 1 for p in Q7_TYPES}}
BLOCK_BYTES = {"fp32": 0, "bf16": 64, "int8": XBLOCK_BYTES, "int8-a16": 68, **{p: XBLOCK_BYTES for p in Q7_TYPES}}
P, I32, I64, F = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float


class Layer(ctypes.Structure):
    _fields_ = [(n, Mat) for n in ("qkv", "o", "inter", "down")] + \
               [(n, P) for n in ("bqkv", "bo", "bi", "bd", "ln1_w", "ln1_b", "ln2_w", "ln2_b")] + \
               [(n, P) for n in ("sqkv", "so", "si", "sd")] + \
               [(n, P) for n in ("rope", "win", "pk", "pq")]  # 1 / smoothing scales; ModernBERT's; DeBERTa's


ATTN_F32, ATTN_BF16_TILES, ATTN_INT8 = 0, 1, 2  # bert_forward.c's attention kinds
# "auto": bf16_attention's rule; "int8": i8_attend.h (the avx512 and avx2 builds, the same bits; head sizes 32 and 64)
ATTENTIONS = ("auto", "int8")


class Model(ctypes.Structure):
    _fields_ = [(n, I32) for n in ("n_layers", "dim", "n_heads", "head_dim", "hidden", "max_pos", "type_vocab",
                                   "act")] + [("eps", F), ("attn", I32)] + \
               [(n, P) for n in ("word", "pos", "typ", "emb_ln_w", "emb_ln_b")] + \
               [("vocab", I64), ("layers", P), ("ends", I32)] + \
               [("rel", P), ("rel_span", I32), ("rel_mid", I32)] + \
               [("emb_dim", I32), ("proj_t", P), ("proj_b", P)] + \
               [("prenorm", I32), ("window", I32), ("dis", I32), ("dis_rows", I32), ("dis_at", P), ("qk_scale", F)]


class Scratch(ctypes.Structure):
    names = ("x", "qkv", "att", "h", "xq", "qkv2", "kv", "xr", "yr", "hg")  # bert_forward.c's bert_scratch
    _fields_ = [(n, P) for n in names]


def library():
    """The encoder kernels for this CPU's ISA (built on first use), or None when native kernels are off."""
    from millis.kernels.native import build, native_isa

    isa = native_isa()
    if isa is None:
        return None
    lib = build("bert_forward", SOURCES, isa)
    lib.bert_forward.restype, lib.bert_pool.restype, lib.bert_encode.restype = ctypes.c_int, None, ctypes.c_int
    lib.bert_forward.argtypes = [P, P, I64, P, P, P, I64, P, ctypes.c_int, ctypes.c_int]
    lib.bert_pool.argtypes = [P, ctypes.c_int, I64, P, ctypes.c_int, ctypes.c_int, P]
    lib.bert_encode.argtypes = [P, P, P, ctypes.c_int, I64, I64, I64, I64, P, P, P] + [ctypes.c_int] * 3 + [P]
    return lib


def on_tiles(precision: str) -> bool:
    """Whether this precision's matmuls run on AMX's tile unit where it is usable: bf16 and the row-scaled ones
    (int7-row, int7-row-a8: whole-row int32 sums); the per-block int8 ones only while their Q8 tiles are on
    (kernels.native.Q8_TILES)."""
    from millis.kernels import native

    return precision in ("bf16", *ROW_PRECISIONS) or (precision in AMX_PRECISIONS and native.Q8_TILES)


def vector_attention(lib: ctypes.CDLL) -> bool:
    """Whether amx.c's bf16 attention runs on AVX-512 BF16 vectors off the tile unit (the avx512 build)."""
    lib.attend_vectors.restype, lib.attend_vectors.argtypes = ctypes.c_int, [ctypes.c_int]
    return bool(lib.attend_vectors(-1))


def bf16_attention(lib: ctypes.CDLL, precision: str, amx: bool, cfg) -> bool:
    """The rule for bert_forward.c's attention (ATTN_*): in bf16 (amx.c's amx_attend) for head sizes of whole
    tiles (32, 64) where the CPU multiplies bf16 itself, on the tile unit with the matrices (`amx`) or on
    AVX-512 BF16 vectors, for the precisions already below fp32 (AMX_PRECISIONS; not fp32, nor int8-a16, kept
    for its fidelity). Their cosine to fp32 stays as it was with fp32 attention (BERT-base int7-row-a8 0.99940
    either way, Sapphire Rapids); on Zen 4 it doubles the attention's products per instruction."""
    lib.amx_attend_takes.restype, lib.amx_attend_takes.argtypes = ctypes.c_int, [ctypes.c_int]
    if not lib.amx_attend_takes(cfg.hidden // cfg.heads):
        return False
    return precision in AMX_PRECISIONS and (amx or vector_attention(lib))  # (on tiles implies AMX_PRECISIONS)


class NativeBert:
    """`encoder`: millis.encoder.bert_weights.BertArrays (numpy: an artifact's load), or a millis.gpu.Encoder
    loaded in fp32 on the CPU (its weights, task and pooling; needed to calibrate the row precisions here)."""

    def __init__(self, encoder, precision: str = "fp32", threads: int = 1, amax: list | None = None,
                 attention: str = "auto"):
        """amax: the row precisions' calibration (millis.encoder.smooth.input_amax of these weights), stored
        with a variant; None runs it here. attention: ATTENTIONS."""
        from millis.kernels.native import native_isa

        if precision not in PRECISIONS:
            raise MillisError(f"unknown native precision {precision!r}; supported: {', '.join(PRECISIONS)}")
        lib = library()
        if lib is None:
            raise MillisError("millis's native kernels are off (MILLIS_NO_KERNELS) or not available on this CPU")
        self.lib, self.isa, self.precision, self.threads = lib, native_isa(), precision, max(1, threads)
        self.amx = init_amx(lib) and on_tiles(precision)  # matmuls on tiles; asked every load: it picks attention too
        self.kernels = f"{self.isa}+amx" if self.amx else self.isa  # what runs the matmuls (recorded by benches)
        if attention not in ATTENTIONS:
            raise MillisError(f"unknown native attention {attention!r}; supported: {', '.join(ATTENTIONS)}")
        if attention == "int8":
            lib.kv8_takes.restype, lib.kv8_takes.argtypes = ctypes.c_int, [ctypes.c_int]
            if not lib.kv8_takes(encoder.cfg.hidden // encoder.cfg.heads):
                raise MillisError(f"the int8 attention needs a SIMD build (avx512 or avx2) and a head size of 32 "
                                  f"or 64; this runs the {self.isa} build, head size "
                                  f"{encoder.cfg.hidden // encoder.cfg.heads}")
            self.attn = ATTN_INT8
        else:
            self.attn = ATTN_BF16_TILES if bf16_attention(lib, precision, self.amx, encoder.cfg) and \
                not encoder.cfg.distance_bias else ATTN_F32  # (the bf16 forms add no bias)
        self.attention = attention
        e, c = encoder, encoder.cfg
        if c.hidden % c.heads or (c.hidden // c.heads) % 8 or c.hidden % 32 or c.intermediate % 32:
            raise MillisError(f"the native encoder needs widths that are multiples of 32 and a head size that is a "
                              f"multiple of 8 (hidden {c.hidden}, heads {c.heads}, intermediate {c.intermediate})")
        check_shapes(e)  # the C reads every array to the config's sizes
        if c.prenorm:
            modernbert.check_native(e, precision)
        self.cfg, self.task, self.pooling = c, e.task, e.pooling
        self.keep: list = []  # every array the C structs point into
        layers = (Layer * c.layers)()
        if precision not in ROW_PRECISIONS:
            amax = None
        elif amax is None:
            if isinstance(e.word, np.ndarray):
                raise MillisError(f"{precision} needs its smoothing calibration: stored with the variant, or "
                                  f"run here on a millis.gpu.Encoder (torch) of these weights")
            amax = input_amax(e)  # (the weights' own calibration)
        elif len(amax) != c.layers or any(a[g].shape != (k,) for a in amax
                                           for g, k in zip(GEMMS, (c.hidden, c.hidden, c.hidden, c.intermediate))):
            raise MillisError("the stored smoothing calibration does not fit this model's shapes")
        for i, lw in enumerate(e.layers):
            L = layers[i]
            for name, w, s in zip(("qkv", "o", "inter", "down"), (lw.wqkv, lw.wo, lw.w1, lw.w2),
                                  ("sqkv", "so", "si", "sd")):
                w = f32(w)
                if amax is not None:  # W * s, against x / s
                    scale = smoothing_scales(amax[i][name], w, alpha_for(precision))
                    w = w * scale
                    setattr(L, s, self._array(1.0 / scale))
                setattr(L, name, self._matrix(w))
            for name, t in zip(("bqkv", "bo", "bi", "bd", "ln1_w", "ln1_b", "ln2_w", "ln2_b"),
                               (lw.bqkv, lw.bo, lw.b1, lw.b2, lw.ln1w, lw.ln1b, lw.ln2w, lw.ln2b)):
                setattr(L, name, self._vec(t))
        self.keep.append(layers)
        self.model = Model(c.layers, c.hidden, c.heads, c.hidden // c.heads, c.intermediate, c.max_positions,
                           c.type_vocab, ACT[precision], c.eps, self.attn, self._vec(e.word),
                           None if e.pos is None else self._vec(e.pos), self._vec(e.typ), self._vec(e.emb_lnw),
                           self._vec(e.emb_lnb), c.vocab, ctypes.addressof(layers), int(precision == "int8-row"))
        self.model.emb_dim = c.embedding_width
        if c.embedding:  # (E, D): the C adds row i of P times e_i
            self.model.proj_t, self.model.proj_b = self._array(f32(e.emb_pw).T), self._vec(e.emb_pb)
        if c.rel_buckets:
            table, self.model.rel_mid = relative_bias_table(f32(e.rel), c.max_positions)
            self.model.rel, self.model.rel_span = self._vec(table), table.shape[1]
        if c.prenorm:  # rotary tables by layer, the sliding-window layers' mask (the relative bias's layout)
            rope = {t: self._array(modernbert.rope_table(t, c.hidden // c.heads, c.max_positions))
                    for t in {c.rope_theta, c.rope_local_theta}}
            win, self.model.rel_mid = modernbert.window_table(c.window, c.heads, c.max_positions)
            self.model.rel_span, self.model.prenorm, self.model.window = win.shape[1], 1, c.window
            win = self._array(win)
            for i in range(c.layers):
                slides = i in c.local_layers
                layers[i].rope = rope[c.rope_local_theta if slides else c.rope_theta]
                layers[i].win = win if slides else None
        if c.disentangled:  # DeBERTa: each layer's position tables a head, the bucket rows, the scale
            deberta.attach_native(self, e, layers)
        self.head = None
        if self.task == "classify":  # (B, D) fp32 work: pooler act(W h_cls + b) (tanh, ReLU), then the classifier
            self.head = tuple(f32(t) for t in (e.pool_w, e.pool_b, e.cls_w, e.cls_b))
            self.head_norm = (f32(e.head_lnw), f32(e.head_lnb)) if c.prenorm else None  # ModernBERT's, after its GELU
        self.out_dim, self.splade = e.out_dim, splade_head(e, lib, precision, self.threads)  # SPLADE's head or None
        self.buffers, self.capacity, self.slot_capacity = {}, 0, 0  # name -> array; tokens, int8-row slots they fit
        self.lock = threading.Lock()  # one forward at a time: the scratch is shared

    def _vec(self, t) -> int:
        return self._array(f32(t))

    def _array(self, a: np.ndarray) -> int:
        a = np.ascontiguousarray(a, np.float32)
        self.keep.append(a)
        return a.ctypes.data

    def _matrix(self, w: np.ndarray):
        """A (rows, cols) fp32 array -> a packed Mat of this precision (Q8_0 bytes for the int8 ones)."""
        w = np.ascontiguousarray(w, np.float32)
        rows, cols = w.shape
        if self.precision == "fp32":
            data, type_id = w, TYPE_F32
        elif self.precision == "bf16":
            data, type_id = to_bf16(w), TYPE_BF16_AMX if self.amx else TYPE_BF16_PAIRS
        elif self.precision in Q7_TYPES:
            type_id = Q7_TYPES[self.precision]
            data = q7_0(w, per_row=self.precision in ROW_PRECISIONS, levels=127 if self.precision == "int8-row" else 63)
        else:
            from gguf import GGMLQuantizationType
            from gguf.quants import quantize

            data = quantize(w, GGMLQuantizationType.Q8_0)
            type_id = TYPE_Q8_0_X16 if self.precision == "int8-a16" else TYPE_Q8_0
        m = Mat(type_id, 0, data.ctypes.data, rows, cols, data.nbytes // rows)
        self.keep.append(data)
        packed = pack_matrix(self.lib, m, self.keep, self.threads)
        return add_amx_tiles(self.lib, m, packed, self.keep, self.threads) if self.amx else packed

    def _scratch(self, n: int, seqs: int) -> Scratch:  # n tokens in `seqs` sequences
        c = self.cfg
        f32, new = np.float32, aligned_empty
        if n > self.capacity:  # grow to the next power of two tokens: few reallocations under mixed shapes
            cap = 1 << max(6, (n - 1).bit_length())
            blocks = cap * (max(c.hidden, c.intermediate) // 32) * max(1, BLOCK_BYTES[self.precision])
            # cache-line aligned: the kernels' 64-byte vectors on rows then never straddle two lines (Zen 4,
            # alternated in one process against starts 16-48 bytes off, ad hoc: bge-small b1xs128 0.97-0.98x the
            # time, b8xs128 0.95x, BERT-base 0.98-1.0x; the avx2 build's bge-small 0.93x)
            self.buffers.update({"x": new((cap, c.hidden), f32), "qkv": new((cap, 3 * c.hidden), f32),
                                 "att": new((cap, c.hidden), f32), "h": new((cap, c.intermediate), f32),
                                 "xq": new((blocks,), np.uint8), "qkv2": new((cap, 3 * c.hidden), f32),
                                 "kv": new((2 * self._kv_half(cap),), np.uint8),
                                 "hg": new((cap, 2 * c.intermediate) if c.prenorm else (1,), f32)})
            self.capacity = cap
        slots = min(n, 2 * seqs) if self.precision == "int8-row" else 0  # ends_rows.h: 2 a sequence, <= n
        if slots > self.slot_capacity or "xr" not in self.buffers:  # (none read but int8-row's)
            cap = 1 << max(4, (slots - 1).bit_length()) if slots else 0
            self.buffers.update({"xr": new((max(1, cap * (max(c.hidden, c.intermediate) // 32) * XBLOCK_BYTES),),
                                           np.uint8), "yr": new((max(1, cap), max(3 * c.hidden, c.intermediate)), f32)})
            self.slot_capacity = cap
        return Scratch(*(self.buffers[k].ctypes.data for k in Scratch.names))

    def _kv_half(self, cap: int) -> int:
        """Bytes of one of the token split's two packed key / value buffers for cap tokens, 4D a key row (the
        second buffer starts 4D bytes a row on: bert_forward.c). Each sequence's keys are rounded up to whole pairs
        (bf16: up to 2 cap rows) or quads (int8: up to 4 cap rows, of D key bytes, D value bytes (2D on the avx2
        build: kv8_layout.h) and 3 scales a head <= 4D), and 8 rows spare."""
        return 4 * ((4 if self.attn == ATTN_INT8 else 2) * cap + 8) * self.cfg.hidden

    def _forward(self, ids: np.ndarray, pos: np.ndarray, types: np.ndarray, start: np.ndarray,
                 first_only: bool = False) -> np.ndarray:
        """bert_forward on flat tokens; the last hidden states (n, D) as a view of the scratch (hold the lock).
        first_only: only each sequence's first row is the last layer's (bert_forward.c: a [CLS] head reads no
        other), the others are the layer before's."""
        c, n = self.cfg, len(ids)
        start = offsets(start, n, exact=True)
        for a, top in ((ids, c.vocab), (pos, c.max_positions), (types, c.type_vocab)):
            a = np.asarray(a)  # in range before the int32 cast below, which would wrap a large id into range
            if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer):
                raise MillisError(f"ids, positions and token types must be 1-D integer arrays of one length, "
                                  f"got {np.shape(ids)}, {np.shape(pos)}, {np.shape(types)}")
            if n and (a.min() < 0 or a.max() >= top):
                raise MillisError(f"a token id, position or token type is out of range for this model "
                                  f"(vocabulary {c.vocab}, {c.max_positions} positions, {c.type_vocab} token types)")
        ids, pos, types = (np.ascontiguousarray(a, np.int32) for a in (ids, pos, types))
        s = self._scratch(max(n, 1), max(len(start) - 1, 1))
        rc = self.lib.bert_forward(ctypes.addressof(self.model), ctypes.addressof(s), n, ids.ctypes.data,
                                   pos.ctypes.data, types.ctypes.data, len(start) - 1, start.ctypes.data,
                                   self.threads, int(first_only))
        if rc:
            raise MillisError(f"a token id, position or token type is out of range for this model, or a sequence "
                              f"is longer than its positions (vocabulary {self.cfg.vocab}, {self.cfg.max_positions} "
                              f"positions, {self.cfg.type_vocab} token types)")
        return self.buffers["x"][:n]

    def hidden_states(self, ids: np.ndarray, pos: np.ndarray, types: np.ndarray, start: np.ndarray) -> np.ndarray:
        """Flat tokens (n,) int32 with sequence offsets start (S + 1,) -> last hidden states (n, D), a copy."""
        with self.lock:
            return self._forward(ids, pos, types, start).copy()

    def inputs(self, input_ids, attention_mask, token_type_ids=None) -> tuple:
        """(B, T) arrays as HF takes them -> contiguous int64 (ids, mask, types or None), or a MillisError."""
        m = np.asarray(attention_mask)  # the mask 0 / 1 only: 0.5 was "no token" (a zero vector), 2 and -1 "a token"
        whole = all(np.issubdtype(np.asarray(a).dtype, np.integer) for a in (input_ids, token_type_ids) if a is not None) \
            and (np.issubdtype(m.dtype, np.integer) or m.dtype == bool) and (not m.size or 0 <= m.min() <= m.max() <= 1)
        ids = np.ascontiguousarray(input_ids, np.int64)  # (a float id would be floored: 7.9 -> 7; refused below)
        mask = np.ascontiguousarray(attention_mask, np.int64)
        types = None if token_type_ids is None else np.ascontiguousarray(token_type_ids, np.int64)
        if not whole or ids.ndim != 2 or mask.shape != ids.shape or (types is not None and types.shape != ids.shape):
            raise MillisError(f"input_ids, attention_mask and token_type_ids must be (batch, seq) arrays of one shape, "
                              f"ids integers, the mask 0 / 1: got {ids.shape}, {mask.shape}, "
                              f"{None if types is None else types.shape}")
        if (self.cfg.rel_buckets or self.cfg.local_layers or self.cfg.disentangled) and not contiguous_masks(mask):
            raise MillisError("attention_mask: a row's tokens must be one run (no zeros between ones) for a model with "
                              "relative positions or a sliding window (MPNet, ModernBERT, DeBERTa)")
        if ids.shape[1] > self.cfg.max_positions:
            raise MillisError(f"sequence length {ids.shape[1]} exceeds the model's {self.cfg.max_positions} positions")
        return ids, mask, types

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                 token_type_ids: np.ndarray | None = None) -> np.ndarray:
        """(B, T) int arrays, as HF takes them -> (B, N) float32: logits (classify) or the sentence vector. One C
        call (bert_batch.c's bert_encode: the kept tokens, the forward and the pooling; a [CLS] head's last layer
        at the first tokens alone), then the (B, D) head in numpy where there is one: head_of's steps."""
        ids, mask, types = self.inputs(input_ids, attention_mask, token_type_ids)
        if self.splade:  # the masked-LM head on every kept token's state (millis.encoder.splade)
            return self.splade.vectors(self, ids, mask, types)
        B, T = ids.shape
        p: Pooling = self.pooling
        tokens, head = self.pools_tokens(), self.task == "classify"  # (a head on the mean: ModernBERT's classifiers)
        mode = (1 if p.mode == "max" and not head else 0) if tokens else 2
        out = np.empty((B, self.cfg.hidden), np.float32)
        with self.lock:  # the scratch is shared
            s = self._scratch(max(int(np.count_nonzero(mask)), 1), max(B, 1))  # the kept tokens (bert_encode's n)
            rc = self.lib.bert_encode(ctypes.addressof(self.model), ctypes.addressof(s), self.buffers["x"].ctypes.data,
                                      self.cfg.hidden, self.cfg.vocab, self.cfg.type_vocab, B, T, ids.ctypes.data,
                                      mask.ctypes.data, None if types is None else types.ctypes.data, self.threads, mode,
                                      int(tokens and p.normalize and not head), out.ctypes.data)
        if rc:
            c = self.cfg
            raise MillisError(f"a token id or token type is out of range for this model (vocabulary {c.vocab}, "
                              f"{c.type_vocab} token types)")
        return out if tokens and not head else self.first_rows_head(out)

    def pools_tokens(self) -> bool:
        """Whether head_of reads every token's row (mean / max pooling), not each sequence's first alone."""
        return pools_tokens(self.task, self.pooling) or (self.task == "classify" and self.cfg.head_pooling == "mean")

    def head_of(self, h: np.ndarray, start: np.ndarray, lengths: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Last hidden states of the kept tokens (n, D) -> (B, N), as millis.encoder.tasks.pool / HF's head:
        mean / max pooling (and the normalisation) in C (bert_pool), the rest on the (B, D) rows in numpy."""
        h = np.ascontiguousarray(h, np.float32)  # bert_pool reads D-float rows from its start
        if h.ndim != 2 or np.shape(start) != (len(lengths) + 1,):
            raise MillisError(f"head_of takes hidden states (n, D) and offsets (B + 1,) for B lengths, got "
                              f"{h.shape}, {np.shape(start)}, {np.shape(lengths)}")
        start = offsets(start, len(h))
        if self.splade:  # the masked-LM head on every kept token's state
            return self.splade.pool(h, start)
        B, D, p = len(lengths), h.shape[1], self.pooling
        if self.pools_tokens():
            out = np.empty((B, D), np.float32)
            head = self.task == "classify"  # the mean of the rows, then the head
            self.lib.bert_pool(h.ctypes.data, D, B, start.ctypes.data, int(p.mode == "max" and not head),
                               int(p.normalize and not head), out.ctypes.data)
            return self.first_rows_head(out) if head else out
        nz = lengths > 0
        first = np.zeros((B, D), np.float32)  # each sequence's column-0 token ([CLS]); zeros if masked out
        firsts = start[:-1][nz]
        cls = np.zeros(B, bool)
        cls[nz] = cols[firsts] == 0
        first[cls] = h[start[:-1][cls]]
        return self.first_rows_head(first)

    def first_rows_head(self, first: np.ndarray) -> np.ndarray:
        """Each sequence's [CLS] row (B, D) -> the classifier's logits, or the (normalized) CLS vector."""
        p: Pooling = self.pooling
        if self.task == "classify":
            pw, pb, cw, cb = self.head
            pooled = head_activation(first @ pw.T + pb, self.cfg.head_act)
            if self.head_norm is not None:
                pooled = modernbert.layer_norm(pooled, *self.head_norm, self.cfg.eps)
            return (pooled @ cw.T + cb).astype(np.float32)
        out = first
        if p.normalize:
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out.astype(np.float32)
