"""Tokenizers behind one small interface: `encode(text) -> ids` (BOS included), `decode(ids) -> str`.

- HF directories: `tokenizer.json` through the `tokenizers` library.
- llama2.c: its `tokenizer.bin` (scores + pieces), or a SentencePiece `.vocab` text file, encoded as
  llama2.c's run.c `encode` does: BOS, a dummy-prefix space, one piece per UTF-8 character (else
  one `<0xXX>` byte piece per byte, else `<unk>`), then repeatedly merge the adjacent pair whose
  merged piece has the highest score. A `.model` file is used through `sentencepiece` when that is
  installed.
"""
from __future__ import annotations

import functools
import heapq
import json
import re
import struct
from pathlib import Path
from typing import Protocol

from millis.common.errors import MillisError
from millis.common.rust_tokenizer import encode_all

_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (bytes_to_unicode): how byte-level vocabularies spell bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


@functools.cache
def byte_values() -> dict[str, int]:
    """byte_alphabet's inverse: a byte-level piece's character -> its byte."""
    return {c: b for b, c in byte_alphabet().items()}


def token_bytes(tok, i: int) -> bytes:
    """The UTF-8 bytes token i adds to a text: one byte of a character several tokens spell (a byte-fallback
    <0xXX> piece, a byte-level BPE piece), which decoding the token alone turns into U+FFFD. A tokenizer without
    `token_bytes`: its decoding of the token alone; no tokenizer: the id."""
    if tok is None:
        return str(i).encode()
    own = getattr(tok, "token_bytes", None)
    return own(i) if own is not None else tok.decode([i]).encode()


def token_text(tok, i: int, raw: bytes) -> str:
    """Token i as logprobs name it, from `raw` (token_bytes'): its text with the space a SentencePiece piece starts
    with (decoding it alone drops that: "▁the" read "the", and "".join of the tokens lost every space); bytes that
    are no whole UTF-8 text (one byte of a character several tokens spell) as OpenAI writes them, "bytes:\\xe2";
    a token that adds no text (a special one) by its vocabulary entry ("<|im_end|>"). Distinct tokens get distinct
    names, so a top_logprobs map keeps them all."""
    if tok is None:
        return str(i)
    if raw:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    name = getattr(tok, "token_name", None)
    return (name(i) if name is not None else "") or tok.decode([i])


class Tokenizer(Protocol):
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class HFTokenizer:
    def __init__(self, path: Path, eos_id: int | None) -> None:
        from tokenizers import Tokenizer as _T

        self._tok = _T.from_file(str(path))
        self.eos_id = eos_id

    @property
    def longest_piece(self) -> int:
        """Characters of the longest vocabulary entry (an upper bound on the text one token covers)."""
        return max(map(len, self._tok.get_vocab()), default=1)

    def encode(self, text: str, special: bool = True) -> list[int]:
        """`special=False`: no BOS or other post-processor tokens (a rendered chat template has its own)."""
        return encode_all(self._tok, [text], special)[0].ids  # (a long prompt off the GIL)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_name(self, i: int) -> str:
        """The vocabulary's entry for id i as written there ("<|im_end|>", "▁the"), "" past the vocabulary."""
        return self._tok.id_to_token(i) or ""

    def token_bytes(self, i: int) -> bytes:
        """A special token none; a byte-level piece its bytes; a <0xXX> piece its byte; else the piece (▁ a space)."""
        piece = self._tok.id_to_token(i)
        if piece is None or i in self.specials:
            return b""
        if (m := _BYTE.match(piece)) is not None:
            return bytes([int(m.group(1), 16)])
        if self.byte_level and all(c in byte_values() for c in piece):
            return bytes(byte_values()[c] for c in piece)
        return piece.replace("\u2581", " ").encode()

    @functools.cached_property
    def specials(self) -> frozenset[int]:
        """The special tokens' ids (decoding skips them); not a token whose text decoding alone drops (a lone ▁)."""
        return frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    @functools.cached_property
    def byte_level(self) -> bool:
        """Whether the vocabulary spells bytes as GPT-2's printable characters (a ByteLevel decoder)."""
        return '"ByteLevel"' in json.dumps(json.loads(self._tok.to_str()).get("decoder"))


