"""SPLADE on millis's native kernels: a masked LM's head over the encoder's last hidden states, pooled into one
vector of vocabulary weights per text (sentence-transformers' SparseEncoder: MLMTransformer + SpladePooling; TEI's
--pooling splade; millis.encoder.tasks.splade_pool is the torch form every other runtime exports).

Per kept token t (n, H): the head's transform  u = LN(gelu(W_t h + b_t))  (H x H: a fortieth of the vocabulary
product's work), then the logits  z = W_v u + b_v  (V x H, V the vocabulary: BERT's 30,522 rows, about
a third of BERT-base's layers' multiply-adds at any length) on the packed C matmul, and per text
max_t log(1 + relu(z_t)) = log(1 + relu(max_t z_t)) (both monotone), so only a column max per text is kept of
the (n, V) logits, in chunks of at most CHUNK_TOKENS tokens (a bounded buffer: 512 tokens x 30,522 x 4 B = 62 MB).
The transform runs in fp32 (its bias, GELU and LayerNorm in C: bert_batch.c's gelu_norm_rows); the vocabulary
matrix in fp32 for native-fp32 and native-bf16, and for every integer precision as int8 per row against 8-bit
activations per token (T_Q8_ROW, int8-row's matrices; its input is a LayerNorm's output: no massive activations
for one scale per token to lose).
"""
from __future__ import annotations

import ctypes

import numpy as np

from millis.encoder.bert_weights import MlmArrays
from millis.encoder.weight_formats import q7_0
from millis.common.errors import MillisError
from millis.encoder.source import SPLADE
from millis.kernels.native import TYPE_F32, TYPE_Q8_ROW, XBLOCK_BYTES, Mat, kept_tokens, pack_matrix

CHUNK_TOKENS = 512  # tokens whose (n, V) logits are held at once (whole texts: a longer one alone)


def splade_head(encoder, lib: ctypes.CDLL, precision: str, threads: int) -> "SpladeHead | None":
    """A NativeBert's SPLADE head where its encoder pools SPLADE (BertArrays with the masked-LM head), else None."""
    if encoder.task != "embed" or encoder.pooling.mode != SPLADE:
        return None
    if not isinstance(getattr(encoder, "mlm", None), MlmArrays):  # (a millis.gpu.Encoder holds its head as tensors)
        raise MillisError("SPLADE on the native encoder needs the masked-LM head: load the weights with "
                          "millis.encoder.bert_weights.load_arrays")
    return SpladeHead(encoder.mlm, lib, precision, threads, encoder.pooling.normalize)


