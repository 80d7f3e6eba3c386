"""Decoder embedders on millis's C decoder step: Llama / Mistral / Qwen2 / Qwen3 checkpoints that embed text
(Qwen3-Embedding, gte-Qwen2, e5-mistral), run by `millis.gen.models.native_llama.NativeLlama` without its vocabulary
head, pooled as their folder declares (sentence-transformers' `lasttoken`: each text's last token's final-norm state).

Attention is causal, so a text's states do not depend on what follows it: a batch's rows run without their padding,
each text in a KV slot of its own at positions 0..n-1 (right padding: HF's positions too; a row whose kept tokens
are not its first ones is refused), and only the states the pooling reads leave the C call (last-token: one a text).
The KV cache lives for one call: a row's slot is released when its rows are out.

Precisions (PRECISIONS): the matrices in fp32, bf16, int8 (Q8_0: int8 weights with a scale per 32 against int8
activations per 32, llama.cpp's), int8-a16 (the same weights against int16 activations per 32: millis's int8 for
decoders) or int8-row (int8 weights with a scale per row against int8 activations with a scale per token, smoothed:
millis.gen.decoder_smooth; the integer sums of a whole row, one float step a row and token, as the encoders'
int8-row); the token embedding table stays fp32 (a lookup, no product).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from millis.common.errors import MillisError
from millis.encoder.decoders import MAX_TOKENS
from millis.encoder.source import DECODERS, LAST_TOKEN, POOLING_MODES, Pooling

PRECISIONS = {"fp32": "F32", "bf16": "BF16", "int8": "Q8_0", "int8-a16": "Q8_0_X16",  # -> the matrices' type
              "int8-row": "Q8_ROW"}
ROW_ALPHA = 0.5  # int8-row's smoothing strength (decoder_smooth)
GROUP_TOKENS = 2048  # most tokens a C call takes (a longer text runs in pieces of it, each against the ones before)
SLOTS = 64           # most texts a C call takes


def check_decoder_variant(options: dict) -> None:
    """A native variant a decoder embedder runs: one of PRECISIONS, fp32 attention; others refused by name."""
    precision = options.get("precision", "fp32")
    if precision not in PRECISIONS or options.get("attention", "auto") != "auto":
        raise MillisError(f"decoder embedders run the native precisions {', '.join(PRECISIONS)} (fp32 attention), "
                          f"not {precision}{' with int8 attention' if options.get('attention') == 'int8' else ''}: "
                          f"the variant is skipped")


def decoder_config(raw: dict):
    """config.json -> millis.gen's LlamaConfig (every field that changes the math read or refused, as for chat
    models). Qwen3: Llama's layers with each q / k head RMS-normed (read from the weights), without a window."""
    from millis.gen.hf_config import hf_model_config

    mt = raw.get("model_type")
    if mt not in DECODERS:
        raise MillisError(f"{mt!r} is not a decoder embedder ({', '.join(sorted(DECODERS))})")
    if mt == "qwen3":
        if raw.get("use_sliding_window") or any(t != "full_attention" for t in raw.get("layer_types") or []):
            raise MillisError("qwen3 with a sliding window (use_sliding_window, layer_types) is not supported")
        raw = dict(raw, model_type="llama")
    return hf_model_config(raw, tied=True)  # (no vocabulary head is read: an embedder's output is its states)


def decoder_tensors(path: Path, c, model_type: str) -> dict:
    """The folder's weights in fp32 under GGUF's names (millis.gen.load.llama_tensors), Qwen3's q / k norms beside."""
    from millis.gen.load import f32_weight, llama_tensors, llama_weights, read_safetensors

    hf = {k.removeprefix("model."): v.float() for k, v in read_safetensors(path).items()}
    try:
        t = llama_tensors(c, llama_weights(hf, c))
        for i in range(c.n_layers) if model_type == "qwen3" else ():
            for part in ("q", "k"):
                t[f"blk.{i}.attn_{part}_norm.weight"] = f32_weight(hf[f"layers.{i}.self_attn.{part}_norm.weight"])
    except KeyError as e:
        raise MillisError(f"{path}: weight {e.args[0]} is missing for a {model_type} model") from None
    return t


