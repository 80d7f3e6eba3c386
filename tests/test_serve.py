"""A real `millis serve` process on a free loopback port, driven over HTTP."""
from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import millis
from millis.loadgen.process import ServerProcess, serve_command

pytestmark = pytest.mark.serve
TEXTS = ["where is my card", "the stock markets fell today", "refund my payment please", "why was my transfer late",
         "oil prices and bond yields", "pin", "my account balance is wrong again and again today"]


class Server(ServerProcess):
    """`millis serve ART --port 0 --threads 1 ...` in its own process (millis.loadgen.process); ready on return."""

    def __init__(self, artifact: Path, *flags: str, env: dict | None = None):
        super().__init__(serve_command(artifact, "--threads", "1", *flags), env=env, ready_timeout=120)


@pytest.fixture(scope="module")
def embed_artifact(tmp_path_factory, quick_measure) -> Path:
    from millis.optimize.config import OptimizeConfig
    from millis.common.config import Shape
    from millis.optimize.pipeline import optimize

    out = tmp_path_factory.mktemp("art") / "tiny-embed"
    return optimize(OptimizeConfig(source="tiny:bert", task="embed", out=str(out), target=Shape(1, 16),
                                   variants=("ort-fp32-fused",), measure=quick_measure))


@pytest.fixture(scope="module")
def embed_server(embed_artifact):
    s = Server(embed_artifact, "--max-wait-ms", "20", "--model-name", "tiny")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def classify_server(classify_artifact):
    s = Server(classify_artifact, "--too-long", "reject", "--max-inputs", "8")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def rerank_artifact(tmp_path_factory, quick_measure) -> Path:
    """A one-logit cross-encoder (tiny:bert-reranker, as ms-marco-MiniLM) optimized as classify_artifact is."""
    from millis.optimize.config import OptimizeConfig
    from millis.common.config import Shape
    from millis.optimize.pipeline import optimize

    out = tmp_path_factory.mktemp("art") / "tiny-reranker"
    return optimize(OptimizeConfig(source="tiny:bert-reranker", task="rerank", out=str(out), target=Shape(1, 16),
                                   variants=("ort-fp32-fused", "ort-int8-dynamic"), measure=quick_measure))


@pytest.fixture(scope="module")
def rerank_server(rerank_artifact):
    s = Server(rerank_artifact, "--too-long", "reject", "--max-inputs", "8")
    yield s
    assert s.stop() == 0


def test_embeddings_equal_in_process_float_and_base64(embed_server, embed_artifact):
    ref = millis.load(embed_artifact).embed(TEXTS)
    status, headers, body = embed_server.post("/v1/embeddings", {"input": TEXTS, "model": "tiny"})
    assert status == 200, body
    assert body["object"] == "list" and body["model"] == "tiny"
    assert [d["index"] for d in body["data"]] == list(range(len(TEXTS)))
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert body["usage"]["prompt_tokens"] > len(TEXTS)
    for k in ("x-millis-queue-ms", "x-millis-tokenize-ms", "x-millis-inference-ms"):
        assert float(headers[k]) >= 0
    status, _, b64 = embed_server.post("/v1/embeddings", {"input": TEXTS[0], "encoding_format": "base64"})
    assert status == 200
    vec = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, ref[0], atol=1e-5)


def test_classify_equals_in_process(classify_server, classify_artifact):
    ref = millis.load(classify_artifact).predict(TEXTS[:5])
    status, _, body = classify_server.post("/v1/classify", {"inputs": TEXTS[:5], "top_k": 2, "return_logits": True})
    assert status == 200, body
    for r, d in zip(ref, body["data"]):
        assert d["label"] == r["label"] and abs(d["score"] - r["score"]) < 1e-5
        np.testing.assert_allclose(d["logits"], r["logits"], atol=1e-5)
        assert len(d["top_k"]) == 2 and d["top_k"][0]["label"] == r["label"]


def test_batched_equals_single(embed_server):
    texts = [TEXTS[i % len(TEXTS)] + (" again" * (i % 3)) for i in range(24)]
    single = {}
    for t in set(texts):
        single[t] = embed_server.post("/v1/embeddings", {"input": [t]})[2]["data"][0]["embedding"]
    with ThreadPoolExecutor(24) as pool:   # all at once: the 20 ms wait coalesces them
        results = list(pool.map(lambda t: embed_server.post("/v1/embeddings", {"input": [t]}), texts))
    batch_rows = [int(h["x-millis-batch-rows"]) for _, h, _ in results]  # one text: one runtime call each
    assert max(batch_rows) > 1, "no request was batched with another"
    for t, (status, _, body) in zip(texts, results):
        assert status == 200
        np.testing.assert_allclose(body["data"][0]["embedding"], single[t], atol=1e-5)


@pytest.mark.parametrize("raw,status,code", [
    (b'{"input": ', 400, "invalid_json"),
    (b'["a list"]', 400, "invalid_body"),
    (b'{}', 400, "missing"),
    (b'{"input": []}', 400, "empty_input"),
    (b'{"input": ["ok", ""]}', 400, "empty_input"),
    (b'{"input": ""}', 400, "empty_input"),
    (b'{"input": ["ok", 3]}', 400, "invalid_type"),
    (b'{"input": [[101, 102], "x"]}', 400, "invalid_type"),
    (b'{"input": [[101, 102], []]}', 400, "empty_input"),
    (b'{"input": [[101, 102], [1, -1]]}', 400, "invalid_value"),
    (b'{"input": [101, 1.5]}', 400, "invalid_value"),
    (b'{"input": [101, true]}', 400, "invalid_value"),
    (json.dumps({"input": [[101, 102]] * 65}).encode(), 400, "too_many_inputs"),
    (b'{"input": {"a": 1}}', 400, "invalid_type"),
    (b'{"input": "x", "model": "gpt-4"}', 404, "model_not_found"),
    (b'{"input": "x", "encoding_format": "int8"}', 400, "invalid_value"),
    (b'{"input": "x", "encoding_format": 0}', 400, "invalid_value"),
    (b'{"input": "x", "dimensions": 100000}', 400, "invalid_value"),
    (b'{"input": "x", "dimensions": 0}', 400, "invalid_value"),
    (b'{"input": "x", "dimensions": "8"}', 400, "invalid_value"),
    (json.dumps({"input": ["x"] * 65}).encode(), 400, "too_many_inputs"),
    (json.dumps({"input": "x" * (1 << 20)}).encode(), 413, "body_too_large"),
])
def test_bad_input_is_a_4xx_with_a_message(embed_server, raw, status, code):
    s, _, body = embed_server.post("/v1/embeddings", raw=raw)
    assert s == status, body
    assert body["error"]["code"] == code and len(body["error"]["message"]) > 10
    if raw == b'{"input": ""}':  # a bare string has no index to name
        assert body["error"]["message"].startswith("'input' is empty"), body


