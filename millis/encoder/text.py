"""Texts -> flat (B, T) int64 batches: truncation that is reported, padding to length buckets."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from millis.common.errors import MillisError
from millis.common.rust_tokenizer import encode_all

BUCKET = 16  # pad T up to a multiple of this: few distinct shapes for static-shape runtimes
PROMPTS_FILE = "config_sentence_transformers.json"  # sentence-transformers' named prompts (`read_prompts`)
WORD_SLACK = 16  # TextEncoder.clipped cuts a text at the end of a word only this many tokens past its cut at most


def bucket_length(n_tokens: int, max_length: int) -> int:
    """The length a batch whose longest row has n_tokens is padded to: n rounded up to a multiple of
    BUCKET, at most max_length. The one rule: `encode`, `run_texts`, the server's batcher and the
    serve-mix shapes of `millis optimize` all pad by it."""
    return min(max_length, -(-max(n_tokens, 1) // BUCKET) * BUCKET)


class PairRow(list):
    """A (query, document) pair's token ids and where its second segment starts: token type 1 from `second` to
    the row's end, as the tokenizer's pair encoding sets them (None: every token type 0). Only pairs carry it: a
    single text's ids are a plain list and type 0 throughout, whatever special tokens its text spells out (a
    literal "[SEP]" in a text is a [SEP] token, not a second segment)."""
    __slots__ = ("second",)

    def __init__(self, ids, second: int | None):
        super().__init__(ids)
        self.second = second


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
        if not t:  # "" only: whitespace is a text, embedded as its tokens (TEI's rule and OpenAI's)
            raise MillisError(f"input {i} is empty")
    return list(texts)


def read_prompts(folder: Path) -> dict[str, str]:
    """sentence-transformers' named prompts (PROMPTS_FILE's `prompts`: Qwen3-Embedding's "query" instruction), each
    put before a text whose request names it (TEI's `prompt_name`); {} where the folder has none."""
    f = Path(folder) / PROMPTS_FILE
    try:
        data = json.loads(f.read_text()) if f.is_file() else {}
    except ValueError as e:
        raise MillisError(f"{f} is not JSON ({e})") from None
    prompts = data.get("prompts") if isinstance(data, dict) else data
    if prompts is None:
        return {}
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise MillisError(f"{f}: prompts must map names to strings, got {prompts!r}")
    return dict(prompts)


def prompt_texts(texts: list[str], prompts: dict[str, str], name: str) -> list[str]:
    """Each text after the prompt `name` (one of `read_prompts`'), as sentence-transformers' encode(prompt_name=)."""
    if name not in prompts:
        have = f"one of {', '.join(map(repr, prompts))}" if prompts else f"it has none ({PROMPTS_FILE} names none)"
        raise MillisError(f"prompt_name {name!r} is not a prompt of this model: {have}")
    return [prompts[name] + t for t in texts]


class TextEncoder:
    def __init__(self, tokenizer_dir: Path, input_names: tuple[str, ...], max_length: int, saved: bool = False,
                 segments: bool = True):
        """`segments`: the model embeds a second token type (BERT's segment B); False for RoBERTa and XLM-R
        (one token type: every id 0, as their tokenizers give none), a one-type model, or a tokenizer that gives no
        token_type_ids (`source.pair_segments`).
        `saved`: tokenizer_dir was written by transformers' save_pretrained (an artifact's `tokenizer/`):
        its tokenizer.json is the backend AutoTokenizer built, so the Rust tokenizer is read from it directly
        and transformers is never imported (loading an artifact: ~1.3 s of imports less). Any other
        directory goes through AutoTokenizer, which may adjust the backend (a BERT normalizer from
        tokenizer_config's do_lower_case, added tokens)."""
        self.input_names, self.max_length, self.segments = input_names, max_length, segments
        # The Rust tokenizer, called directly: half the per-call cost of the HF wrapper (which also
        # re-applies truncation/padding settings on every call). Its own settings are cleared once,
        # on a private copy, so it is never mutated afterwards and threads may share it.
        self.tok, self._fast = None, None
        if saved and (Path(tokenizer_dir) / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
            special = saved_special_tokens(Path(tokenizer_dir))
            pad, sep = (self._fast.token_to_id(special[k]) if special.get(k) else None for k in ("pad", "sep"))
        else:
            from transformers import AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()  # we report truncation ourselves
            try:
                self.tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
            except (ValueError, OSError, ImportError) as e:  # a missing package, an unreadable file: one line
                why = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                raise MillisError(f"{tokenizer_dir}: transformers cannot load its tokenizer: {why}") from None
            pad, sep = self.tok.pad_token_id, self.tok.sep_token_id
            backend = getattr(self.tok, "backend_tokenizer", None)
            if backend is not None:
                from tokenizers import Tokenizer

                self._fast = Tokenizer.from_str(backend.to_str())
        self._pairs = None  # pair_tokenizer's, made on first use (~10 ms: only a cross-encoder's loads pay it)
        self._suffix: int | None = None  # `suffix`, found on first use
        self.prompts = read_prompts(tokenizer_dir)  # (an artifact keeps its source's beside its tokenizer)
        if self._fast is not None:
            self._fast.no_truncation()
            self._fast.no_padding()
        self.pad_id = pad if pad is not None else 0
        self.sep_id = sep

    @property
    def rust_tokenizer(self):
        """The Rust tokenizer token_ids runs (no truncation, no padding; threads share it, nothing mutates it), or
        None where only a slow transformers tokenizer exists."""
        return self._fast

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each id's token string (a SPLADE vector's entries are vocabulary ids); "" for one the tokenizer lacks."""
        if self._fast is not None:
            return [self._fast.id_to_token(int(i)) or "" for i in ids]
        return [t or "" for t in self.tok.convert_ids_to_tokens([int(i) for i in ids])]

    @property
    def vocab_size(self) -> int:
        """How many ids the tokenizer knows (its vocabulary and added tokens): ids 0..vocab_size-1."""
        if self._fast is not None:
            return self._fast.get_vocab_size(with_added_tokens=True)
        return len(self.tok)

    def ids_of(self, texts: list[str], special: bool) -> list[list[int]]:
        """Each text's token ids, with or without the special tokens, no truncation (long texts off the GIL)."""
        if self._fast is not None:
            return [e.ids for e in encode_all(self._fast, texts, special)]
        return self.tok(texts, add_special_tokens=special, truncation=False)["input_ids"]

    @property
    def suffix(self) -> int:
        """How many special tokens the tokenizer puts after a text (BERT's [SEP], Qwen3-Embedding's <|endoftext|>: 1;
        a Llama tokenizer that adds only <s> before it: 0): what a cut keeps at a row's end, as HF's truncation."""
        if self._suffix is None:
            plain, full = self.ids_of(["a b"], special=False)[0], self.ids_of(["a b"], special=True)[0]
            at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
            self._suffix = 1 if at is None or not plain else len(full) - at - len(plain)
        return self._suffix

    def token_ids(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Tokenize with special tokens; cut rows over max_length, keeping the final special tokens (`suffix`)."""
        rows = self.ids_of(texts, special=True)
        out, cut = [], []
        end = self.suffix
        for r in rows:
            if len(r) > self.max_length:
                r = r[: self.max_length - end] + (r[len(r) - end:] if end else [])
                cut.append(True)
            else:
                cut.append(False)
            out.append(r)
        return out, cut

    def pair_tokenizer(self):
        """A copy of the Rust tokenizer that cuts pairs as HF's truncation=True (longest_first) does: what
        cross-encoders train on. Two threads that race here build it twice, harmlessly."""
        if self._pairs is None:
            from tokenizers import Tokenizer

            pairs = Tokenizer.from_str(self._fast.to_str())
            pairs.enable_truncation(self.max_length, strategy="longest_first")
            self._pairs = pairs
        return self._pairs

    def clipped(self, text: str, enc, keep: int) -> tuple[str, int] | None:
        """(text cut after its first `keep` tokens, its token count) (enc: text's encoding without special tokens):
        cut at the end of token keep - 1, else of that token's word (within WORD_SLACK tokens), where the cut text
        tokenizes to the same first ids; the text itself when it has no more; None when neither cut does (pieces
        that depend on what follows)."""
        if len(enc.ids) <= keep:
            return text, len(enc.ids)
        words, last = enc.word_ids, keep - 1
        while (words[last] is not None and last + 1 < len(words) and words[last + 1] == words[last]
               and last < keep + WORD_SLACK):
            last += 1
        ends = (keep - 1, last) if last < keep + WORD_SLACK else (keep - 1,)  # (a longer word: no word cut)
        for j in dict.fromkeys(ends):
            cut = text[:enc.offsets[j][1]]
            if encode_all(self._fast, [cut], False)[0].ids == enc.ids[:j + 1]:
                return cut, j + 1
        return None

    def pair_ids(self, query: str, docs: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Each (query, document) pair as the model's pair encoding ([CLS] q [SEP] d [SEP] for BERT); a pair over
        max_length is cut as HF's `truncation=True` (longest_first) cuts it, the longer text's end first, as
        sentence-transformers' CrossEncoder trains (a long query loses its end too, not the whole document).
        Each text is tokenized once alone and cut after max_length + 1 tokens (+ 2 for a query longer than its
        document): longest_first's outcome depends only on whether the query is the longer, and on the other text's
        length where that fits, and the Rust tokenizer's pair truncation builds every overflowing piece of both texts,
        quadratic in their lengths (a 16 KB query with a 20 KB document took 17 s and GBs, holding the GIL). Where
        no cut keeps the outcome (a tokenizer whose pieces depend on what follows), the whole texts up to 4 x
        max_length tokens each, else the texts cut at the token (bounded, the last pieces perhaps not HF's)."""
        if self._fast is not None:
            L, pairs = self.max_length, self.pair_tokenizer()
            specials = pairs.num_special_tokens_to_add(True)
            q_enc, d_encs = encode_all(self._fast, [query], False)[0], encode_all(self._fast, docs, False)
            q_cuts = {keep: self.clipped(query, q_enc, keep) for keep in (L + 1, L + 2)}  # (the query's two cuts)
            rows, nq = [], len(q_enc.ids)
            for d, d_enc in zip(docs, d_encs):
                nd = len(d_enc.ids)
                keep_q = L + 1 + (nq > nd)
                q_cut, d_cut = q_cuts[keep_q], self.clipped(d, d_enc, L + 1)
                if q_cut and d_cut and (q_cut[1] > d_cut[1]) == (nq > nd):  # (longest_first swaps on q > d)
                    texts = q_cut[0], d_cut[0]
                elif max(nq, nd) <= 4 * L:
                    texts = query, d
                else:
                    texts = (query[:q_enc.offsets[min(nq, keep_q) - 1][1]] if nq else query,
                             d[:d_enc.offsets[min(nd, L + 1) - 1][1]] if nd else d)
                e = encode_all(pairs, [texts], True)[0]
                rows.append((e.ids, e.type_ids, nq + nd + specials > L))
        else:
            rows = []
            for d in docs:
                e = self.tok(query, d, add_special_tokens=True, truncation="longest_first", max_length=self.max_length)
                n = len(self.tok(query, d, add_special_tokens=True, truncation=False)["input_ids"])
                rows.append((e["input_ids"], e.get("token_type_ids") or [], n > self.max_length))
        out, cut = [], []
        for r, types, was_cut in rows:
            out.append(PairRow(r, types.index(1) if 1 in types else None))
            cut.append(was_cut)
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
        """(B, t) segment ids: 0, except a pair row's second segment (`PairRow.second` on), which is 1 where the
        model has a second token type."""
        types = np.zeros((len(rows), t), dtype=np.int64)
        if self.segments:
            for i, r in enumerate(rows):
                second = getattr(r, "second", None)
                if second is not None:
                    types[i, second: len(r)] = 1
        return types

    def fill(self, texts: list[str], batch: int, seq: int) -> dict[str, np.ndarray]:
        """A (batch, seq) batch of real text with a full mask: texts are chained until seq tokens."""
        if seq < 2:
            raise MillisError("a measured shape needs seq >= 2 (two special tokens)")
        body = [t for r in self.ids_of(list(texts), special=False) for t in r]
        if not body:
            raise MillisError("the sample texts produce no tokens")
        first = self.ids_of(["a"], special=True)[0]
        cls_id, sep_id = first[0], first[-1]
        rows, k = [], 0
        for _ in range(batch):
            row = []
            while len(row) < seq - 2:
                row.append(body[k % len(body)])
                k += 1
            rows.append([cls_id] + row + [sep_id])
        return self.pack(rows, seq)


def saved_special_tokens(tokenizer_dir: Path) -> dict[str, str]:
    """{"pad": token, "sep": token} as save_pretrained wrote them in tokenizer_config.json (a string, or an
    added token's {"content": ...}); a missing one is left out."""
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text()) \
        if (tokenizer_dir / "tokenizer_config.json").is_file() else {}
    out = {}
    for k in ("pad", "sep"):
        v = cfg.get(f"{k}_token")
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str) and v:
            out[k] = v
    return out