class SpladeHead:
    """The head of an MlmArrays on a NativeBert's library and threads (see the module's docstring)."""

    def __init__(self, mlm: MlmArrays, lib: ctypes.CDLL, precision: str, threads: int, normalize: bool = False):
        """normalize: the vectors made unit length (a Normalize module after the SpladePooling one)."""
        self.mlm, self.lib, self.threads, self.normalize = mlm, lib, threads, normalize
        V, H = mlm.wv.shape
        self.keep: list = []
        if precision in ("fp32", "bf16"):
            data, self.type = mlm.wv, TYPE_F32
        else:
            data, self.type = q7_0(mlm.wv, per_row=True, levels=127), TYPE_Q8_ROW
        self.keep.append(data)
        self.mat = pack_matrix(lib, Mat(self.type, 0, data.ctypes.data, V, H, data.nbytes // V), self.keep, threads)
        # the transform in fp32 on the C matmul too: a row's sums do not depend on its batch-mates (numpy's BLAS
        # picks its kernels by the row count: a text alone and in a batch differed in the last bits). In Q8_0 it
        # took BERT-base int8-row-att8's gate cosine from 0.9900 to 0.9870 (bench/splade.py, Zen 4): SPLADE's max
        # over tokens magnifies the logits' errors near 0; its product is a fortieth of the vocabulary's
        self.tmat = pack_matrix(lib, Mat(TYPE_F32, 0, mlm.tw.ctypes.data, H, H, 4 * H), self.keep, threads)
        P, I64 = ctypes.c_void_p, ctypes.c_int64
        lib.matmul.restype, lib.matmul.argtypes = None, [P, P, P, I64, P, I64, ctypes.c_int, ctypes.c_int]
        lib.quantize_act_rows.restype, lib.quantize_act_rows.argtypes = None, [ctypes.c_int, P, I64, I64, P]
        lib.gelu_norm_rows.restype, lib.gelu_norm_rows.argtypes = None, [P, P, P, P, ctypes.c_float, I64, ctypes.c_int]
        self.vocab, self.hidden = V, H

    def transform(self, h: np.ndarray) -> np.ndarray:
        """(n, H) last hidden states -> (n, H) LN(gelu(W_t h + b_t)), float32."""
        m = self.mlm
        u = self.product(self.tmat, TYPE_F32, np.ascontiguousarray(h, np.float32))
        self.lib.gelu_norm_rows(u.ctypes.data, m.tb.ctypes.data, m.lnw.ctypes.data, m.lnb.ctypes.data, m.eps, len(u),
                                self.hidden)  # + b_t, erf GELU, LayerNorm, in place (bert_batch.c)
        return u

    def logits(self, u: np.ndarray) -> np.ndarray:
        """(n, H) transformed rows -> (n, V) logits less the bias (the C matmul, on this precision's matrix)."""
        return self.product(self.mat, self.type, u)

    def product(self, mat: Mat, type_id: int, x: np.ndarray) -> np.ndarray:
        """x (n, K) contiguous float32 times the packed mat (N, K) of type_id -> (n, N): fp32 as it is, else x quantized
        as the type takes it (one scale per token for the row type)."""
        n, K = x.shape
        y = np.empty((n, mat.rows), np.float32)
        if not n:
            return y
        if type_id == TYPE_F32:
            self.lib.matmul(ctypes.addressof(mat), None, x.ctypes.data, n, y.ctypes.data, mat.rows, 0, self.threads)
            return y
        xq = np.empty(n * (K // 32) * XBLOCK_BYTES, np.uint8)
        self.lib.quantize_act_rows(type_id, x.ctypes.data, n, K, xq.ctypes.data)
        self.lib.matmul(ctypes.addressof(mat), xq.ctypes.data, None, n, y.ctypes.data, mat.rows, 0, self.threads)
        return y

    def vectors(self, model, ids: np.ndarray, mask: np.ndarray, types: np.ndarray | None) -> np.ndarray:
        """A NativeBert's checked (B, T) inputs (NativeBert.inputs) -> (B, V) SPLADE vectors: its forward over the
        kept tokens, then this head."""
        rows, cols, start = kept_tokens(mask)
        h = model.hidden_states(ids[rows, cols], cols, np.zeros_like(cols) if types is None else types[rows, cols],
                                start)
        return self.pool(h, start)

    def pool(self, h: np.ndarray, start: np.ndarray) -> np.ndarray:
        """Kept tokens' hidden states (n, H), text offsets start (B + 1,) -> (B, V) SPLADE vectors (an empty text's:
        zeros)."""
        B = len(start) - 1
        out = np.zeros((B, self.vocab), np.float32)
        b = 0
        while b < B:
            e = b + 1  # texts b..e-1: at most CHUNK_TOKENS tokens, at least one text
            while e < B and start[e + 1] - start[b] <= CHUNK_TOKENS:
                e += 1
            lo, hi = int(start[b]), int(start[e])
            if hi > lo:
                z = self.logits(self.transform(h[lo:hi]))
                for i in range(b, e):  # (max over axis 0 runs SIMD across the rows: 5x np.maximum.reduceat's speed)
                    if start[i + 1] > start[i]:
                        out[i] = z[start[i] - lo:start[i + 1] - lo].max(axis=0)
                out[b:e] = np.log1p(np.maximum(out[b:e] + self.mlm.bv, 0.0)) * (np.diff(start[b:e + 1]) > 0)[:, None]
            b = e
        if self.normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out
