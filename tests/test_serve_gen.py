"""`millis serve` on a decoder: OpenAI completions / chat completions from a real server process,
checked against the `millis.gen` engine run in this process (greedy, fp32)."""
from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import shared_model
from test_serve import Server, _metric

pytestmark = pytest.mark.serve
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CORPUS = ["the cat sat on the mat and the dog ran to the park", "once upon a time there was a little girl",
          "hello how are you today, fine thanks"] * 20
PROMPTS = ["the cat", "once upon a time", "hello how are", "the dog ran to the park and"]
GREEDY = {"temperature": 0, "max_tokens": 24, "ignore_eos": True}
LONG = {"temperature": 0, "max_tokens": 4000, "ignore_eos": True}  # ~5 s of decoding: only ever cancelled


def build_llama(d: Path, template: str | None, hidden: int = 64, intermediate: int = 96, layers: int = 2) -> Path:
    """A random Llama (GQA, untied head) with a byte-level BPE tokenizer that adds BOS, like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    d.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(d / "tokenizer.json"))
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    if template:
        tc["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=0,
                      eos_token_id=1, tie_word_embeddings=False, initializer_range=0.3)  # no near-ties
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def engine_text(model: Path, prompt, params: dict) -> tuple[str, str, int]:
    """(text, finish reason, tokens) of the engine in this process, alone in its batch."""
    from millis.gen import EngineConfig, SamplingParams, open_engine

    torch.set_num_threads(1)
    eng = open_engine(str(model), EngineConfig(max_batch=1, threads=1))
    p = {k: v for k, v in params.items() if k != "stop"}
    rid = eng.add(prompt, SamplingParams(**p, stop=tuple([params["stop"]] if "stop" in params else ())))
    text, n, finished = "", 0, None
    while eng.has_work:
        for o in eng.step():
            assert o.id == rid
            text, n, finished = text + o.text, n + len(o.token_ids), o.finished
    return text, finished, n


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return build_llama(tmp_path_factory.mktemp("gen") / "tiny-llama", TEMPLATE)


@pytest.fixture(scope="module")
def plain_llama(tmp_path_factory) -> Path:
    return build_llama(tmp_path_factory.mktemp("gen") / "no-template", None)


@pytest.fixture(scope="module")
def server(llama):
    s = Server(llama, "--max-batch", "4", "--model-name", "tiny-llama")
    yield s
    assert s.stop() == 0


def stream(s: Server, path: str, body: dict, on_event=None, timeout: float = 60) -> list:
    """POST with stream: the decoded `data:` payloads (the last is "[DONE]")."""
    c = http.client.HTTPConnection(s.host, s.port, timeout=timeout)
    try:
        c.request("POST", path, json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200, r.read()
        assert r.getheader("content-type").startswith("text/event-stream")
        events = []
        for line in r:
            if line.startswith(b"data: "):
                data = line[6:].strip()
                events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
                if on_event:
                    on_event(events[-1])
        return events
    finally:
        c.close()


def test_completion_equals_engine_and_stream_concatenates(server, llama):
    for prompt, params in [(PROMPTS[0], GREEDY), (PROMPTS[1], {"temperature": 0, "max_tokens": 30}),
                           (PROMPTS[2], {**GREEDY, "stop": "the"}), (PROMPTS[3], {**GREEDY, "seed": 3,
                                                                                 "temperature": 0.8, "top_p": 0.9})]:
        ref, finished, n = engine_text(llama, prompt, params)
        status, _, body = server.post("/v1/completions", {"prompt": prompt, **params})
        assert status == 200, body
        choice = body["choices"][0]
        assert (choice["text"], choice["finish_reason"]) == (ref, finished), prompt
        assert body["object"] == "text_completion" and body["model"] == "tiny-llama"
        assert body["usage"]["completion_tokens"] == n and body["usage"]["prompt_tokens"] > 1
        events = stream(server, "/v1/completions", {"prompt": prompt, **params,
                                                    "stream_options": {"include_usage": True}})
        assert events[-1] == "[DONE]"
        chunks, use = events[:-2], events[-2]
        assert "".join(e["choices"][0]["text"] for e in chunks) == ref
        assert [e["choices"][0]["finish_reason"] for e in chunks][-1] == finished
        assert use["choices"] == [] and use["usage"] == body["usage"]
    ids = [0, 5, 9, 17]  # a token-id prompt
    status, _, body = server.post("/v1/completions", {"prompt": ids, **GREEDY})
    assert status == 200 and body["choices"][0]["text"] == engine_text(llama, ids, GREEDY)[0]
    assert body["usage"]["prompt_tokens"] == 4


def test_chat_renders_the_template_as_transformers_does(server, llama):
    from transformers import AutoTokenizer

    msgs = [{"role": "system", "content": "fine thanks"}, {"role": "user", "content": "hello how are you"}]
    ids = AutoTokenizer.from_pretrained(llama).apply_chat_template(msgs, add_generation_prompt=True)["input_ids"]
    assert ids.count(0) == 1, "one BOS: the template's, not the tokenizer's as well"
    ref, finished, n = engine_text(llama, ids, GREEDY)
    status, _, body = server.post("/v1/chat/completions", {"messages": msgs, **GREEDY})
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ref}
    assert body["choices"][0]["finish_reason"] == finished
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
    events = stream(server, "/v1/chat/completions", {"messages": msgs, **GREEDY})
    assert events[-1] == "[DONE]" and all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == ref
    assert events[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finished}
    # content as a list of text parts is the parts joined by newlines (as vLLM joins them)
    parts = [{**msgs[0]}, {"role": "user", "content": [{"type": "text", "text": "hello how"},
                                                         {"type": "text", "text": "are you"}]}]
    joined = [{**msgs[0]}, {"role": "user", "content": "hello how\nare you"}]
    got, want = (server.post("/v1/chat/completions", {"messages": m, **GREEDY, "logprobs": True})[2] for m in (parts, joined))
    assert got["choices"][0]["logprobs"] == want["choices"][0]["logprobs"] and got["usage"] == want["usage"]


@pytest.mark.parametrize("route,raw,status,code", [
    ("/v1/chat/completions", b'{"messages": [', 400, "invalid_json"),
    ("/v1/chat/completions", b'{}', 400, "missing"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "invalid_value"),
    ("/v1/chat/completions", b'{"messages": [{"role": "bot", "content": "hi"}]}', 400, "invalid_value"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 3}]}', 400, "invalid_type"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "n": 17}', 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": "hi", "n": 0}', 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 0}', 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": "5"}', 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": "hot"}', 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": "hi", "top_p": 0}', 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": "hi", "stop": [""]}', 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": "hi", "stream": "yes"}', 400, "invalid_type"),
    ("/v1/completions", b'{"prompt": "hi", "echo": true}', 400, "unsupported"),
    ("/v1/completions", b'{"prompt": "hi", "min_p": 0.5}', 400, "unsupported"),  # sampled as if unset
    ("/v1/completions", json.dumps({"prompt": "hi", "stop": ["a"] * 17}).encode(), 400, "invalid_value"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "stop_token_ids": [3]}', 400,
     "unsupported"),
    ("/v1/completions", b'{"prompt": "hi", "tempreature": 0}', 400, "unknown_field"),  # sampled at t=1
    ("/v1/completions", b'{"prompt": "hi", "max_token": 3}', 400, "unknown_field"),
    ("/v1/completions", b'{"prompt": "hi", "presence_penalty": 2.5}', 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": "hi", "frequency_penalty": "x"}', 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": "hi", "logit_bias": [5]}', 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": "hi", "logit_bias": {"a5": 1}}', 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": "hi", "logit_bias": {"5": 101}}', 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": "hi", "logit_bias": {"5": true}}', 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": "hi", "logit_bias": {"5": 1, "05": 2}}', 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": "hi", "logit_bias": {"200": 1}}', 400, "invalid_value"),  # vocab: 200
    ("/v1/completions", json.dumps({"prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}}).encode(), 400,
     "invalid_value"),
    ("/v1/completions", b'{"prompt": "hi", "logprobs": 21}', 400, "invalid_value"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}', 400,
     "invalid_value"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "logprobs": 1}', 400,
     "invalid_type"),
    ("/v1/completions", b'{"prompt": ["a", "b"]}', 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": ""}', 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": 7}', 400, "invalid_value"),
    ("/v1/completions", b'{"max_tokens": 5}', 400, "missing"),
    ("/v1/completions", b'["hi"]', 400, "invalid_body"),
    ("/v1/completions", b'{"prompt": "hi", "model": "gpt-4"}', 404, "model_not_found"),
    ("/v1/completions", b'{"prompt": [0, 99999]}', 400, "invalid_prompt"),
    ("/v1/completions", json.dumps({"prompt": "the cat " * 3000}).encode(), 400, "context_length_exceeded"),
])
def test_bad_input_is_a_4xx_openai_error(server, route, raw, status, code):
    s, _, body = server.post(route, raw=raw)
    assert s == status, body
    assert body["error"]["code"] == code and len(body["error"]["message"]) > 10, body


def test_a_chat_prompt_too_long_names_messages(server):
    """A chat request has no `prompt`: its templated messages too long for a slot are blamed on `messages`."""
    for words in (2500, 3000):  # past the slot's 4,096 tokens, within the characters a prompt may have
        s, _, body = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "the cat " * words}]})
        if s == 400:
            break
    assert s == 400 and body["error"]["param"] == "messages" and "(messages)" in body["error"]["message"], body


def _running(s: Server) -> int:
    return json.loads(s.get("/health")[1])["running"]


def _start_long(s: Server, prompt: str) -> http.client.HTTPConnection:
    """A LONG non-streaming request, left running (its connection returned): once the server runs it."""
    c = http.client.HTTPConnection(s.host, s.port, timeout=30)
    c.request("POST", "/v1/completions", json.dumps({"prompt": prompt, **LONG}), {"Content-Type": "application/json"})
    deadline = time.time() + 5.0
    while not _running(s) and time.time() < deadline:
        time.sleep(0.01)
    assert _running(s) == 1
    return c


def _wait_idle(s: Server, timeout: float = 2.0) -> None:
    deadline = time.time() + timeout
    while _running(s) and time.time() < deadline:
        time.sleep(0.02)
    assert _running(s) == 0, "the slot was not freed"


def _steps_and_rows(s: Server) -> tuple[float, float]:
    """Engine steps so far and the rows they held, from one scrape: two scrapes apart let the running request's
    steps in between count in one and not the other (tens of steps on a loaded machine)."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = s.get("/metrics")
    assert status == 200
    got = {smp.name: smp.value for fam in text_string_to_metric_families(text.decode()) for smp in fam.samples
           if smp.name in ("millis_batch_size_count", "millis_batch_size_sum")}
    return got["millis_batch_size_count"], got["millis_batch_size_sum"]


