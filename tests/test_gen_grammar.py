"""Constrained decoding (millis/gen/grammar.py): every output of a JSON-schema request parses and
validates, sampled or greedy, alone or beside other requests, with byte-level BPE and SentencePiece
vocabularies; unconstrained batch-mates are untouched; a bad schema is a clear error."""
import json

import jsonschema
import pytest
from gguf_fixtures import random_llama_tensors, write_tiny_gguf

from millis.common.errors import MillisError
from millis.gen import EngineConfig, SamplingParams, open_engine
from millis.gen.config import LlamaConfig
from millis.gen.engine import run_all
from millis.gen.grammar import json_schema_grammar

CFG = LlamaConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq=512, hidden_dim=128,
                  norm_eps=1e-5, rope_theta=10000.0)
SCHEMA = {"type": "object", "properties": {
    "kind": {"enum": ["cat", "dog", "bird"]}, "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "ok": {"type": "boolean"}, "name": {"type": "string", "maxLength": 6},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["kind", "age", "ok", "name", "tags"], "additionalProperties": False}
PROMPT = [1, 40, 41, 42, 43]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_path(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("grammar") / f"tiny-{request.param}.gguf")
    write_tiny_gguf(path, CFG, random_llama_tensors(CFG, "Q8_0", embed_qtype="Q8_0"), tokenizer=request.param)
    return path


def texts(eng, prompts, params_list) -> list[tuple[str, str]]:
    ids = [eng.add(p, sp) for p, sp in zip(prompts, params_list)]
    got = {i: ["", None] for i in ids}
    while eng.has_work:
        for o in eng.step():
            got[o.id][0] += o.text
            if o.finished:
                got[o.id][1] = o.finished
    return [tuple(got[i]) for i in ids]


def test_every_sampled_output_parses_and_validates(model_path):
    eng = open_engine(model_path, EngineConfig(max_batch=4, max_seq=512, threads=2))
    g = json_schema_grammar(SCHEMA)
    params = [SamplingParams(max_tokens=300, temperature=1.0, seed=s, grammar=g) for s in range(12)]
    params.append(SamplingParams(max_tokens=300, grammar=g))  # greedy too
    for text, finished in texts(eng, [PROMPT] * len(params), params):
        assert finished == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert not eng.requests and eng.free_slots == eng.max_batch


def test_json_object_is_an_object(model_path):
    eng = open_engine(model_path, EngineConfig(max_batch=2, max_seq=512, threads=2))
    g = json_schema_grammar(None)
    schema = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["x"], "additionalProperties": False}
    for text, finished in texts(eng, [PROMPT] * 2, [SamplingParams(max_tokens=400, temperature=0.7, seed=s,
                                                                   grammar=g if s else json_schema_grammar(schema))
                                                    for s in range(2)]):
        if finished == "stop":  # an open object may run to max_tokens on random weights
            assert isinstance(json.loads(text), dict)
        else:
            assert finished == "length" and text.startswith("{")


def test_unconstrained_batch_mates_are_untouched(model_path):
    eng = open_engine(model_path, EngineConfig(max_batch=3, max_seq=512, threads=2))
    plain = SamplingParams(max_tokens=12, ignore_eos=True)
    prompts = [[1, 50, 51], [1, 60, 61, 62]]
    want = run_all(eng, prompts, plain)
    g = json_schema_grammar(SCHEMA)
    ids = [eng.add(p, plain) for p in prompts] + [eng.add(PROMPT, SamplingParams(max_tokens=300, grammar=g))]
    got = {i: [] for i in ids}
    while eng.has_work:
        for o in eng.step():
            got[o.id] += o.token_ids
    assert [got[i] for i in ids[:2]] == want


def test_greedy_constrained_output_does_not_depend_on_speculation(model_path):
    g = json_schema_grammar(SCHEMA)
    outs = []
    for k in (0, 4):
        eng = open_engine(model_path, EngineConfig(max_batch=2, max_seq=512, threads=2, speculate=k))
        outs.append(texts(eng, [PROMPT], [SamplingParams(max_tokens=300, grammar=g)]))
    assert outs[0] == outs[1]


def test_bad_schemas_are_clear_errors(model_path):
    eng = open_engine(model_path, EngineConfig(max_batch=1, max_seq=512, threads=2))
    with pytest.raises(MillisError, match="grammar cannot be used"):
        eng.add(PROMPT, SamplingParams(grammar=json_schema_grammar({"type": "no-such-type"})))
    with pytest.raises(MillisError, match="must be an object"):
        json_schema_grammar([1, 2])
    assert not eng.requests and not eng.waiting
