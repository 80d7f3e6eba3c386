"""Issue 13's poison pills, each replayed against a real server with concurrent requests that must
come through unharmed (200, and the same text the engine gives alone), plus the smaller defects:
body limits while reading, JSON 404 / 405, clients leaving mid-body, ids, integer-valued floats,
artifacts refused before binding, and SIGTERM under load."""
from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import shared_model
from millis.serve.schemas import ApiError
from test_serve import Server, _metric
from test_serve_gen import TEMPLATE, build_llama, engine_text

pytestmark = pytest.mark.serve
STORY = ["Once upon a time", "The little dog", "Lily and Tom went", "One day, a bird"]
GREEDY = {"temperature": 0, "max_tokens": 20}


@pytest.fixture(scope="module")
def stories():
    model = shared_model("stories260K")
    s = Server(model, "--max-batch", "8", "--model-name", "stories")
    yield model, s
    assert s.stop() == 0


def with_bystanders(s: Server, poison: dict, path: str = "/v1/completions"):
    """Four greedy requests and the poison, all at once: (bystander results, poison result)."""
    with ThreadPoolExecutor(5) as pool:
        good = [pool.submit(s.post, "/v1/completions", {"prompt": p, **GREEDY}) for p in STORY]
        bad = pool.submit(s.post, path, poison)
        return [f.result() for f in good], bad.result()


def check_unharmed(model, results):
    for prompt, (status, _, body) in zip(STORY, results):
        assert status == 200, body
        assert body["choices"][0]["text"] == engine_text(model, prompt, GREEDY)[0], prompt


def test_huge_top_k_is_a_400_and_harms_no_one(stories):
    model, s = stories
    good, (status, _, body) = with_bystanders(s, {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 1,
                                                  "top_k": 9223372036854775808})
    assert status == 400 and body["error"]["param"] == "top_k"
    check_unharmed(model, good)
    # the largest allowed top_k samples from the whole vocabulary
    status, _, body = s.post("/v1/completions", {"prompt": "Once", "max_tokens": 5, "temperature": 1,
                                                 "top_k": 2 ** 31 - 1, "seed": 1})
    assert status == 200, body


@pytest.mark.parametrize("field,value", [("temperature", 1e300), ("seed", 2 ** 64), ("repetition_penalty", 1e-300),
                                         ("max_tokens", 10 ** 9), ("top_p", 0), ("n", 17), ("presence_penalty", -1e300),
                                         ("frequency_penalty", 1e300), ("logit_bias", {"0": 1e300}),
                                         ("logit_bias", {"0": -1e300}), ("logit_bias", {"1" * 10: 1})])
def test_every_sampling_field_has_an_upper_and_lower_bound(stories, field, value):
    status, _, body = stories[1].post("/v1/completions", {"prompt": "Once", field: value})
    assert status == 400 and body["error"]["param"] == field, body


def test_long_stop_strings_are_refused_and_the_longest_allowed_harm_no_one(stories):
    model, s = stories
    status, _, body = s.post("/v1/completions", {"prompt": "Once", "max_tokens": 20, "stop": ["x" * 30000] * 16})
    assert status == 400 and body["error"]["param"] == "stop", body   # 16 x 30,000 characters: under the body limit
    good, (status, _, body) = with_bystanders(s, {"prompt": "Once upon a time", "max_tokens": 20,
                                                  "stop": ["a" * 255 + "b"] * 16, "temperature": 0})
    assert status == 200, body
    check_unharmed(model, good)


def test_a_huge_prompt_is_refused_before_tokenizing_and_harms_no_one(stories):
    model, s = stories
    t0 = time.perf_counter()
    good, (status, _, body) = with_bystanders(s, {"prompt": "Once upon a time " * 6000, "max_tokens": 5})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body  # OpenAI's: LangChain reads it
    check_unharmed(model, good)
    # a prompt under the character limit but over the context is tokenized (linear time) and refused
    status, _, body = s.post("/v1/completions", {"prompt": "a b " * 1000, "max_tokens": 5})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    assert time.perf_counter() - t0 < 60