def test_whitespace_is_a_text_only_empty_is_refused(embed_server, classify_server, rerank_server):
    """Only "" is an empty input (TEI's rule, and OpenAI's): a text of spaces or newlines embeds as its tokens do
    ([CLS] [SEP] here), as a zero-width one did; it failed its whole batch (a chunker's blank chunk among 64)."""
    for blank in ("   ", "\n\t", "\u200b"):
        ids = embed_server.post("/tokenize", {"input": [blank]})[2]["data"][0]["tokens"]
        want = embed_server.post("/v1/embeddings", {"input": [ids]})[2]["data"][0]["embedding"]
        status, _, got = embed_server.post("/v1/embeddings", {"input": ["ok", blank]})
        assert status == 200 and len(ids) == 2 and np.allclose(got["data"][1]["embedding"], want, atol=1e-6), got
        assert embed_server.post("/embed", {"inputs": ["ok", blank]})[0] == 200
        assert rerank_server.post("/v1/rerank", {"query": blank, "documents": ["a", blank]})[0] == 200
        assert classify_server.post("/predict", {"inputs": [["a", blank]]})[0] == 200
    for route, body in (("/embed", {"inputs": ["ok", ""]}), ("/predict", {"inputs": [["a", ""]]})):
        assert (embed_server if route == "/embed" else classify_server).post(route, body)[0] == 400
    assert rerank_server.post("/v1/rerank", {"query": "q", "documents": ["a", ""]})[0] == 400


def test_classify_bad_inputs_and_long_texts(classify_server, embed_server):
    s, _, body = classify_server.post("/v1/classify", {"inputs": ["x"], "top_k": 0})
    assert s == 400 and "top_k" in body["error"]["message"]
    s, _, body = classify_server.post("/v1/classify", {"inputs": ["x"] * 9})
    assert s == 400 and body["error"]["code"] == "too_many_inputs"  # OpenAI answers every bad input 400
    s, _, body = classify_server.post("/v1/embeddings", {"input": ["x"]})  # not published, not served
    assert s == 404 and body["error"]["code"] == "not_found" and "/openapi.json" in body["error"]["message"]
    assert "/v1/embeddings" not in json.loads(classify_server.get("/openapi.json")[1])["paths"]
    long = " ".join(["card transfer account"] * 200)
    s, _, body = classify_server.post("/v1/classify", {"inputs": ["ok", long]})   # --too-long reject
    assert s == 400 and body["error"]["message"].startswith("inputs[1]") and body["error"]["param"] == "inputs"
    s, _, body = classify_server.post("/v1/classify", {"input": [long]})  # the field as the client named it
    assert s == 400 and body["error"]["message"].startswith("input[0]") and body["error"]["param"] == "input"
    s, h, body = embed_server.post("/v1/embeddings", {"input": ["ok", long]})     # default: truncate
    assert s == 200 and h["x-millis-truncated"] == "1"


def test_health_ready_models_openapi_metrics(embed_server):
    assert embed_server.get("/health")[0] == 200
    s, b = embed_server.get("/ready")
    assert s == 200 and json.loads(b)["cold_start_s"] > 0
    card = json.loads(embed_server.get("/v1/models")[1])["data"][0]
    assert card["id"] == "tiny" and card["task"] == "embed" and card["dimensions"] > 0
    assert "/v1/embeddings" in json.loads(embed_server.get("/openapi.json")[1])["paths"]


def _metric(server, name, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    s, text = server.get("/metrics")
    assert s == 200
    total = 0.0
    for fam in text_string_to_metric_families(text.decode()):   # raises if it is not Prometheus text
        for smp in fam.samples:
            if smp.name == name and all(smp.labels.get(k) == v for k, v in labels.items()):
                total += smp.value
    return total


def test_metrics_count_the_requests_made(embed_server):
    before = _metric(embed_server, "millis_requests_total", route="/v1/embeddings", status="200")
    bad = _metric(embed_server, "millis_requests_total", route="/v1/embeddings", status="400")
    for _ in range(5):
        assert embed_server.post("/v1/embeddings", {"input": "card"})[0] == 200
    embed_server.post("/v1/embeddings", {"input": []})
    assert _metric(embed_server, "millis_requests_total", route="/v1/embeddings", status="200") == before + 5
    assert _metric(embed_server, "millis_requests_total", route="/v1/embeddings", status="400") == bad + 1
    assert _metric(embed_server, "millis_batch_size_count") >= 5
    assert _metric(embed_server, "millis_queue_seconds_count") >= 5
    assert _metric(embed_server, "millis_ready") == 1


def test_flood_gets_429_with_retry_after_and_no_5xx(embed_artifact):
    s = Server(embed_artifact, "--max-queue", "8", "--max-inputs", "4", "--max-batch", "4")
    try:
        body = {"input": TEXTS[:4]}
        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(lambda _: s.post("/v1/embeddings", body), range(400)))
        statuses = [r[0] for r in results]
        assert set(statuses) <= {200, 429}, sorted(set(statuses))
        assert statuses.count(429) > 0 and statuses.count(200) > 0
        assert all(int(h["retry-after"]) >= 1 for st, h, _ in results if st == 429)
        assert s.post("/v1/embeddings", body)[0] == 200      # still serving afterwards
    finally:
        assert s.stop() == 0


def test_sigterm_finishes_admitted_requests_and_exits_0(embed_artifact):
    s = Server(embed_artifact, "--max-wait-ms", "1500", "--max-batch", "64")
    texts = TEXTS * 2
    with ThreadPoolExecutor(len(texts)) as pool:
        futs = [pool.submit(s.post, "/v1/embeddings", {"input": [t]}) for t in texts]
        deadline = time.time() + 1.0              # all admitted, waiting in the 1.5 s batching window
        while _metric(s, "millis_inflight_requests") < len(texts) and time.time() < deadline:
            time.sleep(0.01)
        assert _metric(s, "millis_inflight_requests") == len(texts)
        assert s.stop() == 0
        results = [f.result() for f in futs]
    assert [r[0] for r in results] == [200] * len(results)
    assert all(len(r[2]["data"][0]["embedding"]) > 0 for r in results)
    assert s.get("/health")[0] == 0               # the listener is gone


def test_env_vars_configure_the_server(embed_artifact):
    s = Server(embed_artifact, env={"MILLIS_MODEL_NAME": "from-env", "MILLIS_MAX_INPUTS": "2"})
    try:
        assert json.loads(s.get("/v1/models")[1])["data"][0]["id"] == "from-env"
        assert s.post("/v1/embeddings", {"input": ["a", "b", "c"]})[0] == 400
    finally:
        assert s.stop() == 0