def precision_tensors(tensors: dict, precision: str, c=None, amax: list | None = None, neox: bool = True) -> dict:
    """Every matrix but the embedding table in PRECISIONS[precision]: bf16 values, Q8_0 blocks (gguf's quantizer,
    llama.cpp's rounding), or int8 a row after smoothing (amax: decoder_smooth.input_amax's, stored with the variant;
    None: calibrated here with c, the model's config, and neox, its RoPE layout); vectors stay fp32."""
    from millis.gen.load import Weight

    kind = PRECISIONS[precision]
    if kind == "F32":
        return tensors
    if kind == "Q8_ROW":
        from millis.gen.decoder_smooth import input_amax, smoothed

        tensors = smoothed(tensors, amax or input_amax(tensors, c, neox), c, ROW_ALPHA)
    out = {}
    for name, w in tensors.items():
        if len(w.shape) == 2 and name != "token_embd.weight":
            x = np.ascontiguousarray(w.data, dtype=np.float32)
            if kind == "BF16":
                import torch

                data = torch.from_numpy(x).bfloat16().view(torch.int16).numpy()
            elif kind == "Q8_ROW":
                from millis.encoder.weight_formats import q7_0

                data = q7_0(x, per_row=True, levels=127)
            else:
                from gguf import GGMLQuantizationType
                from gguf.quants import quantize

                data = quantize(x, GGMLQuantizationType.Q8_0)
            w = Weight(kind, tuple(w.shape), data)
        out[name] = w
    return out


def save_calibration(folder: Path) -> Path:
    """int8-row's smoothing calibration (decoder_smooth.input_amax of the folder's fp32 weights) stored beside them,
    so that a load runs no fp32 forward (optimize, for the native-int8-row variant)."""
    from millis.encoder.smooth import save_amax
    from millis.gen.decoder_smooth import GROUPS, input_amax

    raw = json.loads((folder / "config.json").read_text())
    c = decoder_config(raw)
    return save_amax(input_amax(decoder_tensors(folder, c, raw["model_type"]), c), folder, GROUPS)


def pool_states(s: np.ndarray, mode: str) -> np.ndarray:
    """One text's states (n, D), n >= 1 -> (D,) as millis.encoder.tasks.pool pools them."""
    if mode == LAST_TOKEN:
        return s[-1]
    if mode == "cls":
        return s[0]
    return s.max(axis=0) if mode == "max" else s.mean(axis=0)


