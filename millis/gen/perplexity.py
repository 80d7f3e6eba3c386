"""Perplexity of a decoder on a text file: sliding windows of `context` tokens moved by `stride`.

Each window scores only the tokens the previous window did not (the first window all but its first
token), with the window's earlier tokens as context, as HF's perplexity guide does. The same token
ids and windows are used for every precision and runtime, so `millis eval` figures compare directly
(bench/generation_gguf.py runs llama.cpp over the same windows).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from millis.common.config import check_at_least
from millis.common.config import flag as _f
from millis.common.errors import MillisError
from millis.common.readers import read_text
from millis.gen.config import DTYPES, QUANTS, EngineConfig


@dataclass(frozen=True)
class EvalTextConfig:
    """`millis eval`: perplexity of a decoder on a text. Every field is a flag (and MILLIS_EVAL_* variable)."""

    model: str = _f("", "a GGUF file, builtin:smollm2, a HF directory or a llama2.c checkpoint")
    # scoped (MILLIS_EVAL_TEXT, ...): a MILLIS_TEXT meant for another tool must not switch every `millis eval`
    # into perplexity mode
    text: str = _f("", "a UTF-8 text file to score", scoped=True)
    context: int = _f(512, "tokens per window (at most the model's positions)", scoped=True)
    stride: int = _f(0, "tokens the window moves; each window scores the tokens the previous one did not; "
                        "0 = half of --context", scoped=True)
    score_tokens: int = _f(0, "score at most this many tokens: the first N after the file's first token (the BOS, "
                              "where the model has one); 0 = all", scoped=True)
    dtype: str = _f("fp32", "fp32 or bf16 (HF / llama2.c models)", choices=DTYPES)
    quant: str = _f("none", "none, int8 or int8-torch (HF / llama2.c models)", choices=QUANTS)
    threads: int = _f(0, "threads; 0 = all usable cores")
    kv_memory_mb: int = _f(0, "GGUF models: KV cache memory in MiB; 0 = the default")

    def __post_init__(self) -> None:
        if self.context < 2:
            raise MillisError(f"--context must be >= 2, got {self.context}")
        if not 0 <= self.stride <= self.context:
            raise MillisError(f"--stride must be in 1..{self.context} (--context; 0 = half of it), got {self.stride}")
        check_at_least(self, 0, "score_tokens", "threads", "kv_memory_mb")

    @property
    def window_stride(self) -> int:
        """The stride used: --stride, else half the window (so a small --context alone works)."""
        return self.stride or self.context // 2


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float             # mean negative log-likelihood per scored token (nats)
    tokens: int            # tokens scored
    windows: int
    tokens_per_s: float    # positions run per second (every window's context counted)
    argmax: list[int]      # the model's top-1 prediction for each scored token (agreement between systems)


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored) per window over n token ids: ids[begin:end] run, targets [first, end)."""
    out, prev_end = [], 0
    for begin in range(0, max(1, n - 1), stride):
        end = min(begin + context, n)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


def score_ids(engine, ids: list[int], context: int, stride: int) -> Perplexity:
    """Perplexity of token ids under an open engine (millis.gen.engine.Engine)."""
    if len(ids) < 2:
        raise MillisError("the text has fewer than 2 tokens: nothing to score")
    if context > engine.max_seq:  # a shorter window than asked for would leave gaps between the windows unscored
        raise MillisError(f"--context {context} is more than the model's {engine.max_seq} positions: use --context "
                          f"{engine.max_seq} or less")
    if not 1 <= stride <= context:
        raise MillisError(f"--stride must be in 1..{context} (--context), got {stride}")
    nll, count, ran, top = 0.0, 0, 0, []
    t0 = time.perf_counter()
    wins = windows(len(ids), context, stride)
    for begin, end, first in wins:
        logits = engine.logits(ids[begin:end])[first - 1 - begin:end - 1 - begin]  # (scored, V)
        target = torch.tensor(ids[first:end])
        losses = torch.nn.functional.cross_entropy(logits.float(), target, reduction="none")
        # NaN logits leave no figure to report (an infinite loss, a token the model rules out, is one)
        if bad := int(torch.isnan(losses).sum()):
            raise MillisError(f"the model's loss is NaN on {bad} of the {end - first} tokens scored in positions "
                              f"{first}..{end - 1}: its logits are not finite (weights or kernels)")
        nll += float(losses.sum())
        top += logits.argmax(-1).tolist()
        count += end - first
        ran += end - begin
    dt = time.perf_counter() - t0
    # overlapping windows score every token but the first exactly once (stride == context skips each window's first)
    assert stride == context or count == len(ids) - 1, (count, len(ids))
    mean = nll / count  # past ~709.78, math.exp overflows: the perplexity is infinite
    return Perplexity(math.exp(mean) if mean < 709 else math.inf, mean, count, len(wins), ran / dt, top)


def perplexity(cfg: EvalTextConfig) -> Perplexity:
    from millis.gen import open_engine

    if not Path(cfg.text).is_file():
        raise MillisError(f"--text {cfg.text!r} is not a file")
    eng = open_engine(cfg.model, EngineConfig(max_batch=1, max_seq=cfg.context, dtype=cfg.dtype, quant=cfg.quant,
                                              threads=cfg.threads, kv_memory_mb=cfg.kv_memory_mb))
    if eng.tok is None:
        raise MillisError(f"{cfg.model} has no tokenizer: perplexity needs one to read the text")
    ids = eng.tok.encode(read_text(cfg.text))
    if cfg.score_tokens:  # N scored tokens: the first token (BOS) is only ever context
        ids = ids[:cfg.score_tokens + 1]
    return score_ids(eng, ids, cfg.context, cfg.window_stride)