def test_bad_artifact_fails_fast_with_a_message(tmp_path):
    r = subprocess.run([sys.executable, "-m", "millis.cli", "serve", str(tmp_path / "nope"), "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_millis_bench_against_the_server(embed_server, tmp_path):
    data = tmp_path / "texts.csv"
    data.write_text("text\n" + "\n".join(TEXTS) + "\n")
    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, "-m", "millis.cli", "bench", f"http://{embed_server.host}:{embed_server.port}",
                        "--data", str(data), "--concurrency", "1,4", "--rate", "50", "--duration", "1",
                        "--warmup", "5", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "bench.json").read_text())
    assert res["route"] == "/v1/embeddings" and res["model"] == "tiny"
    assert [row["load"] for row in res["rows"]] == ["c1", "c4", "r50"]
    for row in res["rows"]:
        assert row["ok"] > 0 and row["errors"] == 0 and row["timeouts"] == 0
        assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
    assert (out / "latency_vs_load.png").stat().st_size > 1000
    table = [ln for ln in r.stdout.splitlines() if ln.lstrip().startswith("│")]
    assert table and not any("…" in ln for ln in table), r.stdout  # a pipe's 80 columns cut every cell
    r = subprocess.run([sys.executable, "-m", "millis.cli", "bench", f"http://{embed_server.host}:{embed_server.port}",
                        "--data", str(data), "--route", "/v1/classify", "--duration", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)  # a route this server lacks: said at once
    assert r.returncode != 0 and "the first request was answered 404" in r.stderr, (r.returncode, r.stderr)


def test_gpu_buckets_and_device_errors(classify_artifact):
    from millis.artifact.model import gpu_buckets, open_model
    from millis.common.errors import MillisError
    from millis.serve.config import ServeConfig

    b = gpu_buckets(32, 512)
    assert b[0] == "b1xs16" and b[-1] == "b32xs512" and len(b) == 6 * 6
    assert gpu_buckets(24, 100) == [f"b{x}xs{t}" for x in (1, 2, 4, 8, 16, 24) for t in (16, 32, 64, 100)]
    # under the batcher's token budget: no graph no batch can reach, and one for every batch that can
    from millis.common.config import Shape
    from millis.runtimes.cuda import pick_bucket

    assert set(gpu_buckets(32, 512)) - set(gpu_buckets(32, 512, 4096)) == {"b32xs512"}  # 17 x 272 > 4096
    for budget in (4096, 1024, 600):
        shapes = tuple(Shape.parse(x) for x in gpu_buckets(32, 512, budget))
        picked = {pick_bucket(shapes, B, T) for B in range(1, 33) for T in range(16, 513, 16) if B * T <= budget}
        assert None not in picked and picked == set(shapes), budget  # each batch has a graph, each graph a batch
    with pytest.raises(MillisError, match="CPU artifact"):
        open_model(classify_artifact, device="cuda")
    with pytest.raises(MillisError, match="device must be"):
        ServeConfig(artifact="x", device="tpu")
    with pytest.raises(MillisError, match="--max-inputs"):
        ServeConfig(artifact="x", max_inputs=10, max_queue=5)
    with pytest.raises(MillisError, match="--log-level must be one of critical, error, warning, info, debug"):
        ServeConfig(artifact="x", log_level="verbose")  # was logging's traceback after parsing
    with pytest.raises(MillisError, match="threads must be >= 0"):
        ServeConfig(artifact="x", threads=-1)  # was a /ready that never turned ready


def test_tokenize_returns_the_ids_inference_runs(embed_server, embed_artifact):
    model = millis.load(embed_artifact)
    long = "word " * 2000
    status, _, body = embed_server.post("/tokenize", {"input": [TEXTS[0], long]})
    assert status == 200, body
    want, cut = model.encoder.token_ids([TEXTS[0], long])
    assert [d["tokens"] for d in body["data"]] == [list(map(int, w)) for w in want]
    assert [d["truncated"] for d in body["data"]] == [False, True] == list(map(bool, cut))
    assert body["data"][1]["count"] == body["max_length"] == model.max_length
    for bad, param in (({"input": 5}, "input"), ({"input": []}, "input"), ({}, "input"),
                       ({"input": "x", "model": "other"}, "model")):
        status, _, err = embed_server.post("/tokenize", bad)
        assert status in (404, 400) and err["error"]["param"] == param, err


def test_token_id_input_embeds_as_its_text(embed_server):
    """OpenAI's token-array input ([int], [[int]], as LangChain's OpenAIEmbeddings sends): the ids run as given
    (no special tokens added), cut at max_length and reported; an id outside the vocabulary is a 400 naming it."""
    text = TEXTS[0]
    ids = embed_server.post("/tokenize", {"input": [text]})[2]["data"][0]["tokens"]  # [CLS] ... [SEP]
    want = embed_server.post("/v1/embeddings", {"input": text})[2]["data"][0]["embedding"]
    for body in ({"input": ids}, {"input": [ids, ids[:3]]}):
        status, headers, got = embed_server.post("/v1/embeddings", body)
        assert status == 200, got
        np.testing.assert_allclose(got["data"][0]["embedding"], want, atol=1e-5)
        assert "x-millis-truncated" not in headers
    assert got["usage"]["prompt_tokens"] == len(ids) + 3 and len(got["data"]) == 2
    status, headers, got = embed_server.post("/v1/embeddings", {"input": [ids * 400]})  # checked in a thread
    assert status == 200 and headers["x-millis-truncated"] == "0", got
    assert got["usage"]["prompt_tokens"] == json.loads(embed_server.get("/v1/models")[1])["data"][0]["max_length"]
    spec = json.loads(embed_server.get("/openapi.json")[1])
    schema = spec["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    vocab = schema["properties"]["input"]["oneOf"][2]["items"]["maximum"] + 1  # the model's vocabulary
    assert embed_server.post("/v1/embeddings", {"input": [[vocab - 1]]})[0] == 200
    for bad, where in (([ids, [ids[0], 5, vocab]], "input[1][2]"), ([ids[0], -3], "input[1]"), ([ids, []], "input[1]"),
                       (ids * 400 + [vocab], f"input[{len(ids) * 400}]")):
        status, _, err = embed_server.post("/v1/embeddings", {"input": bad})
        assert status == 400 and where in err["error"]["message"] and err["error"]["param"] == "input", err


def test_rerank_scores_pairs_as_the_model_reads_them(rerank_server, rerank_artifact):
    """/v1/rerank on a sequence classifier: each (query, document) pair encoded as the HF tokenizer's
    pair encoding (token types included), scored by the model, most relevant first; top_n, documents
    as objects, return_documents; 4xx naming the field."""
    import numpy as np
    from transformers import AutoTokenizer

    from millis.common.numeric import relevance_scores

    model = millis.load(rerank_artifact)
    tok = AutoTokenizer.from_pretrained(str(rerank_artifact / "tokenizer"))
    query, docs = "where is my card?", ["I lost my card", "the weather is nice", "card delivery time", "hi"]
    enc = tok([query] * len(docs), docs, padding=True, return_tensors="np")
    feeds = {k: enc[k].astype(np.int64) for k in model.runtime.input_names}
    logits = np.asarray(model.runtime.run(feeds)[model.meta.output], dtype=np.float64)
    assert logits.shape == (len(docs), 1)
    want = relevance_scores(logits)  # the one logit's sigmoid
    status, _, body = rerank_server.post("/v1/rerank", {"query": query, "documents": [docs[0], {"text": docs[1]},
                                                                                        *docs[2:]],
                                                          "top_n": 3, "return_documents": True})
    assert status == 200, body
    got = body["results"]
    assert [r["index"] for r in got] == list(np.argsort(-want, kind="stable")[:3])
    # `want` ran the pairs in one call; a dynamic int8 variant (the faster one may be chosen) shares its activation
    # scales across a call's rows, and the server runs it one row a call: ~1% of a score apart
    from millis.runtimes.base import shares_scales_across_rows
    atol = 1e-2 if shares_scales_across_rows(model.runtime) else 1e-4
    assert np.allclose([r["relevance_score"] for r in got], want[[r["index"] for r in got]], atol=atol)
    assert [r["document"]["text"] for r in got] == [docs[r["index"]] for r in got]
    assert body["usage"]["total_tokens"] == int(enc["attention_mask"].sum())
    status, _, body = rerank_server.post("/v1/rerank", {"query": query, "documents": docs, "top_n": 8})
    assert status == 200 and len(body["results"]) == 4 and "document" not in body["results"][0]
    status, _, body = rerank_server.post("/v1/rerank", {"query": query, "documents": docs, "top_n": 10**6})
    assert status == 200 and len(body["results"]) == 4  # any top_n past the documents: all of them, as Cohere
    status, _, err = rerank_server.post("/v1/rerank", {"query": "word " * 600, "documents": docs})
    assert status == 400 and err["error"]["code"] == "text_too_long", err  # this server refuses long texts
    assert err["error"]["param"] == "query" and err["error"]["message"].startswith("query is"), err
    status, _, err = rerank_server.post("/v1/rerank", {"query": query, "documents": ["hi", "word " * 600]})
    assert status == 400 and err["error"]["param"] == "documents", err
    assert err["error"]["message"].startswith("documents[1] with the query"), err
    for bad, param, code in (({"documents": docs}, "query", "missing"),
                             ({"query": 1, "documents": docs}, "query", "invalid_type"),
                             ({"query": "", "documents": docs}, "query", "empty_input"),
                             ({"query": "q" * 16385, "documents": docs}, "query", "invalid_value"),
                             ({"query": query, "documents": []}, "documents", "empty_input"),
                             ({"query": query, "documents": ["ok", 3]}, "documents", "invalid_type"),
                             ({"query": query, "documents": docs, "return_documents": "yes"}, "return_documents",
                              "invalid_type")):
        status, _, err = rerank_server.post("/v1/rerank", bad)
        assert status == 400 and (err["error"]["param"], err["error"]["code"]) == (param, code), err


def test_rerank_duplicates_top_n_and_nulls(rerank_server):
    """Identical documents run once and share one score (ties in index order); any positive top_n (1e30 too) past the
    documents gives all of them, as the published schema says; null flags are their defaults; raw_scores gives the
    one logit (the score's log-odds), in the same order."""
    docs = ["same text", "other", "same text", "same text"]
    status, _, body = rerank_server.post("/v1/rerank", {"query": "q", "documents": docs, "return_documents": None})
    assert status == 200, body
    res = body["results"]
    same = [r for r in res if docs[r["index"]] == "same text"]
    assert len({r["relevance_score"] for r in same}) == 1 and [r["index"] for r in same] == [0, 2, 3]
    assert all(0 <= r["relevance_score"] <= 1 and "document" not in r for r in res)
    once = rerank_server.post("/v1/rerank", {"query": "q", "documents": ["same text", "other"]})[2]
    assert body["usage"] == once["usage"]  # the duplicates ran once
    for top_n in (1e30, 2**40, 4.0):
        status, _, got = rerank_server.post("/v1/rerank", {"query": "q", "documents": docs, "top_n": top_n})
        assert status == 200 and len(got["results"]) == 4, got
    status, _, raw = rerank_server.post("/v1/rerank", {"query": "q", "documents": docs, "raw_scores": True})
    assert [r["index"] for r in raw["results"]] == [r["index"] for r in res]
    p = {r["index"]: r["relevance_score"] for r in res}
    assert all(np.isclose(r["relevance_score"], np.log(p[r["index"]] / (1 - p[r["index"]])), atol=1e-4)
               for r in raw["results"]), raw
    for bad in ({"top_n": 0.5}, {"top_n": "3"}, {"top_n": True}, {"raw_scores": "no"}):
        status, _, err = rerank_server.post("/v1/rerank", {"query": "q", "documents": docs, **bad})
        assert status == 400 and err["error"]["param"] == next(iter(bad)), err


def test_rerank_pairs_that_tokenize_alike_share_a_score_and_cohere_fields_are_never_ignored(rerank_server):
    """Texts an uncased tokenizer reads alike ("Card", "card", "card  ") run as one row: one score, ties in index
    order (each ran apart before, a row's last bits its place in the batch). Cohere's ranking fields this route does
    not do are a 400 naming them; max_tokens_per_doc is taken at or above the model's length; an object document
    comes back as sent; a model that is not a string is a 400."""
    docs = ["Card", "card", "CARD", "card  ", "a b", "A  B", "other"]
    status, headers, body = rerank_server.post("/v1/rerank", {"query": "where is my card?", "documents": docs})
    assert status == 200, body
    assert sum(map(int, headers["x-millis-batch-rows"].split(","))) == 3  # three distinct rows ran, not seven
    by = {r["index"]: r["relevance_score"] for r in body["results"]}
    assert len({by[i] for i in range(4)}) == 1 and by[4] == by[5], by
    order = [r["index"] for r in body["results"]]
    assert [i for i in order if i < 4] == [0, 1, 2, 3] and order.index(4) < order.index(5), order
    max_length = json.loads(rerank_server.get("/v1/models")[1])["data"][0]["max_length"]
    for ok in (max_length, 10**6, None, float(max_length)):
        status, _, got = rerank_server.post("/v2/rerank", {"query": "q", "documents": docs, "max_tokens_per_doc": ok})
        assert status == 200 and len(got["results"]) == len(docs), got
    for bad in ({"max_tokens_per_doc": max_length - 1}, {"max_tokens_per_doc": "abc"}, {"max_tokens_per_doc": True},
                {"rank_fields": ["title"]}, {"max_chunks_per_doc": 10}, {"model": 5}, {"truncate": "no"}):
        status, _, err = rerank_server.post("/v1/rerank", {"query": "q", "documents": docs, **bad})
        assert status == 400 and err["error"]["param"] == next(iter(bad)), err
    sent = {"text": "card", "id": "doc-7", "meta": {"source": "faq"}}
    status, _, got = rerank_server.post("/v1/rerank", {"query": "q", "documents": ["x", sent],
                                                        "return_documents": True})
    assert status == 200 and {r["index"]: r["document"] for r in got["results"]} == {0: {"text": "x"}, 1: sent}, got


def test_tei_routes_answer_as_text_embeddings_inference(embed_server, classify_server, classify_artifact,
                                                       rerank_server):
    """TEI's /embed, /predict and /rerank: the same numbers as the OpenAI / Cohere routes, in TEI's shapes."""
    want = [d["embedding"] for d in embed_server.post("/v1/embeddings", {"input": TEXTS[:3]})[2]["data"]]
    status, _, got = embed_server.post("/embed", {"inputs": TEXTS[:3]})
    assert status == 200 and np.allclose(got, want, atol=1e-6), got
    status, _, one = embed_server.post("/embed", {"inputs": TEXTS[0], "truncate": True})
    assert status == 200 and np.allclose(one, want[:1], atol=1e-6)
    status, _, err = embed_server.post("/embed", {"inputs": ["ok", "word " * 2000], "truncate": False})
    assert status == 422 and err["param"] == "inputs" and "inputs[1]" in err["error"], err
    assert embed_server.post("/embed", {"inputs": "word " * 2000})[0] == 200  # the server's rule: truncate
    probs = classify_server.post("/v1/classify", {"inputs": TEXTS[:2], "top_k": 3})[2]["data"]
    status, _, pred = classify_server.post("/predict", {"inputs": [[t] for t in TEXTS[:2]]})  # a batch: lists
    assert status == 200 and len(pred) == 2, pred
    for p, c in zip(pred, probs):
        assert [x["label"] for x in p[:3]] == [x["label"] for x in c["top_k"]]
        assert np.isclose(sum(x["score"] for x in p), 1.0) and p[0]["score"] == max(x["score"] for x in p)
    status, _, single = classify_server.post("/predict", {"inputs": TEXTS[0]})
    assert status == 200 and [x["label"] for x in single] == [x["label"] for x in pred[0]], single
    # alone or with a batch-mate: the same scores (int8: its activation scales cover the batch, 1% of a score apart;
    # fp32: equal), and not the batch-mate's (the guard: rows in the wrong order would fail)
    scores = [{x["label"]: x["score"] for x in p} for p in (single, pred[0], pred[1])]
    one, batched, mate = (np.array([s[k] for k in sorted(s)]) for s in scores)
    atol = 1e-5 if millis.load(classify_artifact).meta.variant.precision == "fp32" else 1e-2
    assert np.abs(one - batched).max() < atol and np.abs(one - mate).max() > 10 * atol, (one, batched, mate)
    docs = ["I lost my card", "the weather is nice", "card delivery time"]
    cohere = rerank_server.post("/v1/rerank", {"query": "where is my card?", "documents": docs})[2]["results"]
    status, _, tei = rerank_server.post("/rerank", {"query": "where is my card?", "texts": docs, "return_text": True})
    assert status == 200 and [r["index"] for r in tei] == [r["index"] for r in cohere], tei
    assert [r["score"] for r in tei] == [r["relevance_score"] for r in cohere]
    assert [r["text"] for r in tei] == [docs[r["index"]] for r in tei]
    assert rerank_server.post("/rerank", {"query": "q", "documents": docs})[2]["param"] == "texts"
    assert rerank_server.post("/rerank", {"query": "q", "texts": docs, "truncate": 1})[2]["param"] == \
        "truncate"
    status, _, err = rerank_server.post("/rerank", {"query": "q", "texts": ["a", "a", "word " * 600]})
    assert status == 422 and err["param"] == "texts", err  # this server rejects long texts
    assert err["error"].startswith("texts[2] with the query"), err
    assert classify_server.post("/embed", {"inputs": "x"})[0] == 404  # another task's route: not served


def test_tei_similarity_and_health_aliases(embed_server, classify_server):
    """TEI's /similarity (huggingface_hub's sentence_similarity posts the same body to the URL it is given: POST / of
    an embedder with `inputs` an object): each sentence's cosine with the source, computed here from /embed's
    vectors; fields named as the request gives them; GET / and /ping answer as /ready (SageMaker's health check)."""
    source, sentences = "where is my card", ["my card is lost", "oil prices and bond yields", "where is my card"]
    vecs = np.array(embed_server.post("/embed", {"inputs": [source, *sentences]})[2], np.float64)
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    want = unit[1:] @ unit[0]
    assert np.ptp(want[:2]) > 1e-3 and np.isclose(want[2], 1.0)  # the guard: the sentences' scores differ
    body = {"inputs": {"source_sentence": source, "sentences": sentences}}
    for route in ("/similarity", "/", "/invocations"):
        status, _, got = embed_server.post(route, body)
        assert status == 200 and np.allclose(got, want, atol=1e-5), (route, got, want)
    assert embed_server.post("/similarity", {**body, "parameters": {"truncate": True}})[0] == 200
    long = {"inputs": {"source_sentence": source, "sentences": ["a", "word " * 2000]},
            "parameters": {"truncate": False}}
    status, _, err = embed_server.post("/similarity", long)
    assert status == 422 and err["error"].startswith("inputs.sentences[1] is longer"), err
    assert err["param"] == "inputs.sentences", err
    long["inputs"] = {"source_sentence": "word " * 2000, "sentences": ["a"]}
    status, _, err = embed_server.post("/similarity", long)
    assert status == 422 and err["error"].startswith("inputs.source_sentence is longer"), err
    assert err["param"] == "inputs.source_sentence", err
    blank = {"inputs": {"source_sentence": "", "sentences": ["a"]}}
    for bad, status, param in (({"inputs": "x"}, 422, "inputs"),
                               ({"inputs": {"sentences": ["a"]}}, 422, "inputs.source_sentence"),
                               (blank, 400, "inputs.source_sentence"),
                               ({"inputs": {"source_sentence": "a", "sentences": []}}, 400, "inputs.sentences"),
                               ({"inputs": {"source_sentence": "a", "sentences": "b"}}, 422, "inputs.sentences"),
                               ({"inputs": {"source_sentence": "a", "sentences": ["b", 3]}}, 422, "inputs.sentences"),
                               ({"inputs": {"source_sentence": "a", "sentences": ["b"] * 64}}, 422, "inputs.sentences"),
                               ({**body, "parameters": {"truncation_direction": "left"}}, 422, "truncation_direction"),
                               ({**body, "parameters": {"truncate": "yes"}}, 422, "parameters.truncate"),
                               ({**body, "parameters": []}, 422, "parameters")):
        got = embed_server.post("/similarity", bad)
        assert got[0] == status and got[2]["param"] == param, (bad, got)  # TEI's error body, millis's param beside
        assert got[2]["error_type"] == ("empty" if status == 400 else "validation") and isinstance(got[2]["error"], str)
    assert classify_server.post("/similarity", body)[0] == 404  # a classifier's server has no such route
    for server in (embed_server, classify_server):
        for path in ("/", "/ping"):
            status, _, text = server.request("GET", path)
            assert status == 200 and json.loads(text)["status"] == "ready", (path, text)


def test_every_encoder_route_reads_truncate_and_predict_reads_hf_parameters(embed_server, classify_server):
    """`truncate` is read on /v1/embeddings and /v1/classify as on the rerank and TEI routes (false refused a long
    text on /v1/rerank and was ignored there), a left cut and prompt_name refused there too; /predict reads the
    `parameters` huggingface_hub's text_classification sends (top_k, function_to_apply: dropped unread before)."""
    long = "word " * 2000
    status, _, err = embed_server.post("/v1/embeddings", {"input": ["ok", long], "truncate": False})
    assert status == 400 and err["error"]["code"] == "text_too_long" and "input[1]" in err["error"]["message"], err
    assert embed_server.post("/v1/embeddings", {"input": ["ok", long], "truncate": True})[0] == 200
    for field, value in (("prompt_name", "query"), ("truncation_direction", "left")):
        status, _, err = embed_server.post("/v1/embeddings", {"input": "ok", field: value})
        assert status == 400 and err["error"]["param"] == field, err
    status, _, err = classify_server.post("/v1/classify", {"inputs": ["ok", long], "truncate": True})
    assert status == 200 and [d["truncated"] for d in err["data"]] == [False, True], err  # this server rejects long
    assert classify_server.post("/v1/classify", {"inputs": ["ok", long]})[0] == 400
    assert classify_server.post("/v1/classify", {"inputs": ["ok", long], "truncate": False})[0] == 400
    text = TEXTS[0]
    every = classify_server.post("/predict", {"inputs": text})[2]
    raw = classify_server.post("/predict", {"inputs": text, "raw_scores": True})[2]
    two = classify_server.post("/predict", {"inputs": text, "parameters": {"top_k": 2}})[2]
    assert len(every) > 2 and two == every[:2], (every, two)
    none = classify_server.post("/predict", {"inputs": text, "parameters": {"function_to_apply": "none"}})[2]
    assert none == raw and none != every
    soft = classify_server.post("/predict", {"inputs": text, "parameters": {"function_to_apply": "softmax"}})[2]
    assert [x["label"] for x in soft] == [x["label"] for x in every] and np.isclose(sum(x["score"] for x in soft), 1)
    sig = classify_server.post("/predict", {"inputs": text, "parameters": {"function_to_apply": "sigmoid"}})[2]
    logits = {x["label"]: x["score"] for x in raw}
    assert all(np.isclose(x["score"], 1 / (1 + np.exp(-logits[x["label"]]))) for x in sig), (sig, raw)
    for bad, param in (({"parameters": {"function_to_apply": "relu"}}, "parameters.function_to_apply"),
                       ({"parameters": {"function_to_apply": {}}}, "parameters.function_to_apply"),  # was a 500
                       ({"parameters": {"top_k": 0}}, "parameters.top_k"), ({"parameters": 3}, "parameters"),
                       ({"raw_scores": True, "parameters": {"function_to_apply": "softmax"}}, "raw_scores")):
        status, _, err = classify_server.post("/predict", {"inputs": text, **bad})
        assert status == 422 and err["param"] == param, (bad, err)


def test_dimensions_cut_and_renormalise(embed_server):
    """OpenAI's `dimensions` (and TEI's): the first d values of each vector, made unit length again where the model's
    vectors are; at the model's own size, the vectors as they are."""
    full = np.array([d["embedding"] for d in embed_server.post("/v1/embeddings", {"input": TEXTS[:2]})[2]["data"]])
    dim = full.shape[1]
    unit = bool(np.allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-4))
    for d in (1, dim // 2, dim):
        got = np.array([x["embedding"] for x in
                        embed_server.post("/v1/embeddings", {"input": TEXTS[:2], "dimensions": d})[2]["data"]])
        cut = full[:, :d]
        assert got.shape == (2, d)
        np.testing.assert_allclose(got, cut / np.linalg.norm(cut, axis=1, keepdims=True) if unit else cut, atol=1e-6)
        tei = np.array(embed_server.post("/embed", {"inputs": TEXTS[:2], "dimensions": d})[2])
        np.testing.assert_allclose(tei, cut / np.linalg.norm(cut, axis=1, keepdims=True), atol=1e-6)
    b64 = embed_server.post("/v1/embeddings", {"input": TEXTS[0], "dimensions": 3, "encoding_format": "base64"})[2]
    assert np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), "<f4").shape == (3,)