def test_tools_and_tool_calls_count_toward_the_prompt_limit(stories):
    """What the template renders besides content (tool definitions, earlier calls) is refused as a long
    prompt is, before rendering or tokenizing (this model has no template: it would be a 400 after)."""
    s, big = stories[1], "Once upon a time " * 6000
    tools = [{"type": "function", "function": {"name": "f", "description": big}}]
    status, _, body = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": tools})
    assert status == 400 and body["error"]["param"] == "tools", body
    call = {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": big}}]}
    status, _, body = s.post("/v1/chat/completions", {"messages": [call, {"role": "user", "content": "hi"}]})
    assert status == 400 and body["error"]["param"] == "messages", body


def test_smaller_defects(stories):
    model, s = stories
    status, _, body = s.post("/v1/completions", {"prompt": "Once", "max_tokens": 14.0, "top_k": 5.0, "n": 1.0})
    assert status == 200 and body["usage"]["completion_tokens"] <= 14 and body["id"].startswith("cmpl-"), body
    status, _, body = s.post("/v1/completions", {"prompt": "Once", "max_tokens": 40,
                                                 "response_format": {"type": "json_object"}})
    assert status == 200 and body["choices"][0]["text"].lstrip().startswith("{"), body  # llama2.c's vocabulary
    status, _, body = s.post("/v1/completions", {"prompt": "Once", "response_format": {"type": "json"}})
    assert status == 400 and body["error"]["param"] == "response_format"
    assert s.post("/v1/completions", {"prompt": "Once", "max_tokens": 3, "response_format": {"type": "text"}})[0] == 200
    spec = json.loads(s.get("/openapi.json")[1])
    assert {"/v1/completions", "/v1/chat/completions"} <= set(spec["paths"])
    props = spec["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert props["properties"]["max_tokens"]["anyOf"][0]["maximum"] == 512  # stories260K's context


def test_unknown_routes_and_methods_answer_json_and_are_counted(stories):
    s = stories[1]
    before = _metric(s, "millis_requests_total", route="unmatched")
    status, headers, body = s.request("GET", "/v1/nope")
    assert status == 404 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "not_found"
    status, headers, body = s.request("GET", "/v1/completions")
    assert status == 405 and json.loads(body)["error"]["code"] == "method_not_allowed" and "allow" in headers
    assert _metric(s, "millis_requests_total", route="unmatched") == before + 2


def raw_request(s: Server, head: bytes, body: bytes = b"", read: bool = True, until: bytes = b"\r\n\r\n") -> bytes:
    """Send head + body on a socket of its own; what comes back until `until` is in it (or the server closes)."""
    with socket.create_connection((s.host, s.port), timeout=10) as c:
        c.sendall(head + body)
        if not read:
            return b""
        out = b""
        while until not in out:
            chunk = c.recv(65536)
            if not chunk:
                break
            out += chunk
        return out


def test_oversized_bodies_are_refused_before_they_are_read(stories):
    s = stories[1]
    # Content-Length over the limit: answered at once, without waiting for (or reading) the body
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {50 << 20}\r\n\r\n").encode()
    t0 = time.perf_counter()
    assert raw_request(s, head, b'{"prompt": "').startswith(b"HTTP/1.1 413")
    assert time.perf_counter() - t0 < 5
    # chunked, no Content-Length: refused once the streamed bytes pass the limit
    chunk = b"x" * 65536
    body = b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(20)) + b"0\r\n\r\n"
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    assert raw_request(s, head, body).startswith(b"HTTP/1.1 413")
    assert s.post("/v1/completions", {"prompt": "Once", "max_tokens": 2})[0] == 200


def test_a_client_leaving_mid_body_is_a_499_not_a_500(stories):
    s = stories[1]
    left = _metric(s, "millis_requests_total", route="/v1/completions", status="499")
    errors = _metric(s, "millis_requests_total", route="/v1/completions", status="500")
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    raw_request(s, head, b'{"prompt": "On', read=False)
    deadline = time.time() + 5
    while _metric(s, "millis_requests_total", route="/v1/completions", status="499") == left and time.time() < deadline:
        time.sleep(0.05)
    assert _metric(s, "millis_requests_total", route="/v1/completions", status="499") == left + 1
    assert _metric(s, "millis_requests_total", route="/v1/completions", status="500") == errors


def test_a_body_that_stalls_is_answered_408_within_the_request_timeout():
    """uvicorn has no read timeout: a client that sent part of its body and stopped held the request (and up to
    --max-body-bytes of memory) until it left; the body now has --request-timeout-s to come in."""
    s = Server(shared_model("stories260K"), "--request-timeout-s", "1")
    try:
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n")
        t0 = time.perf_counter()
        out = raw_request(s, head, b'{"prompt": "Once' + b" a" * 1000, until=b"}}")  # ~2 KB of the 100 KB, then stalls
        assert out.startswith(b"HTTP/1.1 408") and b"connection: close" in out.lower(), out
        assert json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "body_timeout"
        assert time.perf_counter() - t0 < 5
        assert _metric(s, "millis_inflight_requests") == 0
        assert s.post("/v1/completions", {"prompt": "Once", "max_tokens": 2})[0] == 200
    finally:
        assert s.stop() == 0


def test_requests_still_waiting_at_the_drain_limit_get_a_json_503(tmp_path):
    """One slot, decoding a long stream; two requests wait for it. SIGTERM with a 2 s drain: shortly before the
    limit the waiting two are answered 503 shutting_down (uvicorn used to cancel them at the limit: a plain-text
    500 each, and their rows ran on after)."""
    s, c, r = slow_stream(tmp_path, "2")
    with ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(s.post, "/v1/completions", {"prompt": [5, 6], "max_tokens": 4}) for _ in range(2)]
        deadline = time.time() + 10
        while _metric(s, "millis_inflight_requests") < 3 and time.time() < deadline:
            time.sleep(0.01)
        t0 = time.time()
        s.proc.send_signal(signal.SIGTERM)
        answers = [f.result() for f in waiting]
    code = s.proc.wait(30)
    assert time.time() - t0 < 2 + 5 + 3 and code in (0, 1)
    assert [(a[0], a[2]["error"]["code"]) for a in answers] == [(503, "shutting_down")] * 2, answers
    assert all(a[1].get("retry-after") == "1" for a in answers)
    c.close()