class Llama2cTokenizer:
    """llama2.c BPE over (piece, score) pairs; ids 0, 1, 2 are <unk>, BOS, EOS."""

    UNK, BOS, EOS = 0, 1, 2

    def __init__(self, pieces: list[str], scores: list[float]) -> None:
        self.pieces, self.scores = pieces, scores
        self.ids = {p: i for i, p in enumerate(pieces)}
        self.eos_id = self.EOS
        self.byte_fallback = "<0x00>" in self.ids

    @classmethod
    def from_bin(cls, path: Path, vocab_size: int) -> "Llama2cTokenizer":
        """llama2.c tokenizer.bin: int32 max_token_length, then per token float32 score, int32 len, bytes."""
        data = path.read_bytes()
        off, pieces, scores = 4, [], []
        try:
            for _ in range(vocab_size):
                score, n = struct.unpack_from("<fi", data, off)
                pieces.append(data[off + 8:off + 8 + n].decode("utf-8"))
                scores.append(score)
                off += 8 + n
        except (struct.error, UnicodeDecodeError) as e:
            raise MillisError(f"{path} is not a llama2.c tokenizer.bin for {vocab_size} tokens ({e})") from None
        return cls(pieces, scores)

    @classmethod
    def from_vocab(cls, path: Path) -> "Llama2cTokenizer":
        """SentencePiece `.vocab`: `piece<TAB>score` per id; `▁` is a space (as llama2.c's export writes it)."""
        pieces, scores = [], []
        for line in path.read_text(encoding="utf-8").split("\n"):
            if line:
                piece, score = line.rsplit("\t", 1)
                pieces.append(piece.replace("\u2581", " "))
                scores.append(float(score))
        return cls(pieces, scores)

    def encode(self, text: str) -> list[int]:
        return [self.BOS] + (self._merge(self.symbols(text)) if text else [])

    def symbols(self, text: str) -> list[int]:
        """The ids before any merge: the dummy-prefix space, then one per character (its UTF-8 bytes
        where the vocabulary has byte fallback and not the character, else <unk>)."""
        toks = [self.ids[" "]] if " " in self.ids else []  # the dummy prefix SentencePiece adds
        for ch in text:
            if ch in self.ids:
                toks.append(self.ids[ch])
            elif self.byte_fallback:
                toks.extend(b + 3 for b in ch.encode("utf-8"))  # <0x00> is id 3
            else:
                toks.append(self.UNK)
        return toks

    def _merge(self, toks: list[int]) -> list[int]:
        """run.c's merge loop in O(n log n): each round merges the adjacent pair whose merged piece
        scores highest, the leftmost one on ties (run.c's strict `>` scanning left to right).

        Symbols form a doubly linked list over their first positions, so a merged symbol keeps its
        left part's position and positions stay in text order. A heap holds every adjacent pair
        that merges, keyed by (-score, left position): its smallest live entry is exactly run.c's
        choice, whether the pair is old or was made by the last merge. Entries made stale by a merge
        (either side changed or gone) are skipped when popped."""
        n = len(toks)
        nxt = list(range(1, n + 1))  # n: the end
        prv = list(range(-1, n - 1))  # -1: the start
        merges: dict[tuple[int, int], tuple[float, int] | None] = {}  # token pair -> (-score, merged id)

        def entry(left: int, right: int) -> tuple | None:
            pair = toks[left], toks[right]
            m = merges.get(pair, 0)
            if m == 0:
                j = self.ids.get(self.pieces[pair[0]] + self.pieces[pair[1]])
                # run.c's floor for `best_score`: a pair scoring -1e10 or less never merges
                m = merges[pair] = (-self.scores[j], j) if j is not None and self.scores[j] > -1e10 else None
            return None if m is None else (m[0], left, right, *pair, m[1])

        heap = [e for i in range(n - 1) if (e := entry(i, i + 1))]
        heapq.heapify(heap)
        while heap:
            _, left, right, tl, tr, j = heapq.heappop(heap)
            if toks[left] != tl or toks[right] != tr or nxt[left] != right:
                continue  # stale: a side merged since (a gone symbol's token is -1)
            toks[left], toks[right] = j, -1
            after = nxt[left] = nxt[right]
            if after < n:  # the merged symbol's two new pairs
                prv[after] = left
                if e := entry(left, after):
                    heapq.heappush(heap, e)
            if prv[left] >= 0 and (e := entry(prv[left], left)):
                heapq.heappush(heap, e)
        out, i = [], 0  # position 0 is never merged away: merges keep the left symbol
        while i < n:
            out.append(toks[i])
            i = nxt[i]
        return out

    def token_name(self, i: int) -> str:
        """The vocabulary's entry for id i ("<s>", "<0x0A>"; a space as stored), "" past the vocabulary."""
        return self.pieces[i] if 0 <= i < len(self.pieces) else ""

    def token_bytes(self, i: int) -> bytes:
        """The bytes token i adds to a text: a <0xXX> piece its byte, BOS / EOS none."""
        if i in (self.BOS, self.EOS) or not 0 <= i < len(self.pieces):
            return b""
        m = _BYTE.match(self.pieces[i])
        return bytes([int(m.group(1), 16)]) if m else self.pieces[i].encode("utf-8")

    def decode(self, ids: list[int]) -> str:
        out = bytearray()
        prev = None
        for i in ids:
            if i in (self.BOS, self.EOS):
                prev = i
                continue
            raw = self.token_bytes(i)
            if prev == self.BOS and raw.startswith(b" "):
                raw = raw[1:]  # the dummy prefix
            out += raw
            prev = i
        return out.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    def __init__(self, path: Path) -> None:
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        self.eos_id = self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return [self._sp.bos_id()] + self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def token_name(self, i: int) -> str:
        return self._sp.id_to_piece(i) if 0 <= i < self._sp.get_piece_size() else ""

    def token_bytes(self, i: int) -> bytes:
        if not 0 <= i < self._sp.get_piece_size() or self._sp.is_control(i):
            return b""
        if self._sp.is_unknown(i):  # its surface, as decode writes it
            return self._sp.decode([i]).encode()
        piece = self._sp.id_to_piece(i)
        if self._sp.is_byte(i) and (m := _BYTE.match(piece)) is not None:
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode()