def test_model_card_and_tokenize_inputs(embed_server):
    """GET /v1/models/{id} (OpenAI's models.retrieve): the card of the served model, 404 for another; /tokenize takes
    `inputs` (TEI's shape) as well as `input` (millis's)."""
    listed = json.loads(embed_server.get("/v1/models")[1])["data"][0]
    status, body = embed_server.get(f"/v1/models/{listed['id']}")
    assert status == 200 and json.loads(body) == listed
    status, body = embed_server.get("/v1/models/gpt-4")
    assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"
    a = embed_server.post("/tokenize", {"inputs": TEXTS[:2]})  # TEI's answer: a list of tokens per text
    own = embed_server.post("/tokenize", {"input": TEXTS[:2]})[2]["data"]
    assert a[0] == 200 and [[t["id"] for t in toks] for toks in a[2]] == [d["tokens"] for d in own]
    assert embed_server.post("/tokenize", {"input": "x", "inputs": "x"})[0] == 400
    bad = embed_server.post("/tokenize", {"input": "x", "add_special_tokens": False})  # TEI's field, not ours
    assert bad[0] == 400 and bad[2]["error"]["param"] == "add_special_tokens"


def test_raw_relevance_ranks_as_the_score():
    """raw_scores is the last label's log-odds: the order of its probability (the last logit alone is not)."""
    from millis.common.numeric import relevance_scores

    x = np.array([[0.0, 1.0], [-5.0, 0.5], [2.0, 2.5]])
    prob, raw = relevance_scores(x), relevance_scores(x, raw=True)
    assert list(np.argsort(-prob)) == list(np.argsort(-raw)) == [1, 0, 2] != list(np.argsort(-x[:, -1]))
    np.testing.assert_allclose(raw, np.log(prob / (1 - prob)))
    one = np.array([[3.0], [-1.0]])
    np.testing.assert_allclose(relevance_scores(one, raw=True), [3.0, -1.0])
    np.testing.assert_allclose(relevance_scores(one), 1 / (1 + np.exp(-one[:, 0])))


