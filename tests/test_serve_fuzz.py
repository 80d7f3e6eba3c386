"""schemathesis against each server's own /openapi.json: no 5xx, every status / content type / body
as the spec says, invalid data refused with a 4xx (and, for the encoder, every valid request
served). Bounded and seeded, so the run is deterministic; MILLIS_FUZZ_EXAMPLES raises the count
(bench/serve_fuzz.py records a run of over 2,000 requests per server)."""
from __future__ import annotations

import os

import pytest

from test_serve import Server, _metric, embed_artifact, rerank_artifact  # noqa: F401 -- fixtures
from test_serve_gen import TEMPLATE, build_llama

pytest.importorskip("schemathesis")
pytestmark = pytest.mark.serve
EXAMPLES = int(os.environ.get("MILLIS_FUZZ_EXAMPLES", "25"))


def fuzz_server(s: Server, tmp_path, positive: bool) -> None:
    from millis.loadgen.fuzz import fuzz

    res = fuzz(f"http://{s.host}:{s.port}", tmp_path / "st", EXAMPLES, seed=13, positive=positive)
    assert res.ok, res.output[-6000:]
    assert res.generated >= 5 * EXAMPLES // 2, res.output[-2000:]  # it did send requests
    assert _metric(s, "millis_requests_total", status="500") == 0
    assert s.get("/ready")[0] == 200  # still serving


def test_fuzz_the_embeddings_server(embed_artifact, tmp_path):  # noqa: F811
    s = Server(embed_artifact, "--model-name", "tiny-embed", "--max-inputs", "8")
    try:
        fuzz_server(s, tmp_path, positive=True)
    finally:
        assert s.stop() == 0


def test_fuzz_the_classify_server(classify_artifact, tmp_path):
    s = Server(classify_artifact, "--max-inputs", "8")
    try:
        fuzz_server(s, tmp_path, positive=True)
    finally:
        assert s.stop() == 0


def test_fuzz_the_reranker_server(rerank_artifact, tmp_path):  # noqa: F811
    """A one-logit cross-encoder: its spec has the rerank routes (a 3-label classifier's has none: they refuse it)."""
    s = Server(rerank_artifact, "--max-inputs", "8")
    try:
        fuzz_server(s, tmp_path, positive=True)
    finally:
        assert s.stop() == 0


def test_fuzz_the_generation_server(tmp_path):
    model = build_llama(tmp_path / "fuzz-llama", TEMPLATE)
    s = Server(model, "--max-batch", "4", "--max-seq", "256", "--max-tokens", "16")
    try:
        fuzz_server(s, tmp_path, positive=False)
    finally:
        assert s.stop() == 0
