"""Calling a Rust tokenizer (`tokenizers.Tokenizer`) from threads that share the process with a server's event loop.

`Tokenizer.encode` holds the GIL for its whole run; `encode_batch` lets go of it. A 900 KB text took 338 ms in
`encode`, and another thread waited 337 ms of it (ad hoc, Zen 4): an encoder or chat server tokenizing a long body
off its event loop still stopped the loop that long. Few short texts still go one by one (encode_batch wakes the
tokenizer's thread pool: more than the work itself at a few words).
"""
from __future__ import annotations

from typing import Any

# texts of more characters than this in all: encode_batch (off the GIL); a server tokenizes bodies this long off its
# event loop (millis.serve.http.INLINE_TOKENIZE_CHARS)
GIL_FREE_CHARS = 2048


def encode_all(tok: Any, texts: list, special: bool) -> list[Any]:
    """tok's encodings of texts, each a str or a (text, pair) tuple (its own truncation and padding settings apply),
    one by one for up to 8 texts of GIL_FREE_CHARS in all, else by encode_batch."""
    chars = sum(len(t) if isinstance(t, str) else len(t[0]) + len(t[1]) for t in texts)
    if len(texts) <= 8 and chars <= GIL_FREE_CHARS:
        return [tok.encode(t, add_special_tokens=special) if isinstance(t, str) else
                tok.encode(t[0], t[1], add_special_tokens=special) for t in texts]
    return tok.encode_batch(texts, add_special_tokens=special)