def test_chat_ids_and_spec_of_a_model_with_a_template(tmp_path):
    model = build_llama(tmp_path / "chat-llama", TEMPLATE)
    s = Server(model, "--max-batch", "2")
    try:
        status, _, body = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                          "max_completion_tokens": 4.0, "max_tokens": 100})
        assert status == 200 and body["id"].startswith("chatcmpl-") and body["usage"]["completion_tokens"] <= 4
        status, _, body = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                          "max_completion_tokens": 4, "max_tokens": -1})
        assert status == 400 and body["error"]["param"] == "max_tokens"  # checked even when the newer name is set
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("content,message", [(None, "not a millis artifact"), ("{not json", "corrupted"),
                                             ('{"format": "other"}', "not a millis artifact")])
def test_a_broken_artifact_is_refused_before_binding(tmp_path, content, message):
    art = tmp_path / "art"
    art.mkdir()
    (art / "model.onnx").write_bytes(b"x")
    if content is not None:
        (art / "millis.json").write_text(content)
    r = subprocess.run([sys.executable, "-m", "millis.cli", "serve", str(art), "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr and "listening" not in r.stdout, (r.stdout, r.stderr)


def test_sigterm_under_load_answers_every_admitted_request_and_exits_0(stories):
    model = stories[0]
    s = Server(model, "--max-batch", "4", "--max-queue", "64")
    params = {"temperature": 0, "max_tokens": 480, "ignore_eos": True}
    with ThreadPoolExecutor(12) as pool:
        futs = [pool.submit(s.post, "/v1/completions", {"prompt": STORY[i % 4], **params}) for i in range(12)]
        deadline = time.time() + 10
        while _metric(s, "millis_inflight_requests") < 12 and time.time() < deadline:
            time.sleep(0.01)
        assert _metric(s, "millis_inflight_requests") == 12   # admitted: 4 running, 8 waiting
        t0 = time.time()
        assert s.stop() == 0
        results = [f.result() for f in futs]
    assert time.time() - t0 < 60
    assert [r[0] for r in results] == [200] * 12
    assert all(r[2]["usage"]["completion_tokens"] == 480 for r in results)


def slow_stream(tmp_path, drain_s: str):
    """A one-slot server (drain limit `drain_s`) and a stream holding its slot: (server, connection, response).
    4000 tokens of a 13M-parameter model (54 MB read per token): seconds of decoding on any CPU seen so far (the
    64-wide test model finished inside a 1 s drain limit on Zen 5)."""
    model = build_llama(tmp_path / "slow-llama", None, hidden=512, intermediate=1536, layers=4)
    s = Server(model, "--max-batch", "1", "--shutdown-timeout-s", drain_s)
    c = http.client.HTTPConnection(s.host, s.port, timeout=30)
    c.request("POST", "/v1/completions", json.dumps({"prompt": [5, 6, 7], "max_tokens": 4000, "ignore_eos": True,
                                                     "temperature": 0, "stream": True}),
              {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.readline().startswith(b"data: ")
    return s, c, r


def test_sigterm_exits_within_the_drain_limit_even_with_work_left(tmp_path):
    s, c, r = slow_stream(tmp_path, "1")
    t0 = time.time()
    s.proc.send_signal(signal.SIGTERM)
    code = s.proc.wait(30)
    assert time.time() - t0 < 1 + 5 + 3 and code in (0, 1)   # drain limit + hard-exit grace + slack
    rest = r.read().decode()  # ended before the limit, not run to its 4000 tokens: an error event, then [DONE]
    assert rest.rstrip().endswith("data: [DONE]") and '"code":"shutting_down"' in rest.replace(" ", ""), rest[-300:]
    assert rest.count("data: ") < 4000
    c.close()


SLOW_ENCODER = """
import sys, time
from millis.artifact.model import open_model
from millis.serve.config import ServeConfig
from millis.serve.encoder import app
from millis.serve import server
real, ready = app.State._infer, []
def infer(model, rows, t):  # 0.3 s a call once warm: a 64-text request takes 32 calls at max_batch 2
    if ready:
        time.sleep(0.3)
    return real(model, rows, t)
app.State._infer = staticmethod(infer)
warm = app.State._warm
app.State._warm = lambda self, model: (warm(self, model), ready.append(1))[0]
cfg = ServeConfig(artifact="tiny:bert", port=int(sys.argv[1]), threads=1, max_batch=2, shutdown_timeout_s=3.0)
sys.exit(server.serve(cfg, loader=lambda: open_model("tiny:bert", threads=1, task="embed")))
"""


def test_requests_running_or_half_read_at_the_drain_limit_get_a_json_503(tmp_path):
    """Past the drain limit uvicorn cancels what is left: a request whose rows had started, and one whose body had
    stalled, each got a plain-text 500 (and went uncounted). Now a JSON 503 shutting_down, and exit 0."""
    script = tmp_path / "slow.py"
    script.write_text(SLOW_ENCODER)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(script), str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/ready")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        long = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        long.request("POST", "/v1/embeddings", json.dumps({"input": [f"card pin {i}" for i in range(64)]}),
                     {"Content-Type": "application/json"})
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n{\"input\"")
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        r = long.getresponse()
        body = json.loads(r.read())
        assert r.status == 503 and body["error"]["code"] == "shutting_down", body
        stalled.settimeout(30)
        head = stalled.recv(4096)
        assert head.startswith(b"HTTP/1.1 503") and b"shutting_down" in head + stalled.recv(4096), head
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()


def test_an_asked_max_tokens_past_the_context_is_refused(stories):
    """prompt + an asked max_tokens past the context: 400 context_length_exceeded naming the field (OpenAI's and
    vLLM's answer; a cut answer would say "length" as if the model had chosen it). The server's own default is cut
    at the context instead, as vLLM's (test_serve_gen checks the chat route's max_completion_tokens)."""
    s = stories[1]
    ctx = json.loads(s.get("/v1/models")[1])["data"][0]["max_model_len"]
    prompt = {"prompt": "Once upon a time " * 20, "ignore_eos": True}
    status, _, tok = s.post("/tokenize", {"prompt": prompt["prompt"]})
    n = tok["count"]
    assert status == 200 and 10 < n < ctx - 10, tok
    status, _, got = s.post("/v1/completions", {**prompt, "max_tokens": ctx - n + 1})
    assert status == 400 and got["error"]["code"] == "context_length_exceeded", got
    assert got["error"]["param"] == "max_tokens" and f"maximum context length is {ctx}" in got["error"]["message"]
    status, _, got = s.post("/v1/completions", {**prompt, "max_tokens": ctx - n})  # fits exactly
    assert status == 200 and got["usage"]["completion_tokens"] == ctx - n, got
    status, _, got = s.post("/v1/completions", {"prompt": [5] * (ctx + 1), "max_tokens": 5})
    assert status == 400 and got["error"]["param"] == "prompt", got  # no max_tokens fits: the prompt is what to cut
    assert "reduce the length of the prompt." in got["error"]["message"], got


def test_a_bad_token_id_is_named_not_counted_as_prompts():
    """`prompt` [1, "a"] said "has 2 prompts; one per request" and [true] "has 1 prompts": the item is named."""
    from millis.serve.generation.schemas import GenLimits, completion_request

    for prompt, says in (([1, "a"], "prompt[1] is str, not a token id"), ([True], "prompt[0] is bool"),
                         (["a", "b"], "prompt has 2 prompts; one per request")):
        with pytest.raises(ApiError, match=re.escape(says)):
            completion_request({"prompt": prompt}, "m", GenLimits(16, 64, 10_000))