class NativeDecoder:
    """A decoder embedder's folder (config.json + safetensors) on the C decoder step, in one of PRECISIONS."""

    def __init__(self, path: Path, precision: str, threads: int, pooling: Pooling):
        from millis.gen.models.native_llama import NativeLlama, kv_bytes_per_token

        if precision not in PRECISIONS:
            check_decoder_variant({"precision": precision})
        if pooling.mode not in POOLING_MODES:
            raise MillisError(f"a decoder embedder pools {', '.join(POOLING_MODES)}, not {pooling.mode}")
        raw = json.loads((Path(path) / "config.json").read_text())
        self.cfg, self.pooling = decoder_config(raw), pooling
        tensors, amax = decoder_tensors(Path(path), self.cfg, raw["model_type"]), None
        if precision == "int8-row":  # the calibration optimize stored beside the weights (else it runs here)
            from millis.encoder.smooth import load_amax
            from millis.gen.decoder_smooth import GROUPS, check_amax

            amax = load_amax(Path(path), self.cfg.n_layers, GROUPS)
            check_amax(amax, self.cfg, Path(path))
        tensors = precision_tensors(tensors, precision, self.cfg, amax)
        # the pool holds a call's tokens, or the longest text (its pages are committed only as they are written)
        self.longest = min(self.cfg.max_seq, MAX_TOKENS)
        room = max(GROUP_TOKENS, self.longest) + SLOTS * 32
        self.model = NativeLlama(self.cfg, tensors, True, SLOTS, self.cfg.max_seq, kv_bytes_per_token(self.cfg) * room,
                                 threads, head=False)
        self.model.kv.prefix_cache = False
        self.dim, self.vocab = self.cfg.dim, self.cfg.vocab_size

    def rows(self, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        """(B, T) ids and mask -> each row's kept ids; a row whose ones are not a run from its first column is
        refused (its positions would not be HF's)."""
        m = np.asarray(mask) != 0
        n = m.sum(axis=1)
        if not (m == (np.arange(m.shape[1]) < n[:, None])).all():
            raise MillisError("a decoder embedder takes right-padded rows: each row's attention mask is ones, then "
                              "zeros")
        return [np.asarray(ids[i, :n[i]]) for i in range(len(n))]

    def states(self, rows: list[np.ndarray], every: bool) -> list[np.ndarray]:
        """Each row's final-norm states: all of them (n_i, D) (every), else its last one's (1, D); (0, D) for an
        empty row. Rows go in calls of at most SLOTS texts and GROUP_TOKENS tokens (a longer text alone, in pieces)."""
        if max(map(len, rows), default=0) > self.longest:
            raise MillisError(f"a text of {max(map(len, rows))} tokens: the native decoder embedder takes at most "
                              f"{self.longest} (--max-length)")
        out: list[np.ndarray] = [np.zeros((0, self.dim), np.float32)] * len(rows)
        i = 0
        while i < len(rows):
            j, total = i, 0
            while j < len(rows) and j - i < SLOTS and (j == i or total + len(rows[j]) <= GROUP_TOKENS):
                total, j = total + len(rows[j]), j + 1
            try:
                self.group(rows, i, j, every, out)
            finally:
                for s in range(j - i):
                    self.model.kv.release(s)
            i = j
        return out

    def group(self, rows: list[np.ndarray], i: int, j: int, every: bool, out: list[np.ndarray]) -> None:
        """Rows i..j-1 in slots 0..j-i-1: several texts in one C call, or one text in pieces of GROUP_TOKENS, each
        against the ones before it in the cache."""
        n = len(rows[i])
        calls = [[(r, 0, len(rows[r])) for r in range(i, j)]] if j - i > 1 else \
            [[(i, a, min(a + GROUP_TOKENS, n))] for a in range(0, n, GROUP_TOKENS)]
        parts: dict[int, list[np.ndarray]] = {r: [] for r in range(i, j)}
        for call in calls:
            ids = np.concatenate([rows[r][a:b] for r, a, b in call]).astype(np.int32)
            pos = np.concatenate([np.arange(a, b) for _, a, b in call]).astype(np.int32)
            slots = np.concatenate([np.full(b - a, r - i) for r, a, b in call]).astype(np.int32)
            ends = np.cumsum([b - a for _, a, b in call])
            done = [k for k, (r, a, b) in enumerate(call) if b == len(rows[r]) and b > a]  # pieces ending a text
            wanted = np.arange(len(ids)) if every else ends[done] - 1
            got = self.model.forward_flat(ids, pos, slots, wanted)
            if every:
                for k, (r, a, b) in enumerate(call):
                    parts[r].append(got[ends[k] - (b - a):ends[k]])
            else:
                for n_out, k in enumerate(done):
                    parts[call[k][0]].append(got[n_out:n_out + 1])
        for r, p in parts.items():
            if p:
                out[r] = np.concatenate(p)

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(B, T) -> (B, D) pooled (and L2-normalized where the folder says), float32; zeros for a row with no
        token."""
        rows = self.rows(ids, mask)
        states = self.states(rows, every=self.pooling.mode != LAST_TOKEN)
        pooled = np.zeros((len(rows), self.dim), np.float32)
        for k, s in enumerate(states):
            if len(s):
                pooled[k] = pool_states(s, self.pooling.mode)
        if self.pooling.normalize:
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled

    def token_states(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(B, T) -> (B, T, D): every kept token's final-norm state (HF's last_hidden_state), zeros elsewhere."""
        rows = self.rows(ids, mask)
        out = np.zeros((*np.asarray(ids).shape, self.dim), np.float32)
        for k, s in enumerate(self.states(rows, every=True)):
            out[k, :len(s)] = s
        return out
