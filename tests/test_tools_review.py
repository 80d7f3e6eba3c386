"""A tool-calling review (2026-12-06): schemas whose grammar check is exponential refused before compiling, failed
compiles not paid again, arguments always an object and always JSON, a named function called once."""
from __future__ import annotations

import time

import pytest

from millis.common.errors import MillisError
from millis.gen.grammar import MAX_INTERSECTED_PATTERNS, json_schema_grammar
from millis.serve.generation.tools import is_json
from millis.serve.generation.tool_formats import HERMES
from millis.serve.generation.tools import ToolSpec, tool_spec
from millis.serve.schemas import ApiError


def patterned(n: int) -> dict:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return {"type": "object", "required": ["x"],
            "properties": {"x": {"allOf": [{"type": "string", "pattern": f".*{c}.*"} for c in letters[:n]]}}}


def test_many_intersected_patterns_are_refused_before_compiling():
    """22 one-letter patterns under allOf held a compile thread 225 s (18: 5 s); past the bound the schema is
    refused at once, naming the count; at the bound it compiles."""
    t0 = time.perf_counter()
    with pytest.raises(MillisError, match=f"{MAX_INTERSECTED_PATTERNS + 1} string patterns"):
        json_schema_grammar(patterned(MAX_INTERSECTED_PATTERNS + 1))
    with pytest.raises(MillisError, match="string patterns"):  # nested allOf and format count too
        json_schema_grammar({"allOf": [patterned(5)["properties"]["x"], {"allOf": [
            {"type": "string", "format": "email"}, *patterned(4)["properties"]["x"]["allOf"]]}]})
    assert time.perf_counter() - t0 < 5  # refused, not compiled (a compile of 22 took minutes)
    assert json_schema_grammar(patterned(MAX_INTERSECTED_PATTERNS))


def test_a_failed_compile_is_not_paid_again(monkeypatch, tmp_path):
    """A grammar that fails to compile fails again from the cache: a retry (or a flood of them) runs no compile."""
    import llguidance

    from gguf_fixtures import random_llama_tensors, write_tiny_gguf
    from millis.gen import EngineConfig, open_engine
    from millis.gen.config import LlamaConfig

    cfg = LlamaConfig(vocab_size=320, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, max_seq=64, hidden_dim=64,
                      norm_eps=1e-5, rope_theta=10000.0)
    write_tiny_gguf(tmp_path / "m.gguf", cfg, random_llama_tensors(cfg, "F32"), tokenizer="llama")
    grammars = open_engine(str(tmp_path / "m.gguf"), EngineConfig(max_batch=1, max_seq=64, threads=1)).grammars
    bad = '%llguidance {}\nstart: "a" undefined_rule\n'  # compiles to an error
    real, made = llguidance.LLMatcher, []

    def counting(*a, **k):
        made.append(1)
        return real(*a, **k)
    monkeypatch.setattr(llguidance, "LLMatcher", counting)
    for _ in range(3):
        with pytest.raises(MillisError, match="cannot be used") as e:
            grammars.matcher(bad)
        assert len(str(e.value)) < 2100
    assert len(made) == 1


def spec(params=None, choice=None, **kw) -> ToolSpec:
    f = {"name": "get_weather", **({"parameters": params} if params is not None else {})}
    return tool_spec({"tools": [{"type": "function", "function": f}], **({"tool_choice": choice} if choice else {}),
                      **kw})


def test_parameters_describe_an_object():
    """A parameters schema of another type (OpenAI answers 400) had the grammar force arguments "Paris" or true."""
    with pytest.raises(ApiError, match=r"tools\[0\].function.parameters must describe an object"):
        spec({"type": "string"})
    assert spec({}).tools[0]["parameters"] == {"type": "object"}  # no type: still an object
    assert spec({"properties": {"city": {"type": "string"}}}).tools[0]["parameters"]["type"] == "object"
    with pytest.raises(ApiError, match=r"tools\[0\]"):  # OpenAI's name pattern: no dots
        tool_spec({"tools": [{"type": "function", "function": {"name": "a.b"}}]})


def test_a_named_function_is_called_once():
    named = spec({}, {"type": "function", "function": {"name": "get_weather"}})
    assert named.required and not named.parallel
    assert spec({}, "required").parallel  # parallel unless the request says false


def test_arguments_with_nan_or_infinity_are_no_json():
    """Python reads NaN and Infinity; JSON and its clients do not: such a call is content, not tool_calls."""
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"x": NaN, "y": Infinity}}\n</tool_call>'
    _, calls = HERMES.parse(text, spec({}))
    assert calls == [] and not is_json('{"x": NaN}') and is_json('{"x": 1.5e300}')


def test_a_required_answer_cut_by_max_tokens_is_calls_as_streamed():
    """Hermes and Llama 3 syntaxes under tool_choice required: an answer cut among its calls came back as the raw
    `<tool_call>` text with no calls, where the stream had sent them."""
    from millis.serve.generation.tool_formats import LLAMA3

    required = spec({"properties": {"city": {"type": "string"}}}, "required")
    cut = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "A"}}\n</tool_call>\n<tool_call>\n{"name": "get_we'
    content, calls = HERMES.parse(cut, required)
    assert content is None and [c["function"]["name"] for c in calls] == ["get_weather"]
    assert calls[0]["function"]["arguments"] == '{"city": "A"}'
    content, calls = LLAMA3.parse('{"name": "get_weather", "parameters": {"city": "Pa', required)
    assert content is None and calls[0]["function"]["arguments"] == '{"city": "Pa'  # cut: finish stays "length"
    auto = spec({"properties": {"city": {"type": "string"}}})
    assert HERMES.parse("no call here", auto) == ("no call here", [])  # auto: text stays content
