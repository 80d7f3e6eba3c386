"""What a chat template is given (millis.serve.generation.conversation and the chat request's parser): the model's
BOS / EOS text under a --chat-template file, tool results with the ids templates check, templates without a tool
or system role (llama.cpp's polyfills), reasoning fields, chat_template_kwargs. Rendered with the server's own
steps (chat_request -> the format's conversation -> render_chat), no model needed."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from millis.common.errors import MillisError
from millis.gen.chat_template import render_chat
from millis.serve.generation import schemas as gs
from millis.serve.generation.conversation import ALL_ROLES, Roles, probe_roles
from millis.serve.generation.tool_formats import GENERIC, tool_format
from millis.serve.schemas import ApiError

LIMITS = gs.GenLimits(16, 4096, 100_000)
CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "abc123XYZ", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
RESULT = {"role": "tool", "tool_call_id": "abc123XYZ", "name": "get_weather", "content": "22C sunny"}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
# Phi-3's shape: a role it does not know is skipped without a word
SKIPS_TOOL = ("{% for m in messages %}{% if m.role in ['system', 'user', 'assistant'] %}<|{{ m.role }}|>{{ m.content }}"
              "<|end|>{% endif %}{% endfor %}<|assistant|>")
# Gemma's shape: no system role, and user / model must alternate
NO_SYSTEM = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not "
             "supported') }}{% endif %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception("
             "'Conversation roles must alternate user/model/user/model/...') }}{% endif %}<start_of_turn>"
             "{{ 'model' if m.role == 'assistant' else m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}"
             "<start_of_turn>model\n")
# Mistral's check of a tool result's id
CHECKS_ID = ("{% for m in messages %}{% if m.role == 'tool' %}{% if m.tool_call_id is not defined or "
             "m.tool_call_id|length != 9 %}{{ raise_exception('Tool call IDs should be alphanumeric strings with "
             "length 9!') }}{% endif %}[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]{% else %}[{{ m.role }}]"
             "{{ m.content }}{% endif %}{% endfor %}")
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.reasoning_content %}<think>{{ m.reasoning_content }}"
          "</think>{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
          "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def rendered(template: str, body: dict, special: dict | None = None) -> str:
    special = special or {"bos_token": "<bos>"}
    g = gs.chat_request(body, "m", LIMITS, tool_format(template, probe_roles(template, special)))
    return render_chat(template, g.messages, special, g.template_tools, g.template_vars, g.end)


def test_roles_are_probed():
    assert probe_roles(CHATML, {}) == ALL_ROLES
    assert probe_roles(SKIPS_TOOL, {}) == Roles(system=True, tool=False, developer=False)
    assert probe_roles(NO_SYSTEM, {"bos_token": "<bos>"}) == Roles(system=False, tool=False, developer=False)
    assert probe_roles(CHECKS_ID, {}) == ALL_ROLES  # its id check passes the probe's 9-character id
    assert tool_format(CHATML, ALL_ROLES) is GENERIC


def test_a_template_without_a_tool_role_still_shows_the_result():
    text = rendered(SKIPS_TOOL, {"messages": [{"role": "user", "content": "Weather in Paris?"}, CALL, RESULT]})
    assert '"tool_response": {"tool": "get_weather", "content": "22C sunny", "tool_call_id": "abc123XYZ"}' in text, text
    assert text.index("Weather in Paris?") < text.index("get_weather") < text.index("22C sunny")


def test_a_template_without_a_system_role_gets_it_in_the_first_user_turn():
    msgs = [{"role": "user", "content": "Weather in Paris?"}, CALL, RESULT, {**RESULT, "content": "windy"}]
    text = rendered(NO_SYSTEM, {"messages": msgs, "tools": TOOLS})  # tools: the generic format's system text
    first = text.split("<start_of_turn>user\n", 1)[1]
    assert first.startswith("You can call these tools:") and "Weather in Paris?" in first.split("<end_of_turn>")[0]
    # two results in a row are one user turn: the roles still alternate
    assert text.count("<start_of_turn>user") == 2 and "22C sunny" in text and "windy" in text, text
    text = rendered(NO_SYSTEM, {"messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "hi"}]})
    assert "<start_of_turn>user\nBe brief.\n\nhi<end_of_turn>" in text, text


def test_a_tool_result_keeps_the_id_its_template_checks():
    text = rendered(CHECKS_ID, {"messages": [{"role": "user", "content": "Weather?"}, CALL, RESULT]})
    assert "[TOOL_RESULTS]22C sunny[/TOOL_RESULTS]" in text, text


def test_reasoning_fields_and_template_variables_reach_the_template():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "reasoning_content": "greet"},
            {"role": "user", "content": "again"}]
    assert "<think>greet</think>hello" in rendered(CHATML, {"messages": msgs})
    off = rendered(CHATML, {"messages": msgs, "chat_template_kwargs": {"enable_thinking": False}})
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert rendered(CHATML, {"messages": msgs}).endswith("<|im_start|>assistant\n")
    deep: list = []
    for _ in range(200):
        deep = [deep]
    for bad in ({"messages": []}, {"bos_token": "x"}, [1], {"a b": 1}, {"_x": 1}, {"x": deep}):
        with pytest.raises(ApiError) as e:
            gs.chat_request({"messages": msgs, "chat_template_kwargs": bad}, "m", LIMITS)
        assert e.value.status == 422 and e.value.param == "chat_template_kwargs", bad


def test_a_template_file_beside_a_gguf_gets_the_models_bos_and_eos(tmp_path):
    """--chat-template FILE with a GGUF (no tokenizer_config.json beside it): bos_token / eos_token are the
    model's, as llama.cpp gives them; a template that cannot render without tools no longer fails the load."""
    from millis.serve.config import ServeConfig
    from millis.serve.generation.app import GenState

    t = tmp_path / "t.jinja"
    t.write_text("{% for x in tools %}{{ x }}{% endfor %}{{ bos_token }}{% for m in messages %}{{ m.content }}"
                 "{{ eos_token }}{% endfor %}")
    (tmp_path / "model.gguf").write_bytes(b"")
    eng = SimpleNamespace(chat_template="{{ messages }}", special_tokens={"bos_token": "<s>", "eos_token": "</s>"})
    st = GenState(ServeConfig(artifact=str(tmp_path / "model.gguf"), chat_template=str(t), warmup=False),
                  lambda: eng)
    assert st._open() is eng and st.chat.special == {"bos_token": "<s>", "eos_token": "</s>"}
    assert render_chat(st.chat.template, [{"role": "user", "content": "hi"}], st.chat.special, tools=[]) == "<s>hi</s>"


