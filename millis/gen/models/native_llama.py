"""A Llama-family decoder run by millis's C kernels (`kernels/llama_step.c`): weights stay in their
GGUF block formats, the whole forward pass of a step is one C call, and the KV cache is paged.

`NativeLlama` is called like the torch models, with a `Batch` (rows of T tokens at their positions
in their slots) and returns fp32 logits (B, 1 or T, vocab). Long prompts run in chunks of at most
`CHUNK` tokens (bounded scratch memory; each chunk attends to the ones before through the cache).

The KV cache (`PagedKV`) is sized by memory, not by slots x context: `n_blocks` blocks of
`block_size` positions, taken from a free list as a slot's sequence grows and returned when the
engine releases the slot. The engine reserves a request's worst case (prompt + max_tokens) at
admission, so a running request never finds the cache full; the pool is allocated with
`numpy.empty`, so the operating system commits its pages only as positions are first written.
"""
from __future__ import annotations

import ctypes
import math

import numpy as np
import torch

from millis.common.errors import MillisError
from millis.gen.config import GPT2Config, ModelConfig
from millis.gen.gguf import BLOCKS, GGML_TYPES, SUPPORTED, release_pages
from millis.gen.models.layers import Batch, rope_inv_freq
from millis.gen.models.paged_kv import PagedKV
from millis.kernels.native import (XBLOCK_BYTES, TYPE_Q8_0_X16, TYPE_Q8_ROW, Mat,  # noqa: F401
                                   add_amx_tiles, aligned_empty, pack_matrix, q8_tiles)  # the first two: re-exported

# the type ids the kernels switch on: ggml's, millis's int8 (blockq.h T_Q8_0_X16: Q8_0 bytes run against int16
# activations, packed16.c) and int8-row (T_Q8_ROW: int8 weights with a scale per row against int8 activations with
# a scale per token: the decoder embedders' millis.gen.embedder)
INT8, INT8_ROW = "Q8_0_X16", "Q8_ROW"
TYPE_IDS = {name: i for i, name in GGML_TYPES.items() if name in SUPPORTED} | {INT8: TYPE_Q8_0_X16,
                                                                                INT8_ROW: TYPE_Q8_ROW}
ACTIVATIONS = {"Q8_1": 0, INT8: 1, INT8_ROW: 2}  # -> llama_step.c's ACT_BLOCKS, ACT_X16, ACT_ROW
KERNEL_SOURCES = ("blockq.c", "packed.c", "repack.c", "packed16.c", "packedbf16.c", "amx.c", "llama_step.c",
                  "pool.c")
X16BLOCK_BYTES = 68  # one int16 activation block (x16block, for INT8 matrices): scale, 32 int16
MAX_GROUP = 64  # query heads per KV head the C attention takes (llama_step.c MAX_GROUP)
CHUNK = 512  # most tokens per C call (a prompt longer than this is prefilled in chunks)
P, I32, I64, F = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float


class LayerW(ctypes.Structure):
    _fields_ = [("attn_norm", P), ("ffn_norm", P), ("bq", P), ("bk", P), ("bv", P)] + [
        (n, Mat) for n in ("q", "k", "v", "o", "gate", "up", "down")] + [
        (n, P) for n in ("attn_norm_b", "ffn_norm_b", "bo", "bup", "bdown", "q_norm", "k_norm")]


class ModelW(ctypes.Structure):
    _fields_ = [(n, I32) for n in ("n_layers", "dim", "n_heads", "n_kv", "head_dim", "hidden", "vocab",
                                   "rope_neox", "window", "block_size")] + [
        ("eps", F), ("attn_scale", F), ("rope_cos", P), ("rope_sin", P), ("max_pos", I64),
        ("tok_emb", Mat), ("head", Mat), ("out_norm", P), ("layers", P), ("k_pool", P), ("v_pool", P),
        ("n_blocks", I64), ("block_table", P), ("table_stride", I64), ("act", I32), ("gpt2", I32),
        ("pos_emb", P), ("out_norm_b", P)]


class ScratchW(ctypes.Structure):
    _fields_ = [(n, P) for n in ("x", "h", "q", "k", "v", "att", "g", "u", "xq", "xr", "yr")]  # xr, yr: INT8_ROW


def hidden_of(c: ModelConfig) -> int:
    """The MLP's inner width: SwiGLU's intermediate size, or GPT-2's 4 x dim."""
    return 4 * c.dim if isinstance(c, GPT2Config) else c.hidden_dim


