"""Chat templates: where a model's comes from, and rendering it as transformers' `apply_chat_template` does.

`render_chat` renders as transformers' `apply_chat_template` (its Jinja environment, rebuilt in
`compiled`: sandboxed, trim_blocks / lstrip_blocks, `raise_exception`, `strftime_now`) with the
tokenizer config's special tokens as variables and `add_generation_prompt=True`; the text is then
tokenized without added special tokens.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
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
    return named_template(tc.get("chat_template"), "default"), special


def named_template(t, name: str) -> str | None:
    """tokenizer_config.json's `chat_template`: one template (the default), or a list of {name, template}."""
    if isinstance(t, list):
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == name), None)
    elif name != "default":
        t = None
    return t if isinstance(t, str) and t else None


def tool_use_template_of(model: str | Path) -> str | None:
    """The model's template for requests with tools, where it has one apart from its default (Hermes, Command-R):
    tokenizer_config.json's `chat_template` list entry "tool_use", or additional_chat_templates/tool_use.jinja
    (as transformers saves it). apply_chat_template renders with it whenever tools are given."""
    folder = Path(model) if Path(model).is_dir() else Path(model).parent
    if (folder / "additional_chat_templates" / "tool_use.jinja").is_file():
        return (folder / "additional_chat_templates" / "tool_use.jinja").read_text()
    f = folder / "tokenizer_config.json"
    return named_template(json.loads(f.read_text()).get("chat_template"), "tool_use") if f.is_file() else None


@functools.lru_cache(maxsize=16)
def compiled(template: str):
    """`template` compiled as transformers compiles chat templates (its environment, rebuilt here so that a
    server does not import transformers, ~1 s of its start): a sandbox that also refuses to change
    objects, trim_blocks / lstrip_blocks, loop controls, the `{% generation %}` tag (renders its body),
    `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, and `dict` / `namespace`
    that refuse underscore names. tests/test_gen_tokenizer.py compares it with transformers' renderer."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("body"), [], [], body).set_lineno(lineno)

        def body(self, caller) -> str:
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def check(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot store underscore-prefixed attributes "
                                                  f"on a namespace, got {name!r}")

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=TemplateDict(), namespace=TemplateNamespace)
    return env.from_string(template)


REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' aliases, first the standard one


def render_chat(template: str, messages: list[dict], special: dict[str, str], tools: list | None = None,
                variables: dict | None = None, end: str = "generation") -> str:
    """The conversation through `template`, as transformers renders it (`tools`: OpenAI function tools, for
    templates that show them; `variables`: the template's own, such as enable_thinking, as apply_chat_template's
    keyword arguments). `end`: "generation" (add_generation_prompt=True), "none", or "continue"
    (continue_final_message: cut after the last message's text; MillisError where the template does not show it)."""
    chat = []
    for m in messages:
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        chat.append({"thinking": reasoning, **m, "reasoning_content": reasoning} if reasoning is not None else dict(m))
    text = compiled(template).render(**(variables or {}), messages=chat, tools=tools, documents=None,
                                     add_generation_prompt=end == "generation", **special)
    if end != "continue":
        return text
    last = messages[-1].get("content") or ""
    for final in (last, last.strip()):  # as transformers cuts it: the text, else its stripped text
        if final and (i := text.rfind(final)) >= 0:
            return text[:i + len(final)]
    raise MillisError("continue_final_message: the chat template does not show the last message's text")


def encode_rendered(tok, text: str) -> list[int]:
    """Token ids of a rendered template: it writes its own BOS and special tokens (as apply_chat_template
    with add_special_tokens=False), so the tokenizer adds none where it can be told so."""
    import inspect

    if "special" in inspect.signature(tok.encode).parameters:
        return tok.encode(text, special=False)
    return tok.encode(text)
