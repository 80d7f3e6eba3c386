"""`millis generate`: flags into a GenerateConfig, one prompt through the engine, tokens as they come."""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from millis.cli.flags import Command, Given

if TYPE_CHECKING:
    from millis.gen.config import GenerateConfig


def groups() -> tuple[type, ...]:
    from millis.gen.config import GenerateConfig  # imports torch: only for this command

    return (GenerateConfig,)


def config(given: Given) -> GenerateConfig:
    from millis.gen.config import GenerateConfig

    return given.build(GenerateConfig)


def run(cfg: GenerateConfig) -> int:
    from millis.gen import generate

    def emit(text: str) -> None:
        print(text, end="", flush=True)

    head = cfg.prompt + ("\n" if cfg.chat else "")  # a chat answer on its own line
    if cfg.stream:
        emit(head)
    res = generate(cfg, on_text=emit if cfg.stream else None)
    print("" if cfg.stream else head + res.text)
    print(f"[{len(res.prompt_ids)} prompt + {len(res.token_ids)} new tokens, finished: {res.finished}; "
          f"load {res.load_s:.2f} s, prefill {res.prefill_ms:.1f} ms, decode {res.decode_ms_per_token:.2f} ms/token]",
          file=sys.stderr)
    return 0


COMMAND = Command("generate", "continue a prompt with a decoder (GGUF, HF Llama/Mistral/Qwen2/GPT-2 or llama2.c)",
                  groups, config, run, positionals=("model",))