def kv_bytes_per_token(c: ModelConfig, itemsize: int = 4) -> int:
    return 2 * c.n_layers * c.n_kv_heads * c.head_dim * itemsize  # K and V (the native cache: fp32)


def _mat(t, name: str) -> tuple[Mat, np.ndarray]:
    if t.qtype not in TYPE_IDS:
        raise MillisError(f"tensor {name} has type {t.qtype}, which millis's kernels do not run")
    rows, cols = t.shape
    if cols % BLOCKS.get(t.qtype, (32,))[0] or (t.qtype not in ("F32", "F16", "BF16") and cols % 32):
        raise MillisError(f"tensor {name}: {cols} columns is not a whole number of {t.qtype} blocks")
    data = np.ascontiguousarray(t.data)
    return Mat(TYPE_IDS[t.qtype], 0, data.ctypes.data, rows, cols, data.nbytes // rows), data


class NativeLlama:
    """A GGUF-layout Llama run by the C forward. `tensors`: GGUF names -> objects with `qtype`,
    `shape` ((rows, cols) or (n,)) and `data` (numpy: block bytes (rows, row_bytes) or fp32)."""

    def __init__(self, c: ModelConfig, tensors: dict, rope_neox: bool, max_batch: int, max_seq: int,
                 kv_bytes: int, threads: int, block_size: int = 32, head: bool = True) -> None:
        """head False: no vocabulary product; `forward_flat` returns the final norm's rows (n, dim) (an embedder)."""
        from millis.kernels.native import build, native_isa

        isa = native_isa()
        if isa is None:
            raise MillisError("GGUF models run on millis's native kernels, which are disabled (MILLIS_NO_KERNELS)")
        if c.n_heads // c.n_kv_heads > MAX_GROUP:
            raise MillisError(f"{c.n_heads} query heads over {c.n_kv_heads} KV heads: the native attention takes "
                              f"at most {MAX_GROUP} query heads per KV head")
        self.lib = build("llama_step", KERNEL_SOURCES, isa)
        self.amx = q8_tiles(self.lib)  # prefill (16 tokens or more) on AMX Q8 tiles beside the packed weights
        self.lib.llm_forward.restype = ctypes.c_int
        self.lib.llm_forward.argtypes = [P, P, I64, P, P, P, I64, P, P, ctypes.c_int]
        from millis.common.hardware import usable_cpus

        self.isa, self.config, self.threads = isa, c, threads or usable_cpus()
        self.max_batch, self.max_seq = max_batch, max_seq
        self.keep: list = []  # every array a pointer refers to
        get = lambda n: self._tensor(tensors, n)  # noqa: E731
        vec = lambda n: self._vec(get(n))  # noqa: E731
        gpt2 = isinstance(c, GPT2Config)  # LayerNorms, learned positions, GELU MLP, biases everywhere
        layers = (LayerW * c.n_layers)()
        for i in range(c.n_layers):
            L, b = layers[i], f"blk.{i}."
            L.attn_norm, L.ffn_norm = vec(b + "attn_norm.weight"), vec(b + "ffn_norm.weight")
            biases = ("bq", "attn_q"), ("bk", "attn_k"), ("bv", "attn_v")
            if gpt2:
                biases += ("attn_norm_b", "attn_norm"), ("ffn_norm_b", "ffn_norm"), ("bo", "attn_output"), \
                          ("bup", "ffn_up"), ("bdown", "ffn_down")
            for f, n in biases if gpt2 or c.qkv_bias else ():
                setattr(L, f, vec(b + n + ".bias"))
            if b + "attn_q_norm.weight" in tensors:  # Qwen3: every head's q and k RMS-normed (GGUF's names)
                L.q_norm, L.k_norm = vec(b + "attn_q_norm.weight"), vec(b + "attn_k_norm.weight")
            for f, n in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output"),
                         ("gate", "ffn_gate"), ("up", "ffn_up"), ("down", "ffn_down")):
                if not (gpt2 and f == "gate"):
                    setattr(L, f, self._matrix(get(b + n + ".weight"), b + n))
        self.layers, self.hidden, self.out_width = layers, hidden_of(c), c.vocab_size if head else c.dim
        head_mat = self._matrix(tensors.get("output.weight") or get("token_embd.weight"), "output") if head else Mat()
        cos, sin = (np.zeros((1, 1), np.float32),) * 2 if gpt2 else self._rope(c, max_seq)
        n_blocks = max(1, kv_bytes // (kv_bytes_per_token(c) * block_size))
        self.kv = PagedKV(n_blocks, block_size, max_batch, max_seq)
        pool = (n_blocks, c.n_layers, c.n_kv_heads, block_size, c.head_dim)  # a block: every layer's part (llama_step.c)
        self.k_pool, self.v_pool = aligned_empty(pool, np.float32), aligned_empty(pool, np.float32)
        self.m = ModelW(
            n_layers=c.n_layers, dim=c.dim, n_heads=c.n_heads, n_kv=c.n_kv_heads, head_dim=c.head_dim,
            hidden=self.hidden, vocab=c.vocab_size, rope_neox=int(rope_neox),
            window=getattr(c, "sliding_window", 0), block_size=block_size, eps=c.norm_eps,
            attn_scale=1.0 / math.sqrt(c.head_dim), rope_cos=cos.ctypes.data, rope_sin=sin.ctypes.data,
            max_pos=max_seq, tok_emb=self._matrix(get("token_embd.weight"), "token_embd", pack=False),
            head=head_mat, out_norm=vec("output_norm.weight"), layers=ctypes.addressof(layers),
            k_pool=self.k_pool.ctypes.data, v_pool=self.v_pool.ctypes.data, n_blocks=n_blocks,
            block_table=self.kv.table.ctypes.data, table_stride=self.kv.table.shape[1],
            act=ACTIVATIONS[self._activations(tensors)], gpt2=int(gpt2),
            pos_emb=vec("position_embd.weight") if gpt2 else None,
            out_norm_b=vec("output_norm.bias") if gpt2 else None)
        self.keep += [cos, sin]
        self._scratch_n = 0

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _activations(tensors: dict) -> str:
        """INT8 when the block matrices are millis's int8 (int16 activation blocks), INT8_ROW for int8-row (int8 a
        token), else "Q8_1" (int8 blocks); float matrices take fp32 rows either way. One step quantizes to one kind
        only."""
        kinds = {t.qtype for t in tensors.values() if len(t.shape) == 2 and t.qtype not in ("F32", "F16", "BF16")}
        own = kinds & {INT8, INT8_ROW}
        if own and len(kinds) > 1:
            raise MillisError(f"millis's {min(own)} matrices cannot run beside other block formats ({sorted(kinds)})")
        return own.pop() if own else "Q8_1"

    @staticmethod
    def _tensor(tensors: dict, name: str):
        if name not in tensors:
            raise MillisError(f"the model has no tensor {name}")
        return tensors[name]

    def _vec(self, t) -> int:
        a = np.ascontiguousarray(t.data, dtype=np.float32) if t.qtype == "F32" else self._dequant(t)
        self.keep.append(a)
        return a.ctypes.data

    @staticmethod
    def _dequant(t) -> np.ndarray:
        from gguf.quants import dequantize

        from gguf import GGMLQuantizationType as G

        return np.ascontiguousarray(dequantize(t.data, G[t.qtype]), dtype=np.float32).reshape(-1)

    def _matrix(self, t, name: str, pack: bool = True) -> Mat:
        """A weight matrix as the kernels take it: packed (packed.c) where this build packs its type."""
        m, data = _mat(t, name)
        packed = pack_matrix(self.lib, m, self.keep, self.threads) if pack else m
        out = add_amx_tiles(self.lib, m, packed, self.keep, self.threads) if pack and self.amx else packed
        if packed is m:
            self.keep.append(data)
        else:
            release_pages(data)  # the kernels read only the packed copy (and the tiles)
        return out

    @staticmethod
    def _rope(c: ModelConfig, max_seq: int) -> tuple[np.ndarray, np.ndarray]:
        freqs = torch.outer(torch.arange(max_seq, dtype=torch.float32), rope_inv_freq(c).float())  # (S, hd/2)
        return np.ascontiguousarray(freqs.cos().numpy()), np.ascontiguousarray(freqs.sin().numpy())

    def _scratch(self, n: int) -> ScratchW:
        if n > self._scratch_n:
            c = self.config
            qd, kd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
            widest = max(c.dim, qd, self.hidden)
            # 64-byte aligned, as the encoder's (a SmolLM2-shaped prefill of 128 / 512 tokens 0.97-0.99x / 0.94-0.96x
            # the time against 16 bytes off: alternated in one process, Zen 4, ad hoc)
            self._bufs = {k: aligned_empty((n * w,), np.float32) for k, w in (
                ("x", c.dim), ("h", c.dim), ("q", qd), ("k", kd), ("v", kd), ("att", qd), ("g", self.hidden),
                ("u", self.hidden))}
            per_block = X16BLOCK_BYTES if self.m.act == ACTIVATIONS[INT8] else XBLOCK_BYTES
            self._bufs["xq"] = aligned_empty((n * (widest // 32 + 1) * per_block,), np.uint8)  # per 32 values
            if self.m.act == ACTIVATIONS[INT8_ROW]:  # the ends' residual rows and their products (ends_llama.h)
                self._bufs["xr"] = aligned_empty((n * (widest // 32 + 1) * XBLOCK_BYTES,), np.uint8)
                self._bufs["yr"] = aligned_empty((n * max(qd + 2 * kd, 2 * self.hidden, c.dim),), np.float32)
            self._sw = ScratchW(**{k: v.ctypes.data for k, v in self._bufs.items()})
            self._scratch_n = n
        return self._sw

    # ------------------------------------------------------------------ the forward pass
    def forward_flat(self, ids: np.ndarray, pos: np.ndarray, slots: np.ndarray, out_rows: np.ndarray) -> np.ndarray:
        """ids, pos, slots (n,) int32 -> logits (len(out_rows), vocab) fp32 of the rows out_rows (without a head:
        their final-norm states (len(out_rows), dim))."""
        if not len(ids):
            return np.empty((0, self.out_width), np.float32)
        ids, slots, out_rows = np.asarray(ids), np.asarray(slots), np.asarray(out_rows)
        n, V, S = len(ids), self.config.vocab_size, self.kv.table.shape[0]
        if (ids.min() < 0 or ids.max() >= V or len(slots) != n or len(pos) != n or slots.min() < 0 or slots.max() >= S
                or len(out_rows) > n or (len(out_rows) and (out_rows.min() < 0 or out_rows.max() >= n))):
            # checked before the int32 cast: an id of 2**32 + 7 ran as 7, slot -1 and rows past n read outside the C
            # scratch and block table
            raise MillisError(f"forward_flat: token ids in 0..{V - 1}, a slot (0..{S - 1}) and a position per token, "
                              f"at most {n} output rows in 0..{n - 1}")
        for s in np.unique(slots):
            self.kv.ensure(int(s), int(pos[slots == s].max()) + 1)
        ids, pos, slots, out_rows = (np.ascontiguousarray(a, dtype=np.int32) for a in (ids, pos, slots, out_rows))
        logits = np.empty((len(out_rows), self.out_width), np.float32)
        sw = self._scratch(len(ids))
        rc = self.lib.llm_forward(ctypes.addressof(self.m), ctypes.addressof(sw), len(ids), ids.ctypes.data,
                                  pos.ctypes.data, slots.ctypes.data, len(out_rows), out_rows.ctypes.data,
                                  logits.ctypes.data, self.threads)
        if rc:
            raise MillisError(f"token ids must be in 0..{self.config.vocab_size - 1} and positions below {self.max_seq}")
        return logits

    def decode_rows(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """The engine's decode step (Engine's `decode`): one new token per row at its position in its slot ->
        logits (n, vocab), straight from flat lists (no Batch tensors on the way: a decode step of a small
        model is short, and the Python around it counts)."""
        i32 = np.int32
        out = self.forward_flat(np.asarray(tokens, i32), np.asarray(positions, i32), np.asarray(slots, i32),
                                np.arange(len(tokens), dtype=i32))
        return torch.from_numpy(out)

    def __call__(self, b: Batch) -> torch.Tensor:
        B, T = b.ids.shape
        ids, pos = b.ids.numpy().astype(np.int32), b.pos.numpy().astype(np.int32)
        slots = np.repeat(b.slots.numpy().astype(np.int32)[:, None], T, axis=1)
        if B * T <= CHUNK:
            rows = np.arange(B) * T + T - 1 if b.last_only else np.arange(B * T)
            out = self.forward_flat(ids.reshape(-1), pos.reshape(-1), slots.reshape(-1), rows)
            return torch.from_numpy(out).view(B, 1 if b.last_only else T, -1)
        outs = []
        for r in range(B):  # long prompts: chunks of one row
            for c0 in range(0, T, CHUNK):
                c1 = min(T, c0 + CHUNK)
                rows = np.array([c1 - c0 - 1]) if b.last_only else np.arange(c1 - c0)
                if b.last_only and c1 < T:
                    rows = rows[:0]
                outs.append(self.forward_flat(ids[r, c0:c1], pos[r, c0:c1], slots[r, c0:c1], rows))
        out = torch.from_numpy(np.concatenate(outs))
        return out.view(B, 1 if b.last_only else T, -1)