def test_client_disconnect_frees_the_slot_at_once(server):
    cancelled = _metric(server, "millis_generation_requests_total", reason="cancelled")
    generated = _metric(server, "millis_generated_tokens_total")
    c = http.client.HTTPConnection(server.host, server.port, timeout=30)
    c.request("POST", "/v1/completions", json.dumps({"prompt": "the cat", "stream": True, **LONG}),
              {"Content-Type": "application/json"})
    r = c.getresponse()
    got = [r.readline() for _ in range(6)]      # a few events: it is running
    assert got[0].startswith(b"data: ") and _running(server) == 1
    c.sock.close()                               # the client goes away mid-stream
    c.close()
    _wait_idle(server)
    assert _metric(server, "millis_generation_requests_total", reason="cancelled") == cancelled + 1
    assert _metric(server, "millis_generated_tokens_total") - generated < LONG["max_tokens"]
    # without streaming: the disconnect watcher cancels it
    c = _start_long(server, "the dog")
    c.sock.close()
    c.close()
    _wait_idle(server)
    assert _metric(server, "millis_generation_requests_total", reason="cancelled") == cancelled + 2


def test_a_stream_is_timed_and_in_flight_until_its_last_event(server):
    route = {"route": "/v1/completions"}
    seconds = _metric(server, "millis_request_duration_seconds_sum", **route)
    ok, cut = (_metric(server, "millis_requests_total", status=s, **route) for s in ("200", "499"))
    c = http.client.HTTPConnection(server.host, server.port, timeout=30)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", json.dumps({"prompt": "the cat", "stream": True, **GREEDY,
                                                     "max_tokens": 400}), {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.readline().startswith(b"data: ")
    assert _metric(server, "millis_inflight_requests") >= 1  # it was 0 once the headers were sent
    assert json.loads(server.get("/stats")[1])["gauges"]["inflight"] >= 1
    assert _metric(server, "millis_requests_total", status="200", **route) == ok  # not answered yet
    r.read()
    wall = time.perf_counter() - t0
    c.close()
    deadline = time.time() + 5  # the server counts it once the last event is sent
    while _metric(server, "millis_requests_total", status="200", **route) == ok and time.time() < deadline:
        time.sleep(0.02)
    assert _metric(server, "millis_requests_total", status="200", **route) == ok + 1
    took = _metric(server, "millis_request_duration_seconds_sum", **route) - seconds
    assert 0.5 * wall < took <= wall + 0.5  # it was the time to the headers: a few ms
    c = http.client.HTTPConnection(server.host, server.port, timeout=30)  # a stream its client leaves: 499
    c.request("POST", "/v1/completions", json.dumps({"prompt": "the dog", "stream": True, **LONG}),
              {"Content-Type": "application/json"})
    assert c.getresponse().readline().startswith(b"data: ")
    c.sock.close()
    c.close()
    _wait_idle(server)
    deadline = time.time() + 5
    while _metric(server, "millis_requests_total", status="499", **route) == cut and time.time() < deadline:
        time.sleep(0.02)
    assert _metric(server, "millis_requests_total", status="499", **route) == cut + 1
    assert _metric(server, "millis_requests_total", status="200", **route) == ok + 1


def test_concurrent_requests_each_equal_alone(server):
    alone = [server.post("/v1/completions", {"prompt": p, **GREEDY})[2]["choices"][0]["text"] for p in PROMPTS]
    # a long request holds a slot first, so the four below surely join a running batch (the tiny model decodes 24
    # tokens faster than four client threads start: without it they may well run one after another). It decodes
    # 4000 tokens in ~3 s alone: should a stalled host let it end before the four do, the attempt is run again
    # (the sharing count needs it; the texts are checked on every attempt)
    for attempt in range(3):
        c = _start_long(server, "the dog")
        steps, rows = _steps_and_rows(server)
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            together = list(pool.map(lambda p: server.post("/v1/completions", {"prompt": p, **GREEDY}), PROMPTS))
        steps, rows = (after - before for after, before in zip(_steps_and_rows(server), (steps, rows)))
        long_held = _running(server) == 1
        c.sock.close()                           # cancels the long one
        c.close()
        assert [b["choices"][0]["text"] for _, _, b in together] == alone
        _wait_idle(server)
        if long_held:
            break
    assert long_held, "the long request ended before the four did, three times"
    # they shared steps with the running request (and each other): each of their decode steps holds the long one
    # too (a step that only prefills a newcomer need not: at most half of their rows are lost that way)
    assert rows - steps >= len(PROMPTS) * GREEDY["max_tokens"] // 2, (rows, steps)


def test_metrics_models_health_ready(server):
    server.post("/v1/completions", {"prompt": "the cat", **GREEDY})
    assert _metric(server, "millis_time_to_first_token_seconds_count") >= 1
    assert _metric(server, "millis_inter_token_latency_seconds_count") >= GREEDY["max_tokens"] - 1
    assert _metric(server, "millis_request_tokens_per_second_count") >= 1
    assert _metric(server, "millis_generated_tokens_total") >= GREEDY["max_tokens"]
    assert _metric(server, "millis_requests_total", route="/v1/completions", status="200") >= 1
    assert _metric(server, "millis_ready") == 1
    card = json.loads(server.get("/v1/models")[1])["data"][0]
    assert card["id"] == "tiny-llama" and card["task"] == "generate" and card["max_model_len"] == 4096
    assert card["chat_template"] is True
    health = json.loads(server.get("/health")[1])
    assert health.pop("cold_start_s") > 0 and health == {"status": "ok", "ready": True, "running": 0, "waiting": 0}
    assert server.get("/ready")[0] == 200


def test_logprobs_are_the_models_own(server, llama):
    """logprobs of the generated tokens: the model's own log_softmax (the engine in this process), the
    chosen token first among the top alternatives (greedy), in OpenAI's completions and chat shapes."""
    from millis.gen import EngineConfig, open_engine

    eng = open_engine(str(llama), EngineConfig(max_batch=1, threads=1))
    status, _, body = server.post("/v1/completions", {"prompt": "the cat", "logprobs": 3, **GREEDY, "max_tokens": 6})
    lp = body["choices"][0]["logprobs"]
    assert status == 200 and len(lp["tokens"]) == 6 == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
    assert [max(d, key=d.get) for d in lp["top_logprobs"]] == lp["tokens"]  # greedy: the chosen one is the top one
    assert all(len(d) == 3 for d in lp["top_logprobs"]) and "".join(lp["tokens"]) == body["choices"][0]["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:k]) for k in range(6)]
    ref = torch.log_softmax(eng.logits(eng.tok.encode("the cat")), -1)[-1]  # the first generated token's
    assert abs(lp["token_logprobs"][0] - ref.max().item()) < 1e-4
    msgs = {"messages": [{"role": "user", "content": "hello"}], **GREEDY, "max_tokens": 4}
    status, _, chat = server.post("/v1/chat/completions", {**msgs, "logprobs": True, "top_logprobs": 2})
    content = chat["choices"][0]["logprobs"]["content"]
    assert status == 200 and len(content) == 4 and all(len(c["top_logprobs"]) == 2 for c in content)
    assert content[0]["top_logprobs"][0]["token"] == content[0]["token"] and content[0]["bytes"]
    assert server.post("/v1/chat/completions", msgs)[2]["choices"][0]["logprobs"] is None
    events = stream(server, "/v1/chat/completions", {**msgs, "logprobs": True})
    streamed = [c for e in events[:-1] for ch in e["choices"] if ch.get("logprobs") for c in ch["logprobs"]["content"]]
    assert [c["token"] for c in streamed] == [c["token"] for c in content]
    assert all(c["top_logprobs"] == [] for c in streamed)
    # streamed completions: the offsets run on over the whole answer, as unstreamed (each chunk restarted at 0)
    events = stream(server, "/v1/completions", {"prompt": "the cat", "logprobs": 3, **GREEDY, "max_tokens": 6})
    parts = [ch["logprobs"] for e in events[:-1] for ch in e["choices"] if ch.get("logprobs")]
    assert [t for p in parts for t in p["tokens"]] == lp["tokens"]
    assert [o for p in parts for o in p["text_offset"]] == lp["text_offset"]


def test_penalties_and_logit_bias_equal_the_engine(server, llama):
    """presence / frequency penalties and logit_bias reach the engine as sent: the server's text is the
    engine's with the same fields; a +100 bias makes every token that one, and a 400 names its field."""
    pen = {**GREEDY, "presence_penalty": 1.2, "frequency_penalty": 0.5, "logit_bias": {"7": 3.5, "9": -2}}
    ref = engine_text(llama, PROMPTS[0], {**pen, "logit_bias": ((7, 3.5), (9, -2.0))})
    assert ref[0] != engine_text(llama, PROMPTS[0], GREEDY)[0], "the fields change the text"
    status, _, body = server.post("/v1/completions", {"prompt": PROMPTS[0], **pen})
    assert status == 200 and body["choices"][0]["text"] == ref[0], body
    msgs = {"messages": [{"role": "user", "content": "hello"}], **GREEDY, "max_tokens": 5, "logprobs": True}
    status, _, chat = server.post("/v1/chat/completions", {**msgs, "logit_bias": {"42": 100}})
    tokens = [c["token"] for c in chat["choices"][0]["logprobs"]["content"]]
    from tokenizers import Tokenizer

    assert status == 200 and tokens == [Tokenizer.from_file(str(llama / "tokenizer.json")).id_to_token(42)] * 5
    for field, value in [("presence_penalty", -3), ("frequency_penalty", 1e9), ("logit_bias", {"1": "x"})]:
        status, _, body = server.post("/v1/completions", raw=json.dumps({"prompt": "hi", field: value}).encode())
        assert status == 400 and body["error"]["param"] == field, body


def test_chat_max_tokens_past_the_context_names_its_field(server):
    """The chat route's asked max_completion_tokens (or max_tokens) past the context with the templated prompt:
    400 context_length_exceeded naming the field the client sent (test_serve_poison: the completions route)."""
    msgs = [{"role": "user", "content": "hello there"}]
    n = server.post("/tokenize", {"messages": msgs})[2]["count"]
    for field in ("max_completion_tokens", "max_tokens"):
        status, _, got = server.post("/v1/chat/completions", {"messages": msgs, field: 4096 - n + 1})
        assert status == 400 and got["error"]["code"] == "context_length_exceeded", got
        assert got["error"]["param"] == field and f"({n} in the messages, {4096 - n + 1} in the completion)" in \
            got["error"]["message"], got
    status, _, got = server.post("/v1/chat/completions", {"messages": msgs, "max_completion_tokens": 4096 - n + 1,
                                                          "max_tokens": 3})  # the newer field rules
    assert status == 400 and got["error"]["param"] == "max_completion_tokens", got


def test_tokenize_renders_the_chat_as_the_chat_route_does(server):
    """/tokenize takes the fields that change the rendered prompt (add_generation_prompt, continue_final_message,
    chat_template_kwargs) and counts what the chat route would send the model."""
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    for extra in ({}, {"add_generation_prompt": False}, {"continue_final_message": True}):
        count = server.post("/tokenize", {"messages": msgs, **extra})[2]["count"]
        usage = server.post("/v1/chat/completions", {"messages": msgs, **GREEDY, "max_tokens": 1, **extra})[2]["usage"]
        assert count == usage["prompt_tokens"], (extra, count, usage)
    full = server.post("/tokenize", {"messages": msgs})[2]["count"]
    assert server.post("/tokenize", {"messages": msgs, "add_generation_prompt": False})[2]["count"] < full


def test_tokenize_and_detokenize(server, llama):
    from millis.gen import EngineConfig, open_engine

    eng = open_engine(str(llama), EngineConfig(max_batch=1, threads=1))
    status, _, body = server.post("/tokenize", {"prompt": "the cat sat"})
    assert status == 200 and body["tokens"] == eng.tok.encode("the cat sat") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 4096
    status, _, back = server.post("/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and back["prompt"].endswith("the cat sat")  # the BOS the tokenizer adds decodes too
    msgs = [{"role": "user", "content": "hello"}]
    status, _, chat = server.post("/tokenize", {"messages": msgs})
    usage = server.post("/v1/chat/completions", {"messages": msgs, **GREEDY})[2]["usage"]
    assert status == 200 and chat["count"] == usage["prompt_tokens"]  # what the chat route sends the model
    for bad, field in (({"tokens": [1, "x"]}, "tokens"), ({"tokens": [10 ** 6]}, "tokens"), ({"tokens": 3}, "tokens")):
        status, _, err = server.post("/detokenize", bad)
        assert status == 400 and err["error"]["param"] == field
    for bad, field in (({}, "prompt"), ({"prompt": 5}, "prompt"), ({"messages": "hi"}, "messages"),
                       ({"prompt": "a", "messages": msgs}, "messages")):
        status, _, err = server.post("/tokenize", bad)
        assert status == 400 and err["error"]["param"] == field, (bad, err)
    status, _, err = server.post("/tokenize", {"prompt": [5, 10 ** 6]})  # as /v1/completions answers it
    assert status == 400 and err["error"]["param"] == "prompt" and err["error"]["code"] == "invalid_prompt"
    assert server.post("/tokenize", {"prompt": [5, 6]})[2]["tokens"] == [5, 6]  # ids in range: as they are


def test_no_template_is_a_clear_error_and_the_flag_supplies_one(plain_llama, tmp_path):
    msgs = {"messages": [{"role": "user", "content": "hello"}], **GREEDY}
    s = Server(plain_llama)
    try:
        status, _, body = s.post("/v1/chat/completions", msgs)
        assert status == 400 and body["error"]["code"] == "no_chat_template"
        assert "--chat-template" in body["error"]["message"]
        assert s.post("/v1/completions", {"prompt": "the cat", **GREEDY})[0] == 200
    finally:
        assert s.stop() == 0
    r = subprocess.run([sys.executable, "-m", "millis.cli", "serve", str(plain_llama), "--port", "0",
                        "--chat-template", str(tmp_path / "nope.jinja")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "nope.jinja does not exist" in r.stderr
    (tmp_path / "chat.jinja").write_text(TEMPLATE)
    s = Server(plain_llama, "--chat-template", str(tmp_path / "chat.jinja"))
    try:
        status, _, body = s.post("/v1/chat/completions", msgs)
        assert status == 200 and body["usage"]["prompt_tokens"] > 3
    finally:
        assert s.stop() == 0


def test_full_queue_429_and_first_token_timeout_503(llama):
    s = Server(llama, "--max-batch", "1", "--max-queue", "1", "--max-inputs", "1", "--request-timeout-s", "0.5")
    try:
        c = http.client.HTTPConnection(s.host, s.port, timeout=30)
        c.request("POST", "/v1/completions", json.dumps({"prompt": "the cat", "stream": True, **LONG}),
                  {"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.readline().startswith(b"data: ")                 # holds the only slot for seconds
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(s.post, "/v1/completions", {"prompt": "the dog", **GREEDY})
            deadline = time.time() + 0.4
            while json.loads(s.get("/health")[1])["waiting"] < 1 and time.time() < deadline:
                time.sleep(0.01)
            status, headers, body = s.post("/v1/completions", {"prompt": "hello", **GREEDY})
            assert status == 429 and int(headers["retry-after"]) >= 1 and body["error"]["code"] == "overloaded"
            status, _, body = waiting.result()
            assert status == 503 and body["error"]["code"] == "timeout"   # never got the slot
        c.close()
    finally:
        assert s.stop() == 0


def test_sigterm_finishes_the_stream_in_flight_and_exits_0(llama):
    s = Server(llama)
    params = {"temperature": 0, "max_tokens": 1500, "ignore_eos": True}   # ~2 s of decoding
    signalled = []

    def on_event(e):
        if not signalled:
            s.proc.send_signal(signal.SIGTERM)
            signalled.append(time.time())

    events = stream(s, "/v1/completions", {"prompt": "the cat", **params, "stream_options": {"include_usage": True}},
                    on_event=on_event)
    assert signalled and events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == 1500
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert s.proc.wait(30) == 0
    assert s.get("/health")[0] == 0


def test_llama2c_stories260k_completion_equals_engine():
    model = shared_model("stories260K")
    s = Server(model)
    try:
        params = {"temperature": 0, "max_tokens": 40}
        ref, finished, n = engine_text(model, "Once upon a time", params)
        status, _, body = s.post("/v1/completions", {"prompt": "Once upon a time", **params})
        assert status == 200 and body["choices"][0]["text"] == ref and ref.startswith(", there was a little girl")
        events = stream(s, "/v1/completions", {"prompt": "Once upon a time", **params})
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == ref and events[-1] == "[DONE]"
        status, _, body = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 400 and body["error"]["code"] == "no_chat_template"
    finally:
        assert s.stop() == 0


def test_the_engine_opens_and_steps_in_one_thread(llama):
    """As the encoder server's runtime thread: torch's OpenMP teams are per thread, so the thread that opens
    (and warms) the engine is the one that steps it."""
    import asyncio
    import threading

    from millis.gen import EngineConfig, SamplingParams, open_engine
    from millis.serve.config import ServeConfig
    from millis.serve.generation.app import GenState

    seen: list[tuple[str, int]] = []

    def loader():
        seen.append(("open", threading.get_ident()))
        eng = open_engine(str(llama), EngineConfig(max_batch=2, max_seq=64))
        inner = eng.step

        def step():
            seen.append(("step", threading.get_ident()))
            return inner()
        eng.step = step
        return eng

    async def go():
        st = GenState(ServeConfig(artifact=str(llama)), loader)
        await st.load()
        assert st.load_error is None and st.engine is not None
        live, = st.admit([1, 5, 9], SamplingParams(max_tokens=3, ignore_eos=True), chat=False)
        n = 0
        while not (o := await st.next(live, timeout=30)).finished:
            n += 1
        await st.close()
        return n + 1

    assert asyncio.run(go()) == 3
    assert [k for k, _ in seen][:2] == ["open", "step"] and len(seen) >= 4  # warm-up steps, then the request's
    assert len({t for _, t in seen}) == 1 and seen[0][1] != threading.get_ident()


def test_unseeded_requests_differ_between_server_processes():
    """The server's engine seeds the stream of unseeded requests anew each start: a restart or another replica
    gave the very same 'random' answers (a fixed seed 0). A request's own seed still fixes its tokens."""
    from millis.gen import SamplingParams
    from millis.serve.config import ServeConfig
    from millis.serve.server import app_and_loader

    cfg = ServeConfig(artifact=str(shared_model("stories260K")), max_batch=1, threads=1, warmup=False)
    texts = {}
    for seed in (None, 5):
        for start in range(2):
            eng = app_and_loader(cfg)[1]()  # what each server process opens
            rid = eng.add("Once upon a time", SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True,
                                                             seed=seed))
            out = []
            while eng.has_work:
                out += [o.text for o in eng.step() if o.id == rid]
            texts[seed, start] = "".join(out)
    assert texts[None, 0] != texts[None, 1]
    assert texts[5, 0] == texts[5, 1]


def test_n_is_bounded_by_the_queue_too(llama):
    """n choices are n rows waiting for slots: with --max-queue 2 a request with n=3 could never be admitted (a 429
    for ever on an idle server); it is a 400 naming n."""
    import asyncio

    from millis.gen import EngineConfig, open_engine
    from millis.serve import schemas
    from millis.serve.config import ServeConfig
    from millis.serve.generation import schemas as gs
    from millis.serve.generation.app import GenState

    async def go():
        st = GenState(ServeConfig(artifact=str(llama), max_batch=4, max_queue=2, max_inputs=2, warmup=False),
                      lambda: open_engine(str(llama), EngineConfig(max_batch=4, max_seq=64)))
        await st.load()
        try:
            return st.gen_limits
        finally:
            await st.close()

    limits = asyncio.run(go())
    assert limits.max_n == 2
    gs.completion_request({"prompt": "a", "n": 2}, "m", limits)
    with pytest.raises(schemas.ApiError, match="n is 3; this server runs at most 2") as e:
        gs.completion_request({"prompt": "a", "n": 3}, "m", limits)
    assert e.value.status == 422 and e.value.param == "n"  # the schema layer's; the route answers 400


def test_fields_near_a_read_one_are_refused_and_others_pass():
    """A typo of a read field is refused naming it (it was ignored: {"tempreature": 0} sampled at t=1); a client's
    own fields, OpenAI's unread ones and the off values of unsupported ones pass."""
    from millis.serve.generation.fields import check_fields
    from millis.serve.schemas import ApiError

    for body in ({"top-p": 0.5}, {"frequency_penalties": 1}, {"logprob": True}, {"stream_option": {}}):
        with pytest.raises(ApiError) as e:
            check_fields(body)
        assert e.value.param == next(iter(body)) and "did you mean" in str(e.value), body
    check_fields({"user": "u", "store": False, "metadata": {}, "x_trace": 1, "session_id": "a", "min_p": 0.0,
                  "typical_p": 1, "stop_token_ids": [], "use_beam_search": False})


@pytest.mark.parametrize("bos, vocab, sent", [(50256, 320, 0), (1, 320, 1), (None, 320, 0), (-1, 320, 0)])
def test_warmup_sends_a_token_of_the_model_whatever_bos_its_config_names(tmp_path, bos, vocab, sent):
    """A GPT-2 trained with its own small vocabulary keeps GPT2Config's bos_token_id 50256: the warm-up sent it and
    /ready said `prompt token ids must be in 0..319` (no prompt was sent; --no-warmup served fine)."""
    from types import SimpleNamespace

    from millis.serve.config import ServeConfig
    from millis.serve.generation.app import GenState

    added = []
    eng = SimpleNamespace(config=SimpleNamespace(bos_id=bos, vocab_size=vocab), has_work=False, chat_template=None,
                          special_tokens={}, add=lambda ids, params: added.append(ids))
    (tmp_path / "model.gguf").write_bytes(b"")
    st = GenState(ServeConfig(artifact=str(tmp_path / "model.gguf"), warmup=True), lambda: eng)
    assert st._open() is eng and added == [[sent]]


def test_the_drain_limit_ends_every_running_answer_with_an_error(llama):
    """Near the drain's limit (`expire_waiting`) every answer still running ends: one without a token a 503, a stream
    under way an error event (code shutting_down) and [DONE]; the server's exit had cut such streams with neither.
    Their slots are free at once."""
    import asyncio

    from millis.gen import EngineConfig, open_engine
    from millis.serve.config import ServeConfig
    from millis.serve.generation import schemas as gs
    from millis.serve.generation.app import GenState
    from millis.serve.generation.respond import events

    async def go():
        st = GenState(ServeConfig(artifact=str(llama), warmup=False),
                      lambda: open_engine(str(llama), EngineConfig(max_batch=2, max_seq=512)))
        await st.load()
        g = gs.completion_request({"prompt": [1, 5, 9], "max_tokens": 400, "ignore_eos": True, "stream": True},
                                  st.name, gs.GenLimits(16, 400, 10_000))
        lives = st.admit([1, 5, 9], g.params, chat=False)
        first = [await st.next(live, timeout=30) for live in lives]
        chunks, stream = [], events(st, lives, first, g, chat=False)
        async for c in stream:
            chunks.append(c)
            if len(chunks) == 3:
                st.expire_waiting()
        for _ in range(200):  # a cancel during a step frees the slot when that step ends
            if st.engine.free_slots == 2:
                break
            await asyncio.sleep(0.01)
        free = st.engine.free_slots
        await st.close()
        return chunks, free

    chunks, free = asyncio.run(go())
    text = [c.decode() if isinstance(c, bytes) else str(c) for c in chunks]
    assert text[-1].strip() == "data: [DONE]", text[-3:]
    assert '"code":"shutting_down"' in text[-2].replace(" ", ""), text[-3:]
    assert len(text) < 50 and free == 2, (len(text), free)  # ended, not run to its 400 tokens
