"""Grammars are compiled off the generation server's event loop, every time: the route compiles one matcher a
choice in a thread and the engine's add takes them (it compiled again on the loop, which an eviction from the
64-entry cache, or the tokenizer's view still being built, made a 1-1000 ms hold for every other request)."""
from __future__ import annotations

import asyncio

import pytest
from gguf_fixtures import random_llama_tensors, write_tiny_gguf
from starlette.testclient import TestClient
from test_serve_structured import CFG, SCHEMA

from millis.gen import EngineConfig, open_engine
from millis.gen.grammar import Grammars
from millis.serve.config import ServeConfig
from millis.serve.generation.app import create_gen_app


def test_every_grammar_compile_runs_off_the_loop(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(str(path), CFG, random_llama_tensors(CFG, "Q8_0", embed_qtype="Q8_0"))
    on_loop: list[bool] = []
    real = Grammars.matcher

    def watched(self, grammar):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no loop in this thread: off the loop
            on_loop.append(False)
        return real(self, grammar)
    monkeypatch.setattr(Grammars, "matcher", watched)
    app = create_gen_app(ServeConfig(artifact=str(path), max_batch=4, warmup=False),
                         lambda: open_engine(str(path), EngineConfig(max_batch=4, max_seq=512)))
    rf = {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA}}
    with TestClient(app) as client:
        for _ in range(100):
            if client.get("/ready").status_code == 200:
                break
            asyncio.run(asyncio.sleep(0.1))
        for n in (1, 3):
            r = client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "trip?"}], "response_format": rf, "n": n, "seed": 1,
                "max_tokens": 60})
            assert r.status_code == 200, r.text
            assert len(r.json()["choices"]) == n
    assert len(on_loop) == 4 and not any(on_loop), on_loop  # one compile (or cached copy) a choice, none on the loop


pytestmark = pytest.mark.serve