HERMES_TOOL_USE = ("<|im_start|>system\nYou are a function calling AI model.<tools>{% for t in tools %}{{ t | tojson }}"
                   "{% endfor %}</tools> Use <tool_call> tags.<|im_end|>\n{% for m in messages %}<|im_start|>"
                   "{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")


@pytest.mark.parametrize("where", ["tokenizer_config", "additional_chat_templates", "gguf"])
def test_a_request_with_tools_renders_through_the_tool_use_template(tmp_path, where):
    """A model with a tool_use template apart from its default (Hermes, Command-R): a request with tools renders
    through it, with its own call syntax (hermes here), as apply_chat_template picks it; one without, through the
    default; a --chat-template file is the template for every request."""
    import json

    from millis.serve.generation.templates import ChatTemplates
    from millis.serve.generation.tool_formats import HERMES

    eng = SimpleNamespace(chat_template=None, special_tokens={}, tool_template=None)
    if where == "gguf":
        eng.chat_template, eng.tool_template = CHATML, HERMES_TOOL_USE
    elif where == "tokenizer_config":
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
            {"name": "default", "template": CHATML}, {"name": "tool_use", "template": HERMES_TOOL_USE}]}))
    else:
        (tmp_path / "chat_template.jinja").write_text(CHATML)
        (tmp_path / "additional_chat_templates").mkdir()
        (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text(HERMES_TOOL_USE)
    chat = ChatTemplates(str(tmp_path))
    chat.opened(eng)
    assert chat.tool_use_format.name == HERMES.name  # fitted to its roles (it shows no developer message)
    msgs = {"messages": [{"role": "user", "content": "Weather in Paris?"}]}
    g = gs.chat_request({**msgs, "tools": TOOLS}, "m", LIMITS, chat.format, chat.tool_use_format)
    assert g.tool_use and g.tool_format is chat.tool_use_format
    assert chat.render(g).startswith("<|im_start|>system\nYou are a function calling AI model.<tools>")
    g = gs.chat_request({**msgs, "tools": TOOLS, "tool_choice": "none"}, "m", LIMITS, chat.format,
                        chat.tool_use_format)
    assert not g.tool_use and chat.render(g) == "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
    t = tmp_path / "mine.jinja"
    t.write_text(CHATML)
    mine = ChatTemplates(str(tmp_path), str(t))
    mine.opened(SimpleNamespace(chat_template=None, special_tokens={}, tool_template=None))
    assert mine.tool_template is None and mine.tool_use_format is None


def test_continue_final_message_and_add_generation_prompt():
    """vLLM's fields, transformers' arguments: continue_final_message cuts the prompt right after the last
    (assistant) message's text, so the model goes on with it; add_generation_prompt false leaves the header off."""
    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "My answer is "}]
    cont = rendered(CHATML, {"messages": msgs, "continue_final_message": True})
    # the text as the message has it, its trailing space included (transformers: its stripped text only where the
    # template strips it)
    assert cont == "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nMy answer is ", cont
    plain = rendered(CHATML, {"messages": msgs[:1], "add_generation_prompt": False})
    assert plain == "<|im_start|>user\nName a colour.<|im_end|>\n", plain
    for bad in ({"messages": msgs[:1], "continue_final_message": True},
                {"messages": msgs, "continue_final_message": True, "add_generation_prompt": True},
                {"messages": msgs, "continue_final_message": "yes"}):
        with pytest.raises(ApiError) as e:
            gs.chat_request(bad, "m", LIMITS)
        assert e.value.status == 422 and e.value.param == "continue_final_message", bad
    hides = "{% for m in messages %}[{{ m.role }}]{% endfor %}"  # a template that never shows the text
    with pytest.raises(MillisError, match="continue_final_message: the chat template does not show the last message"):
        rendered(hides, {"messages": msgs, "continue_final_message": True})


