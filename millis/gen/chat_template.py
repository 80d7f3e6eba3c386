"""Chat templates: where a model's comes from, and rendering it as transformers' `apply_chat_template` does.

`render_chat` uses transformers' own Jinja renderer (sandboxed, trim_blocks / lstrip_blocks,
`raise_exception`, `strftime_now`) with the tokenizer config's special tokens as variables and
`add_generation_prompt=True`; the text is then tokenized without added special tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

from millis.common.errors import MillisError

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def chat_template_of(model: str | Path, override: str = "") -> tuple[str | None, dict[str, str]]:
    """(template or None, special tokens the template may use): `override` (a file), else the model's
    chat_template.jinja, else tokenizer_config.json `chat_template` (its "default" when it is a list)."""
    folder = Path(model) if Path(model).is_dir() else Path(model).parent
    f = folder / "tokenizer_config.json"
    tc = json.loads(f.read_text()) if f.is_file() else {}
    special = {k: v["content"] if isinstance(v, dict) else v for k in SPECIAL_TOKENS
               if isinstance(v := tc.get(k), (str, dict))}
    if override:
        if not Path(override).is_file():
            raise MillisError(f"--chat-template {override} does not exist (expected a Jinja template file)")
        return Path(override).read_text(), special
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(), special
    t = tc.get("chat_template")
    if isinstance(t, list):
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    return (t if isinstance(t, str) and t else None), special


def preload_renderer() -> None:
    """Import transformers' Jinja renderer (the slow part of the first render), e.g. on a thread."""
    from transformers.utils.chat_template_utils import render_jinja_template  # noqa: F401


def render_chat(template: str, messages: list[dict], special: dict[str, str]) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    return render_jinja_template([messages], chat_template=template, add_generation_prompt=True, **special)[0][0]


def encode_rendered(tok, text: str) -> list[int]:
    """Token ids of a rendered template: it writes its own BOS and special tokens (as apply_chat_template
    with add_special_tokens=False), so the tokenizer adds none where it can be told so."""
    import inspect

    if "special" in inspect.signature(tok.encode).parameters:
        return tok.encode(text, special=False)
    return tok.encode(text)
