"""Texts -> flat (B, T) int64 batches: truncation that is reported, padding to length buckets."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from millis.common.errors import MillisError

BUCKET = 16  # pad T up to a multiple of this: few distinct shapes for static-shape runtimes


def bucket_length(n_tokens: int, max_length: int) -> int:
    """The length a batch whose longest row has n_tokens is padded to: n rounded up to a multiple of
    BUCKET, at most max_length. The one rule: `encode`, `run_texts`, the server's batcher and the
    serve-mix shapes of `millis optimize` all pad by it."""
    return min(max_length, -(-max(n_tokens, 1) // BUCKET) * BUCKET)


@dataclass
class Encoded:
    feeds: dict[str, np.ndarray]   # (B, T) int64 each
    lengths: list[int]             # real tokens per row, after truncation
    truncated: list[bool]          # row was cut to max_length


def check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or len(texts) == 0:
        raise MillisError("no input texts given (expected a non-empty list of strings)")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise MillisError(f"input {i} is {type(t).__name__}, expected a string")
        if not t.strip():
            raise MillisError(f"input {i} is empty")
    return list(texts)


class TextEncoder:
    def __init__(self, tokenizer_dir: Path, input_names: tuple[str, ...], max_length: int):
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # we report truncation ourselves
        self.tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.input_names, self.max_length = input_names, max_length
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        # The Rust tokenizer, called directly: half the per-call cost of the HF wrapper (which also
        # re-applies truncation/padding settings on every call). Its own settings are cleared once,
        # on a private copy, so it is never mutated afterwards and threads may share it.
        self._fast = None
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_str(backend.to_str())
            self._fast.no_truncation()
            self._fast.no_padding()

    def token_ids(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Tokenize with special tokens; cut rows over max_length, keeping the final special token."""
        if self._fast is not None and len(texts) <= 8:  # one by one: no wake-up of the Rust thread pool
            rows = [self._fast.encode(t, add_special_tokens=True).ids for t in texts]
        elif self._fast is not None:
            rows = [e.ids for e in self._fast.encode_batch(texts, add_special_tokens=True)]
        else:
            rows = self.tok(texts, add_special_tokens=True, truncation=False)["input_ids"]
        out, cut = [], []
        for r in rows:
            if len(r) > self.max_length:
                r = r[: self.max_length - 1] + r[-1:]
                cut.append(True)
            else:
                cut.append(False)
            out.append(r)
        return out, cut

    def pair_ids(self, query: str, docs: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Each (query, document) pair as the model's pair encoding ([CLS] q [SEP] d [SEP] for BERT); a
        pair over max_length loses the end of its document (its final special token kept)."""
        if self._fast is not None:
            rows = [self._fast.encode(query, d, add_special_tokens=True).ids for d in docs]
        else:
            rows = [self.tok(query, d, add_special_tokens=True, truncation=False)["input_ids"] for d in docs]
        out, cut = [], []
        for r in rows:
            cut.append(len(r) > self.max_length)
            out.append(r[: self.max_length - 1] + r[-1:] if cut[-1] else r)
        return out, cut

    def encode(self, texts: list[str], pad_to: int = 0) -> Encoded:
        ids, cut = self.token_ids(check_texts(texts))
        longest = max(len(r) for r in ids)
        if pad_to and pad_to < longest:
            raise MillisError(f"pad_to={pad_to} is shorter than the longest row ({longest} tokens)")
        t = pad_to or bucket_length(longest, self.max_length)
        return Encoded(self.pack(ids, t), [len(r) for r in ids], cut)

    def pack(self, rows: list[list[int]], t: int) -> dict[str, np.ndarray]:
        ids = np.full((len(rows), t), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), t), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = self.token_types(rows, t)
        return feeds

    def token_types(self, rows: list[list[int]], t: int) -> np.ndarray:
        """(B, t) segment ids: 0, except a pair row's second text (after its first of two or more [SEP]s)
        and its final [SEP], which are 1, as the tokenizer's pair encoding sets them."""
        types = np.zeros((len(rows), t), dtype=np.int64)
        sep = self.tok.sep_token_id
        for i, r in enumerate(rows):
            if sep is not None and r.count(sep) >= 2:
                types[i, r.index(sep) + 1: len(r)] = 1
        return types

    def fill(self, texts: list[str], batch: int, seq: int) -> dict[str, np.ndarray]:
        """A (batch, seq) batch of real text with a full mask: texts are chained until seq tokens."""
        if seq < 2:
            raise MillisError("a measured shape needs seq >= 2 (two special tokens)")
        body = [t for r in self.tok(texts, add_special_tokens=False)["input_ids"] for t in r]
        if not body:
            raise MillisError("the sample texts produce no tokens")
        first = self.tok("a", add_special_tokens=True)["input_ids"]
        cls_id, sep_id = first[0], first[-1]
        rows, k = [], 0
        for _ in range(batch):
            row = []
            while len(row) < seq - 2:
                row.append(body[k % len(body)])
                k += 1
            rows.append([cls_id] + row + [sep_id])
        return self.pack(rows, seq)


