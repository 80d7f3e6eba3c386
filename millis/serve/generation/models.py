"""Which models the generation server serves (the encoder server serves the rest)."""
from __future__ import annotations

import json
from pathlib import Path

from millis.gen.gguf import is_gguf


def is_generation_model(path: str | Path) -> bool:
    """A GGUF file, a HF directory of a model_type millis.gen loads (not one laid out as a sentence-transformers
    embedder: modules.json), or a llama2.c checkpoint (or a dir with one)."""
    from millis.encoder.source import declares_pooling
    from millis.gen.config import MODEL_TYPES

    p = Path(path)
    if is_gguf(p):
        return True
    if p.is_dir() and (p / "config.json").is_file():
        if declares_pooling(p):  # Qwen3-Embedding, e5-mistral: a decoder embedder (millis.gen.embedder)
            return False
        try:
            return json.loads((p / "config.json").read_text()).get("model_type") in MODEL_TYPES
        except (ValueError, AttributeError):
            return False
    bins = [p] if p.is_file() else sorted(p.glob("*.bin")) if p.is_dir() else []
    if not bins:
        return False
    from millis.gen.load import is_llama2c_checkpoint

    return any(is_llama2c_checkpoint(b) for b in bins)
