"""TEI's POST /tokenize ({"inputs"}) and POST /decode on the encoder server, in process (Starlette's TestClient over
create_app with tiny:bert), against the HF tokenizer of the same model directory called directly: ids, UTF-8 byte
offsets and their slices, special tokens, no truncation, the decode round trip, and the 4xx answers naming the
field. The tokenizer is the encoder's in both of its forms: through AutoTokenizer (a source dir) and read from
tokenizer.json (`saved`, an artifact's)."""
from __future__ import annotations

import time
from types import SimpleNamespace

import orjson
import pytest
from starlette.testclient import TestClient

from millis.artifact.model import open_model
from millis.encoder.text import TextEncoder
from millis.serve.config import ServeConfig
from millis.serve.encoder import app as appmod
from millis.serve.encoder import tei_tokens

MAX_INPUTS = 4
TEXTS = ["where is my card", "Café naïve 東京 refund!", "the stock markets fell today"]


@pytest.fixture(scope="module", params=["auto", "saved"])
def served(request):
    """(client, model, HF tokenizer of the model's directory)."""
    from transformers import AutoTokenizer

    model = open_model("tiny:bert")
    if request.param == "saved":
        model.encoder = TextEncoder(model.path, model.meta.input_names, model.max_length, saved=True)
    hf = AutoTokenizer.from_pretrained(str(model.path))
    app = appmod.create_app(ServeConfig(artifact="tiny:bert", model_name="m", warmup=False, max_inputs=MAX_INPUTS),
                            lambda: model)
    with TestClient(app) as client:
        for _ in range(300):
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.05)
        yield client, model, hf