@pytest.fixture(scope="module")
def one_logit_dir(tmp_path_factory):
    """A one-logit cross-encoder (as ms-marco-MiniLM): a tiny BERT with num_labels 1, logits well outside 0..1."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from millis.encoder.tiny import build_tiny

    src, out = build_tiny("bert"), tmp_path_factory.mktemp("one-logit")
    cfg = AutoConfig.from_pretrained(src)
    cfg.num_labels, cfg.id2label, cfg.label2id = 1, {0: "LABEL_0"}, {"LABEL_0": 0}
    torch.manual_seed(0)
    m = AutoModelForSequenceClassification.from_config(cfg)
    with torch.no_grad():
        m.classifier.weight.mul_(50.0)
        m.classifier.bias.fill_(3.0)
    m.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def test_one_logit_cross_encoder_scores_by_sigmoid(one_logit_dir):
    """A one-logit model's relevance is its logit's sigmoid (Cohere's, Jina's and TEI's 0..1), raw_scores the logit
    HF computes for the pair; /v1/classify and /predict score its one label by the sigmoid too (a softmax over one
    label would always say 1)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(one_logit_dir)
    hf = AutoModelForSequenceClassification.from_pretrained(one_logit_dir).eval()
    query, docs = "where is my card?", ["I lost my card", "the weather is nice", "card delivery time"]
    with torch.no_grad():
        want = hf(**tok([query] * 3, docs, padding=True, return_tensors="pt")).logits[:, 0].double().numpy()
    s = Server(one_logit_dir)
    try:
        status, _, body = s.post("/v1/rerank", {"query": query, "documents": docs})
        assert status == 200, body
        got = {r["index"]: r["relevance_score"] for r in body["results"]}
        np.testing.assert_allclose([got[i] for i in range(3)], 1 / (1 + np.exp(-want)), atol=1e-5)
        raw = {r["index"]: r["relevance_score"] for r in
               s.post("/v1/rerank", {"query": query, "documents": docs, "raw_scores": True})[2]["results"]}
        np.testing.assert_allclose([raw[i] for i in range(3)], want, atol=1e-3)
        assert [r["index"] for r in body["results"]] == list(np.argsort(-want, kind="stable"))
        c = s.post("/v1/classify", {"inputs": [docs[0]], "return_logits": True})[2]["data"][0]
        assert np.isclose(c["score"], 1 / (1 + np.exp(-c["logits"][0])), atol=1e-6) and c["score"] < 1.0
        p = s.post("/predict", {"inputs": docs[0]})[2]
        assert len(p) == 1 and np.isclose(p[0]["score"], c["score"])
    finally:
        assert s.stop() == 0


def test_sigmoid_keeps_very_negative_logits_apart():
    """A reranker's far-off documents: 1 + tanh(x / 2) cancelled to 0 at -38 and -45 (a tie ranked by index, where
    raw_scores kept them apart); e^x / (1 + e^x) keeps their relative precision, and no x overflows."""
    import warnings

    from millis.common.numeric import sigmoid

    x = np.array([-745.0, -100.0, -45.0, -38.0, -30.0, 0.0, 30.0, 1000.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning either way
        got = sigmoid(x)
    want = np.array([np.exp(v) / (1 + np.exp(v)) if v < 0 else 1 / (1 + np.exp(-v)) for v in x])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert 0 < got[1] < got[2] < got[3] < got[4] and got[5] == 0.5 and got[-1] == 1.0
    assert sigmoid(x.astype(np.float32)).dtype == np.float32 and sigmoid(np.float32(-90.0)) > 0


def test_tei_shapes_routes_and_status_codes(embed_server, classify_server, rerank_server):
    """TEI as its clients send it: /predict reads a list of 1-2 strings as ONE sequence (a text, or a text and its
    text_pair) and a list of lists as a batch; /embed takes token ids; POST / and /invocations route by the model's
    type (huggingface_hub's InferenceClient posts to the URL it is given) and GET /info describes it; Cohere's v2
    client posts to /v2/rerank. TEI's status codes: an empty input 400, too many inputs 422; fields millis does
    not do (a left cut, prompt_name) are refused, not ignored."""
    q, d = "where is my card?", "I lost my card"
    status, _, pair = classify_server.post("/predict", {"inputs": [q, d]})
    assert status == 200 and isinstance(pair[0], dict), pair  # one sequence: one flat list
    raw = rerank_server.post("/v1/rerank", {"query": q, "documents": [d]})[2]["results"][0]
    kind = json.loads(rerank_server.request("GET", "/info")[2])["model_type"]
    assert kind == {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}, kind
    one = rerank_server.post("/predict", {"inputs": [q, d]})[2]  # the pair encoded as the rerank route encodes it
    assert len(one) == 1 and np.isclose(one[0]["score"], raw["relevance_score"], atol=1e-3), (one, raw)
    status, _, batch = classify_server.post("/predict", {"inputs": [[q, d], [TEXTS[0]], [q, "other"]]})
    assert status == 200 and len(batch) == 3 and all(isinstance(b, list) for b in batch), batch
    alone = classify_server.post("/predict", {"inputs": [q, d]})[2]
    assert [x["label"] for x in batch[0]] == [x["label"] for x in alone]
    single = classify_server.post("/predict", {"inputs": TEXTS[0]})[2]
    assert [x["label"] for x in batch[1]] == [x["label"] for x in single]
    for bad, status in (({"inputs": ["a", "b", "c"]}, 422), ({"inputs": [["a", "b", "c"]]}, 422),
                        ({"inputs": []}, 400), ({"inputs": [["a"], [""]]}, 400), ({"inputs": [["a"]] * 9}, 422),
                        ({"inputs": "a", "truncation_direction": "left"}, 422),
                        ({"inputs": "a", "prompt_name": "query"}, 422)):
        got = classify_server.post("/predict", bad)
        assert got[0] == status, (bad, got)
    status, _, err = classify_server.post("/predict", {"inputs": [["a"], ["b"], ["q", "word " * 600]]})
    assert status == 422 and err["error"].startswith("inputs[2] with its first text"), err  # its place
    # a batch of pairs with different first texts: one queue job (it was one per first text, 64 pairs 95 ms
    # against 8), each answer in its place
    pairs = [["where is my card", "card delivery"], ["hi", "hello"], ["a", "b"], ["where is my card", "lost"]]
    status, headers, batch = classify_server.post("/predict", {"inputs": pairs})
    assert status == 200 and sum(map(int, headers["x-millis-batch-rows"].split(","))) == 4, headers
    for p, got in zip(pairs, batch):  # (int8's activation scales cover its batch: 1% of a score apart)
        one = {x["label"]: x["score"] for x in classify_server.post("/predict", {"inputs": p})[2]}
        assert one.keys() == {x["label"] for x in got} and all(abs(one[x["label"]] - x["score"]) < 1e-2 for x in got)
    # this server refuses long texts, but an explicit truncate true cuts them (TEI: truncate.unwrap_or(auto))
    for server, route, body in ((classify_server, "/predict", {"inputs": "word " * 600}),
                                (rerank_server, "/rerank", {"query": "q", "texts": ["word " * 600]})):
        assert server.post(route, body)[0] == 422
        assert server.post(route, {**body, "truncate": True})[0] == 200
    status, _, err = classify_server.post("/predict", {"inputs": [["word " * 600, "x"]], "truncate": False})
    assert status == 422 and err["param"] == "inputs", err  # not a `query` /predict does not have
    assert err["error"].startswith("inputs[0]'s first text is longer"), err
    status, _, err = rerank_server.post("/rerank", {"query": "q", "texts": ["a"], "truncation_direction": "left"})
    assert status == 422 and err["param"] == "truncation_direction", err  # refused, not a right cut
    ids = embed_server.post("/tokenize", {"input": ["card"]})[2]["data"][0]["tokens"]
    want = embed_server.post("/v1/embeddings", {"input": [ids]})[2]["data"][0]["embedding"]
    status, _, got = embed_server.post("/embed", {"inputs": ids})
    assert status == 200 and np.allclose(got[0], want, atol=1e-6), got
    assert embed_server.post("/embed", {"inputs": []})[0] == 400
    assert embed_server.post("/embed", {"inputs": ["x"] * 65})[0] == 422
    for route in ("/", "/invocations"):
        assert np.allclose(embed_server.post(route, {"inputs": "card"})[2], embed_server.post(
            "/embed", {"inputs": "card"})[2], atol=1e-6)
        status, _, got = classify_server.post(route, {"inputs": TEXTS[0]})
        assert status == 200 and [x["label"] for x in got] == [x["label"] for x in single], got
    status, _, info = embed_server.request("GET", "/info")
    info = json.loads(info)
    assert status == 200 and info["model_type"]["embedding"]["pooling"] == "mean" and info["max_client_batch_size"] == 64
    info = json.loads(classify_server.request("GET", "/info")[2])
    assert set(info["model_type"]["classifier"]["id2label"].values()) == {x["label"] for x in single}
    v1 = rerank_server.post("/v1/rerank", {"query": q, "documents": [d, "other"]})[2]["results"]
    v2 = rerank_server.post("/v2/rerank", {"query": q, "documents": [d, "other"]})[2]["results"]
    assert [(r["index"], r["relevance_score"]) for r in v1] == [(r["index"], r["relevance_score"]) for r in v2]



def test_a_classifier_of_three_labels_is_not_a_reranker(classify_server):
    """A classifier of three or more labels (an intent or NLI model) has no label that is relevance: its rerank
    routes are a 400 naming the model (TEI's /rerank: TEI's 424; they ranked by its last label's probability,
    numbers that looked like relevance) and its spec offers none; its labels still answer on /v1/classify and
    /predict. A head of two labels scored apart (multi-label) is refused too."""
    from millis.common.numeric import not_a_reranker, relevance_scores

    docs = ["I lost my card", "card delivery time"]
    for route, body in (("/v1/rerank", {"query": "q", "documents": docs}),
                        ("/v2/rerank", {"query": "q", "documents": docs}), ("/rerank", {"query": "q", "texts": docs})):
        status, _, err = classify_server.post(route, body)
        if route == "/rerank":  # TEI's answer to /rerank on a classifier: 424, its backend error, in its body
            assert status == 424 and err["error_type"] == "backend" and "/predict answers" in err["error"], err
        else:
            err = {**err["error"], "error": err["error"]["message"]}
            assert status == 400 and "/v1/classify answers" in err["error"], (route, err)
        assert err["param"] == "model" and err["code"] == "model_not_reranker", (route, err)
        assert "is a classifier of 3 labels, not a cross-encoder" in err["error"], (route, err)
    assert classify_server.post("/predict", {"inputs": ["q", docs[0]]})[0] == 200
    paths = json.loads(classify_server.get("/openapi.json")[1])["paths"]  # not offered in its spec either
    assert "/v1/classify" in paths and not {"/v1/rerank", "/v2/rerank", "/rerank"} & set(paths)
    assert not_a_reranker(1) == not_a_reranker(2) == not_a_reranker(1, "regression") == ""
    assert "4 labels" in not_a_reranker(4) and "multi_label_classification head of 2" in \
        not_a_reranker(2, "multi_label_classification")  # two sigmoids: two answers, not one relevance
    with pytest.raises(ValueError, match="3 labels"):
        relevance_scores(np.zeros((2, 3)))
    from millis.serve.openapi import encoder_spec

    for labels, problem_type, reranks in ((1, "", True), (2, "", True), (2, "multi_label_classification", False),
                                          (2, "regression", False), (3, "", False)):
        spec = encoder_spec("classify", "m", 8, labels, labels, problem_type=problem_type)["paths"]
        assert ({"/v1/rerank", "/v2/rerank", "/rerank"} <= set(spec)) == reranks, (labels, problem_type)


def _recv_all(c, timeout: float = 10.0) -> bytes:
    c.settimeout(timeout)
    out = b""
    while True:
        try:
            chunk = c.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        out += chunk
    return out


def test_the_connection_bounds_its_head_in_size_and_time(embed_artifact):
    """millis.serve.guard: a request head over 64 KB is answered 431 and closed before it is all taken (a 100 MB
    header took gigabytes and stalled everyone's requests); a connection that sends nothing, or half a head, is
    answered 408 and closed after --head-timeout-s (silent connections held every file descriptor). Bodies,
    pipelined requests and keep-alive are unaffected."""
    import time

    s = Server(embed_artifact, "--head-timeout-s", "1")
    try:
        with socket.create_connection((s.host, s.port)) as c:
            c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 60_000)
            for _ in range(20):  # 20 more 60 KB pieces, as a slow client sends them; refused after the second
                try:
                    c.sendall(b"a" * 60_000)
                except (BrokenPipeError, ConnectionResetError):
                    break
            got = _recv_all(c)
        assert got.startswith(b"HTTP/1.1 431"), got[:100]
        assert s.post("/v1/embeddings", {"input": ["a bystander"]})[0] == 200
        t0 = time.perf_counter()
        with socket.create_connection((s.host, s.port)) as silent, socket.create_connection((s.host, s.port)) as half:
            half.sendall(b"GET /health HTTP/1.1\r\nHo")
            assert _recv_all(silent).startswith(b"HTTP/1.1 408") and _recv_all(half).startswith(b"HTTP/1.1 408")
        assert time.perf_counter() - t0 < 5
        body = json.dumps({"input": ["x " * 100_000]}).encode()  # a 200 KB body: not the head's
        head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection((s.host, s.port)) as c:
            c.sendall(head + body + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # and one pipelined after it
            time.sleep(1.5)  # an idle keep-alive connection is uvicorn's (30 s), not the head's timeout
            c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            got = _recv_all(c)
        assert got.count(b"HTTP/1.1 200") == 3, got[:300]
    finally:
        assert s.stop() == 0
