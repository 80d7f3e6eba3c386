"""Decoders that embed (Qwen3-Embedding, gte-Qwen2, e5-mistral): which model types, and what of their folders millis
refuses rather than computing another embedding than transformers with their own code would. They run causally,
pooled at the last token as their sentence-transformers folders declare (millis.gen.embedder runs them natively)."""
from __future__ import annotations

import json
from pathlib import Path

from millis.common.errors import MillisError

DECODERS = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# the longest text a decoder embeds (its limit, where its positions reach further): the native KV pool's size (a 128k
# context's whole fp32 cache is 34 GB of address space for an 8B, refused where memory is not overcommitted)
MAX_TOKENS = 32768


def check_decoder_folder(path: Path, cfg: dict) -> None:
    """Refuse a decoder folder millis would run otherwise than its own code: attention in both directions
    (`is_causal: false`, gte-Qwen2's remote code reads it), or a tokenizer of its own code (tokenizer_config.json's
    auto_map: gte-Qwen2's adds <|endoftext|> after each text, the token last-token pooling reads; transformers' own
    tokenizer for the model type, loaded without that code, may add none)."""
    if cfg.get("is_causal") is False:
        raise MillisError(f"{path}: config.json sets is_causal false (attention in both directions): millis runs "
                          f"{cfg.get('model_type')} causally, as transformers does")
    tc = Path(path) / "tokenizer_config.json"
    remote = (json.loads(tc.read_text()).get("auto_map") or {}) if tc.is_file() else {}
    if remote:
        raise MillisError(f"{tc}: auto_map names a tokenizer of the model's own code ({remote}), which millis does not "
                          f"run; transformers' own may put other tokens after a text (the one last-token pooling "
                          f"reads): save the tokenizer as its code builds it (tokenizer.json) without auto_map")