def llama2c_tokenizer(folder: Path, model_file: Path, vocab_size: int):
    """The tokenizer next to a llama2.c checkpoint: tokenizer .bin, else .model (sentencepiece), else .vocab."""
    from millis.gen.llama2c import is_llama2c_checkpoint

    bins = [p for p in sorted(folder.glob("*.bin")) if p != model_file and not is_llama2c_checkpoint(p)]
    if bins:
        return Llama2cTokenizer.from_bin(bins[0], vocab_size)
    models = sorted(folder.glob("*.model"))
    if models:
        try:
            return SentencePieceTokenizer(models[0])
        except ImportError:
            pass
    vocabs = sorted(folder.glob("*.vocab"))
    if vocabs:
        return Llama2cTokenizer.from_vocab(vocabs[0])
    return None


def text_delta(tok: Tokenizer, context: list[int], ids: list[int]) -> str:
    """The text `ids` add after `context` (a few ids before them): decoding them alone would lose a
    leading space in SentencePiece-style tokenizers."""
    head = tok.decode(context)
    full = tok.decode(context + ids)
    return full[len(head):] if full.startswith(head) else tok.decode(ids)


def prompt_char_limit(tok: Tokenizer | None, max_seq: int) -> int:
    """Most characters of a prompt that could still fit `max_seq` tokens: each token covers at most
    its longest piece's characters (a byte-level piece covers at least one byte per character), so
    a longer text can be refused before any tokenizing work. Doubled for normalizers that drop text."""
    if isinstance(tok, Llama2cTokenizer):
        longest = max(map(len, tok.pieces), default=1)
    elif isinstance(tok, HFTokenizer):
        longest = tok.longest_piece
    else:
        longest = 64
    return max(1, longest) * max_seq * 2