def test_a_developer_message_is_the_system_message_where_the_template_shows_no_developer_role():
    """OpenAI's developer role is the system message's newer name: Qwen2.5's template (and Phi-3's shape) dropped such a
    message without a word; through Qwen's tool syntax too, with response_format's schema beside it."""
    qwen = (Path(__file__).parent / "data" / "qwen2_5_tools.jinja").read_text()
    msgs = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    for template in (SKIPS_TOOL, qwen):
        assert "Be brief." in rendered(template, {"messages": msgs}), template[:40]
    text = rendered(qwen, {"messages": msgs, "tools": TOOLS, "response_format": {"type": "json_object"}})
    assert "Be brief." in text and "following this schema" in text and "get_weather" in text
    assert "Be brief." in rendered(CHATML, {"messages": msgs}) and "<|im_start|>developer" in rendered(
        CHATML, {"messages": msgs})  # a template that shows the role keeps it


def test_a_native_template_without_a_system_role_takes_the_schema_in_the_first_user_turn():
    """A `<tool_call>` (hermes) template that refuses a system message: response_format's schema, which goes in the
    system message, joins the first user turn (it was a TemplateError: 'System role not supported')."""
    hermes_no_system = "{# writes <tool_call> blocks #}" + NO_SYSTEM
    assert tool_format(hermes_no_system, probe_roles(hermes_no_system, {"bos_token": "<bos>"})).name == "hermes"
    text = rendered(hermes_no_system, {"messages": [{"role": "user", "content": "Weather?"}], "tools": TOOLS,
                                       "response_format": {"type": "json_object"}})
    assert "<start_of_turn>user\n" in text and "following this schema" in text and "Weather?" in text
    assert text.index("following this schema") < text.index("Weather?")


def test_a_later_developer_message_stays_where_the_template_refuses_a_system_turn():
    """Review: a developer message after the first turn became a system turn, which a system-refusing template (Gemma's
    shape) raises on; it stays a developer turn there, as before (the first one still opens the first user turn)."""
    later = [{"role": "user", "content": "hi"}, {"role": "developer", "content": "Be brief."},
             {"role": "user", "content": "again"}]
    text = rendered(NO_SYSTEM, {"messages": later})
    assert "<start_of_turn>developer\nBe brief." in text
    first = rendered(NO_SYSTEM, {"messages": [{"role": "developer", "content": "Be brief."}, *later[:1]]})
    assert first.startswith("<bos><start_of_turn>user\nBe brief.\n\nhi")
