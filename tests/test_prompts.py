"""TEI's `prompt_name`: a model's sentence-transformers prompts (config_sentence_transformers.json, Qwen3-Embedding's
"query" instruction) put before each text on /embed, /embed_all, /embed_sparse and /tokenize and by Model.embed, as
sentence-transformers' encode(prompt_name=) puts them; kept by the artifact beside its tokenizer; a name the model
lacks, token ids with a prompt, and the routes that put none answer 422 naming prompt_name."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from starlette.testclient import TestClient

from millis.common.config import Shape
from millis.common.errors import MillisError
from millis.encoder.tiny import QUERY_PROMPT, build_tiny
from millis.kernels.native import native_isa

TEXTS = ["where is my card?", "the exchange rate I was given for my transfer looks wrong to me"]


@pytest.fixture(scope="module")
def qwen3_artifact(tmp_path_factory, quick_measure):
    from millis.artifact.model import open_model
    from millis.optimize.config import OptimizeConfig
    from millis.optimize.pipeline import optimize

    variant = "native-fp32" if native_isa() else "ort-fp32-fused"
    out = optimize(OptimizeConfig(source=str(build_tiny("qwen3")), task="embed", out=str(tmp_path_factory.mktemp("a")),
                                  target=Shape(1, 16), variants=(variant,), measure=quick_measure))
    return open_model(out)


def served(model):
    from millis.serve.config import ServeConfig
    from millis.serve.encoder import app as appmod

    client = TestClient(appmod.create_app(ServeConfig(artifact="x", model_name="m"), lambda: model, task="embed"))
    client.__enter__()
    deadline = time.time() + 60
    while client.get("/ready").status_code != 200 and time.time() < deadline:
        time.sleep(0.02)
    return client


def test_prompts_are_put_before_texts_as_sentence_transformers_puts_them(qwen3_artifact):
    from sentence_transformers import SentenceTransformer

    from millis.encoder.text import PROMPTS_FILE

    model = qwen3_artifact
    assert (model.path / "tokenizer" / PROMPTS_FILE).is_file()  # the artifact keeps its source's prompts
    assert model.encoder.prompts == {"query": QUERY_PROMPT, "document": ""}
    st = SentenceTransformer(str(build_tiny("qwen3")), device="cpu")
    want = st.encode(TEXTS, prompt_name="query", convert_to_numpy=True)
    plain = st.encode(TEXTS, convert_to_numpy=True)
    assert np.abs(want - plain).max() > 0.05  # the prompt changes the vectors: the test can fail
    np.testing.assert_allclose(model.embed(TEXTS, prompt_name="query"), want, atol=1e-4)
    np.testing.assert_allclose(model.embed(TEXTS, prompt_name="document"), plain, atol=1e-4)
    with pytest.raises(MillisError, match="'passage' is not a prompt of this model: one of 'query', 'document'"):
        model.embed(TEXTS, prompt_name="passage")
    client = served(model)
    try:
        r = client.post("/embed", json={"inputs": TEXTS, "prompt_name": "query"})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json()), want, atol=1e-4)
        r = client.post("/embed", json={"inputs": TEXTS})
        np.testing.assert_allclose(np.array(r.json()), plain, atol=1e-4)
        r = client.post("/embed_all", json={"inputs": TEXTS[0], "prompt_name": "query"})
        ids = model.encoder.token_ids([QUERY_PROMPT + TEXTS[0]])[0][0]
        assert r.status_code == 200 and len(r.json()[0]) == len(ids), r.text
        r = client.post("/tokenize", json={"inputs": TEXTS[0], "prompt_name": "query"})
        assert [t["id"] for t in r.json()[0]] == ids
        assert client.get("/info").json()["prompts"] == {"query": QUERY_PROMPT, "document": ""}
        r = client.post("/similarity", json={"inputs": {"source_sentence": TEXTS[0], "sentences": TEXTS[1:]},
                                             "parameters": {"prompt_name": "query"}})
        assert r.status_code == 200 and np.isclose(r.json()[0], want[0] @ want[1], atol=1e-4), r.text
        spec = client.get("/openapi.json").json()["paths"]
        for route in ("/embed", "/embed_all", "/tokenize"):
            assert "prompt_name" in json.dumps(spec[route]), route
        for route, body, says in (
                ("/embed", {"inputs": TEXTS, "prompt_name": "passage"}, "one of 'query', 'document'"),
                ("/embed", {"inputs": TEXTS, "prompt_name": 3}, "must be a string"),
                ("/embed", {"inputs": [[5, 6, 7]], "prompt_name": "query"}, "not before token ids"),
                ("/tokenize", {"inputs": "a", "prompt_name": "passage"}, "not a prompt of this model"),
                ("/v1/embeddings", {"input": "a", "model": "m", "prompt_name": "query"}, "not supported on this"),
                ("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]},
                                 "parameters": {"prompt_name": "passage"}}, "one of 'query', 'document'"),
                ("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]}, "prompt_name": "query"},
                 "not supported on this"),  # (TEI reads it under parameters only)
                ("/tokenize", {"input": "a", "prompt_name": "query"}, "not supported on this")):  # millis's shape
            r = client.post(route, json=body)
            err = r.json()
            status = 400 if route.startswith("/v1/") or "input" in body else 422  # (OpenAI's and millis's shapes)
            assert r.status_code == status, (route, body, r.text)
            text = json.dumps(err)
            assert says in text and "prompt_name" in text, (route, err)
    finally:
        client.__exit__(None, None, None)


def test_a_model_without_prompts_names_none(tmp_path, quick_measure):
    from millis.artifact.model import open_model

    model = open_model(str(build_tiny("qwen2")))  # a source folder served as torch fp32
    assert model.encoder.prompts == {}
    with pytest.raises(MillisError, match="it has none"):
        model.embed(TEXTS, prompt_name="query")
    client = served(model)
    try:
        r = client.post("/embed", json={"inputs": TEXTS, "prompt_name": "query"})
        assert r.status_code == 422 and "it has none" in r.text, r.text
    finally:
        client.__exit__(None, None, None)
