"""A generation server's chat templates: the model's default one, its tool_use one where it has one apart
(Hermes, Command-R: apply_chat_template renders a request with tools through it), the special tokens they read,
and each one's tool format (its own call syntax, fitted to the roles it shows)."""
from __future__ import annotations

from millis.gen.chat_template import chat_template_of, compiled, render_chat, tool_use_template_of
from millis.serve.generation.conversation import probe_roles
from millis.serve.generation.tool_formats import GenericFormat, tool_format


class ChatTemplates:
    def __init__(self, artifact: str, override: str = ""):
        self.template, self.special = chat_template_of(artifact, override)
        # none beside a --chat-template file: the file is the template for every request
        self.tool_template = tool_use_template_of(artifact) if self.template and not override else None
        self.format: GenericFormat = tool_format(None)  # once opened: the default template's
        self.tool_use_format: GenericFormat | None = None  # ... and the tool_use template's

    def opened(self, eng) -> None:
        """With the engine loaded: a GGUF file's own templates where the folder had none; the model's BOS / EOS text
        for any template (a --chat-template file beside a GGUF has no tokenizer_config.json to name them; a
        tokenizer_config's own come first); each template compiled (a syntax error fails the load; rendering is
        each request's, so a template that cannot render a turn refuses that request) and its roles probed."""
        if self.template is None and eng.chat_template:
            self.template, self.tool_template = eng.chat_template, getattr(eng, "tool_template", None)
        self.special = {**dict(eng.special_tokens or {}), **self.special}
        if self.template is not None:
            compiled(self.template)
            self.format = tool_format(self.template, probe_roles(self.template, self.special))
        if self.tool_template is not None:
            compiled(self.tool_template)
            self.tool_use_format = tool_format(self.tool_template, probe_roles(self.tool_template, self.special))

    def render(self, g) -> str:
        """Chat request `g`'s prompt text (gs.GenRequest: its messages, tools, variables, template)."""
        return render_chat(self.tool_template if g.tool_use else self.template, g.messages, self.special,
                           g.template_tools, g.template_vars, g.end)