def expected(hf, text: str, special: bool) -> list[dict]:
    """TEI's tokens from the HF tokenizer called directly: char offsets made UTF-8 byte offsets."""
    enc = hf(text, add_special_tokens=special, return_offsets_mapping=True, return_special_tokens_mask=True)
    out = []
    for i, (s, t), m in zip(enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"]):
        if m:
            out.append({"id": i, "text": hf.convert_ids_to_tokens(i), "special": True, "start": None, "stop": None})
        else:
            out.append({"id": i, "text": text[s:t], "special": False, "start": len(text[:s].encode()),
                        "stop": len(text[:t].encode())})
    return out


@pytest.mark.parametrize("special", [True, False])
def test_tokens_equal_the_hf_tokenizer_with_byte_offsets(served, special):
    client, model, hf = served
    body = {"inputs": TEXTS} if special else {"inputs": TEXTS, "add_special_tokens": False}
    r = client.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert len(got) == len(TEXTS)
    for text, toks in zip(TEXTS, got):
        assert toks == expected(hf, text, special)
        assert [t["id"] for t in toks] == hf(text, add_special_tokens=special)["input_ids"]
        raw = text.encode()
        for t in toks:
            if not t["special"]:
                assert raw[t["start"]:t["stop"]].decode() == t["text"]  # TEI's offsets: bytes ("é" is 2)
        names = [t["text"] for t in toks if t["special"]]
        assert names == (["[CLS]", "[SEP]"] if special else [])
    chars = hf(TEXTS[1], add_special_tokens=special, return_offsets_mapping=True)["offset_mapping"]
    assert any(t["stop"] != c[1] for t, c in zip(got[1], chars) if not t["special"])  # bytes, not characters


def off_loop_calls(monkeypatch) -> list:
    """The work the app hands to a thread (`offload`), recorded."""
    calls, real = [], appmod.off_loop

    def recording(fn, *args):
        calls.append(fn.__name__)
        return real(fn, *args)

    monkeypatch.setattr(appmod, "off_loop", recording)
    return calls


def test_a_single_string_is_a_list_of_one_and_is_never_truncated(served, monkeypatch):
    client, model, hf = served
    calls = off_loop_calls(monkeypatch)
    one = client.post("/tokenize", json={"inputs": TEXTS[0]}).json()
    assert one == [expected(hf, TEXTS[0], True)] and calls == []
    long = "where is my card " * 130  # past max_length tokens, over 2,048 characters: tokenized in a thread
    got = client.post("/tokenize", json={"inputs": [long, TEXTS[0]]}).json()
    assert calls == ["tokens_of"]
    assert [t["id"] for t in got[0]] == hf(long)["input_ids"]
    assert len(got[0]) > model.max_length
    assert got[1] == expected(hf, TEXTS[0], True)


def test_millis_shape_is_kept_for_input(served):
    client, model, _ = served
    r = client.post("/tokenize", json={"input": [TEXTS[0]]}).json()
    assert r["object"] == "list" and r["data"][0]["tokens"] == model.encoder.token_ids([TEXTS[0]])[0][0]


def test_decode_round_trips_and_equals_the_tokenizer(served, monkeypatch):
    client, model, hf = served
    calls = off_loop_calls(monkeypatch)
    ids = hf(TEXTS[0])["input_ids"]
    r = client.post("/decode", json={"ids": ids})
    assert r.status_code == 200 and r.json() == [TEXTS[0]], r.text  # skip_special_tokens defaults to true
    raw = client.post("/decode", json={"ids": ids, "skip_special_tokens": False}).json()
    assert raw == [hf.decode(ids, skip_special_tokens=False)] and raw[0].startswith("[CLS]")
    rows = [hf(t)["input_ids"] for t in TEXTS]
    assert client.post("/decode", json={"ids": rows}).json() == [hf.decode(r, skip_special_tokens=True) for r in rows]
    assert calls == []
    big = [hf("where is my card " * 150)["input_ids"]] * MAX_INPUTS  # over 2,048 ids: decode_batch in a thread
    assert client.post("/decode", json={"ids": big}).json() == [hf.decode(big[0], skip_special_tokens=True)] * 4
    assert calls == ["decoded"]


@pytest.mark.parametrize("route, body, status, param, says", [
    ("/decode", {"ids": "12"}, 422, "ids", "list"),
    ("/decode", {"ids": [1, "a"]}, 422, "ids", "ids[1]"),
    ("/decode", {"ids": [[1], [2, 1.5]]}, 422, "ids", "ids[1][1]"),
    ("/decode", {"ids": [-1]}, 422, "ids", "ids[0]"),
    ("/decode", {"ids": [10**6]}, 422, "ids", "vocabulary"),
    ("/decode", {"ids": []}, 400, "ids", "empty"),
    ("/decode", {"ids": [[1], []]}, 400, "ids", "ids[1]"),
    ("/decode", {"ids": [[1]] * (MAX_INPUTS + 1)}, 422, "ids", f"at most {MAX_INPUTS}"),
    ("/decode", {}, 422, "ids", "missing"),
    ("/decode", {"ids": [1], "skip_special_tokens": "no"}, 422, "skip_special_tokens", "true or false"),
    ("/tokenize", {"inputs": ["a"] * (MAX_INPUTS + 1)}, 422, "inputs", f"at most {MAX_INPUTS}"),
    ("/tokenize", {"inputs": []}, 400, "inputs", "empty"),
    ("/tokenize", {"inputs": 5}, 422, "inputs", "string"),
    ("/tokenize", {"inputs": "a", "add_special_tokens": "no"}, 422, "add_special_tokens", "true or false"),
    ("/tokenize", {"inputs": "a", "prompt_name": "query"}, 422, "prompt_name", "not a prompt of this model"),
    ("/tokenize", {"inputs": "a", "input": "a"}, 400, "input", "not both"),  # millis's route status, as before
    ("/tokenize", {}, 400, "input", "missing"),
])
def test_bad_requests_name_the_field(served, route, body, status, param, says):
    client = served[0]
    r = client.post(route, json=body)
    assert r.status_code == status, r.text
    got = r.json()
    tei = route == "/decode" or ("inputs" in body and "input" not in body)  # TEI's shape: TEI's error body
    assert isinstance(got["error"], str) == tei, got
    err = {"param": got["param"], "message": got["error"]} if tei else got["error"]
    assert err["param"] == param and says in err["message"], err


def test_a_text_over_teis_character_bound_is_refused(served):
    client, model, _ = served
    n = model.max_length * tei_tokens.MAX_CHAR_MULTIPLIER + 1
    r = client.post("/tokenize", json={"inputs": ["a", "b" * n]})
    assert r.status_code == 422 and r.json()["param"] == "inputs" and r.json()["error_type"] == "validation", r.text
    assert "inputs[1]" in r.json()["error"]


def test_a_tokenizer_without_offsets_gives_null_offsets():
    """A slow transformers tokenizer (no Rust backend): ids and token strings, offsets null."""
    class Slow:
        all_special_ids = [1, 2]

        def convert_ids_to_tokens(self, ids):
            return [f"t{i}" for i in ids]

        def decode(self, ids, skip_special_tokens):
            return " ".join(f"t{i}" for i in ids if not (skip_special_tokens and i in self.all_special_ids))

    enc = SimpleNamespace(tok=Slow(), ids_of=lambda texts, special: [[1, 7, 2] if special else [7] for _ in texts])
    assert tei_tokens.rust_tokenizer(enc) is None
    assert orjson.loads(tei_tokens.tokens_of(enc, ["x"], True)) == [[
        {"id": 1, "text": "t1", "special": True, "start": None, "stop": None},
        {"id": 7, "text": "t7", "special": False, "start": None, "stop": None},
        {"id": 2, "text": "t2", "special": True, "start": None, "stop": None}]]
    given = tei_tokens.decode_request({"ids": [1, 7, 2]}, SimpleNamespace(max_inputs=4), 8)[0]
    assert tei_tokens.decoded(enc, given, 10, True) == ["t7"]


def test_byte_offsets():
    assert tei_tokens.byte_offsets("abc") is None
    assert tei_tokens.byte_offsets("aé東😀") == [0, 1, 3, 6, 10]


def test_a_large_answer_is_built_as_bytes_not_objects(served):
    """A body's worth of tokens (~1M for 1 MB of "!") built as a million dicts cost a full GC pass and their
    freeing with the GIL held (~200 ms of the event loop) and ~0.5 GB: the answer is JSON bytes, and building it
    leaves no more GC-tracked objects than a few per text."""
    import gc

    from millis.serve.encoder import tei_tokens

    client, model, hf = served
    texts = ["! " * 3000, TEXTS[1]]
    gc.collect()
    before = len(gc.get_objects())
    body = tei_tokens.tokens_of(model.encoder, texts, True)
    assert isinstance(body, bytes) and len(gc.get_objects()) - before < 100
    got = orjson.loads(body)
    assert len(got[0]) == 3002 and got[1] == expected(hf, TEXTS[1], True)
