"""TEI's /embed_all: every token's last hidden state (special tokens too), before pooling, from the native, torch,
ONNX Runtime and OpenVINO runtimes, against transformers' last_hidden_state in fp32 on the ids the server's /tokenize
gives; a runtime whose graph returns its pooled output alone (an ONNX artifact exported before) answers 424; bad fields answer 4xx naming them; the batcher
runs token jobs and pooled ones in calls of their own kind."""
from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from millis.artifact.model import open_model
from millis.common.config import Shape
from millis.common.errors import MillisError
from millis.encoder.text import bucket_length
from millis.kernels.native import native_isa
from millis.serve.config import ServeConfig
from millis.serve.encoder import app as appmod
from millis.serve.encoder.batcher import Batcher, Job

TEXTS = ["where is my card?", "hello", "the exchange rate I was given for my transfer looks wrong to me"]


def hf_states(folder, ids: list[int]) -> np.ndarray:
    """transformers' last_hidden_state of one row of ids, fp32."""
    import torch
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(folder, add_pooling_layer=False).eval()
    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids])).last_hidden_state[0].numpy()


@contextlib.contextmanager
def serve(model, **cfg):
    """A TestClient of the encoder app over `model`, once it answers /ready."""
    with TestClient(appmod.create_app(ServeConfig(artifact="x", model_name="m", **cfg), lambda: model,
                                      task="embed")) as client:
        deadline = time.time() + 60
        while client.get("/ready").status_code != 200 and time.time() < deadline:
            time.sleep(0.02)
        yield client


def artifact(tmp_path, variant: str, measure):
    from millis.optimize.config import OptimizeConfig
    from millis.optimize.pipeline import optimize

    out = tmp_path / variant
    optimize(OptimizeConfig(source="tiny:bert", task="embed", out=str(out), target=Shape(1, 16), variants=(variant,),
                            measure=measure))
    return open_model(out)


@pytest.mark.parametrize("variant", ["torch-fp32", "native-fp32", "ort-fp32-fused", "ov-fp32"])
def test_embed_all_is_the_last_hidden_state(tmp_path, tiny_dirs, quick_measure, variant):
    if variant == "native-fp32" and native_isa() is None:
        pytest.skip("no native kernels here")
    model = open_model("tiny:bert", "embed") if variant == "torch-fp32" else artifact(tmp_path, variant, quick_measure)
    assert model.meta.variant.name == variant
    with serve(model) as client:
        r = client.post("/embed_all", json={"inputs": TEXTS})
        assert r.status_code == 200, r.text
        got = r.json()
        ids = [row["tokens"] for row in client.post("/tokenize", json={"input": TEXTS}).json()["data"]]
        assert len(got) == len(TEXTS) and len({len(i) for i in ids}) >= 2  # rows of other lengths
        for states, row in zip(got, ids):
            want = hf_states(tiny_dirs["bert"], row)
            assert np.asarray(states).shape == want.shape == (len(row), 32)
            np.testing.assert_allclose(states, want, atol=1e-4)
        # one text as a string; its states as in the batch (no batch-mate changes a row)
        one = client.post("/embed_all", json={"inputs": TEXTS[1]}).json()
        np.testing.assert_allclose(one[0], got[1], atol=1e-5)
        # in process, as the route answers
        for a, b in zip(model.token_embeddings(TEXTS), got):
            np.testing.assert_allclose(a, b, atol=1e-5)
        # the mean of a text's states, unit length, is /embed's vector (tiny:bert pools by the mean)
        vec = np.asarray(client.post("/embed", json={"inputs": TEXTS[2]}).json()[0])
        mean = np.asarray(got[2]).mean(0)
        np.testing.assert_allclose(mean / np.linalg.norm(mean), vec, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "roberta", "mpnet", "deberta-v2", "modernbert"])
def test_native_token_states_match_hf_per_token(tmp_path, tiny_dirs, family):
    """The native runtime's token states against transformers' last_hidden_state, token by token, with padding:
    RoBERTa's shifted positions, MPNet's and DeBERTa's relative terms, ModernBERT's windows (a row past them), and a
    BERT row with token type 1."""
    import torch
    from transformers import AutoModel

    from conftest import native_fp32
    from millis.common.samples import sample_texts
    from millis.encoder.tasks import base_model_kwargs

    if native_isa() is None:
        pytest.skip("no native kernels here")
    folder = tiny_dirs[family]
    src, enc, runtime = native_fp32(folder, "embed", tmp_path)
    feeds = enc.encode(sample_texts()[:3] + [" ".join(sample_texts() * 3)]).feeds
    mask = feeds["attention_mask"]
    assert mask.sum(1).max() > 2 * 4 + 1 and mask.sum(1).min() < mask.shape[1]  # past ModernBERT's window; padding
    if family == "bert":
        feeds["token_type_ids"][1, 3:] = 1
    got = runtime.token_states(feeds)
    hf = AutoModel.from_pretrained(folder, **base_model_kwargs(src.model_type)).eval()
    with torch.no_grad():
        want = hf(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    want = want * mask[..., None]
    assert got.shape == want.shape and not got[mask == 0].any()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_embed_all_refusals(tmp_path, quick_measure):
    model = open_model("tiny:bert", "embed")
    with serve(model, max_batch_tokens=64, too_long="reject") as client:
        for body, status, param in (({"inputs": TEXTS, "normalize": True}, 422, "normalize"),
                                    ({"inputs": TEXTS, "dimensions": 8}, 422, "dimensions"),
                                    ({"inputs": []}, 400, "inputs"),
                                    ({"inputs": 3}, 422, "inputs"),
                                    ({"inputs": TEXTS, "truncation_direction": "left"}, 422, "truncation_direction"),
                                    ({"inputs": ["word " * 10] * 8}, 413, "inputs"),  # 96 token vectors > 64
                                    ({"inputs": "word " * 2000, "truncate": False}, 422, "inputs")):
            r = client.post("/embed_all", json=body)
            assert r.status_code == status and r.json()["param"] == param, (body, r.text)
            assert "error_type" in r.json()  # TEI's error shape
        assert client.post("/embed_all", json={"inputs": TEXTS}).status_code == 200  # the server still answers
        assert "424" in client.get("/openapi.json").json()["paths"]["/embed_all"]["post"]["responses"]
    ort = artifact(tmp_path, "ort-fp32-fused", quick_measure)
    ort = open_model(without_states(ort.path))  # an artifact exported before its graph gave the token states
    with serve(ort) as client:
        r = client.post("/embed_all", json={"inputs": TEXTS})
        assert r.status_code == 424 and r.json()["code"] == "no_token_states", r.text
        assert "onnxruntime" in r.json()["error"]
        assert "/embed_all" not in client.get("/openapi.json").json()["paths"]  # published where it answers alone
        assert client.post("/embed", json={"inputs": TEXTS}).status_code == 200
    with pytest.raises(MillisError, match=r"runtime \(onnxruntime\) returns pooled vectors alone"):
        ort.token_embeddings(TEXTS)


def without_states(art: Path) -> Path:
    """A copy of artifact `art` whose graph is as millis exported it before 2026-12-07: the pooled output alone (the
    states' output and the nodes only it reads dropped), its files hashed anew."""
    import shutil

    import onnx

    from millis.artifact import store
    from millis.encoder.source import STATES_NAME
    from millis.optimize.build.graph import prune

    def fill(tmp: Path):
        shutil.copytree(art, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(store.META))
        for f in tmp.rglob("*.onnx"):
            m = onnx.load(str(f))
            kept = [o for o in m.graph.output if o.name != STATES_NAME]
            assert len(kept) == len(m.graph.output) - 1, f
            del m.graph.output[:]
            m.graph.output.extend(kept)
            prune(m)
            onnx.save(m, str(f))
        return store.read_meta(art)

    return store.write(art.with_name(art.name + "-old"), fill)


@pytest.mark.parametrize("variant", ["ort-int8-dynamic", "ort-int8-static", "ov-int8", "ort-fp32"])
def test_every_exported_graph_gives_the_states(tmp_path, tiny_dirs, variant):
    """Each ONNX Runtime / OpenVINO variant of an embedder (dynamic and static int8, NNCF int8, the unfused graph)
    gives every token's state near transformers' (fp32 within 1e-4), zeros where the mask drops a token, and its
    pooled output as before; a SPLADE model's are the encoder's under its masked-LM head."""
    import torch
    from transformers import AutoModel, AutoModelForMaskedLM

    from millis.common.samples import sample_texts
    from millis.encoder.source import resolve
    from millis.encoder.text import TextEncoder
    from millis.encoder.tiny import build_tiny
    from millis.optimize.build.variants import CATALOG, Builder
    from millis.optimize.judge import open_variant
    from millis.runtimes.base import gives_token_states

    for family in ("bert", "bert-splade"):
        folder = tiny_dirs["bert"] if family == "bert" else build_tiny(family)
        src = resolve(str(folder))
        enc = TextEncoder(src.path, src.input_names, 128, segments=src.segments)
        feeds = enc.encode(sample_texts()[:4]).feeds
        mask = feeds["attention_mask"]
        assert mask.sum(1).min() < mask.shape[1]  # padding
        builder = Builder(src, "embed", tmp_path / family, calibration=lambda: [feeds])
        vdir, _ = builder.build(CATALOG[variant])
        rt = open_variant("embed", 2, src, CATALOG[variant], vdir)
        assert gives_token_states(rt)
        got = rt.token_states(feeds)
        hf = (AutoModelForMaskedLM if family != "bert" else AutoModel).from_pretrained(folder).eval()
        with torch.no_grad():
            out = hf(**{k: torch.from_numpy(v) for k, v in feeds.items()}, output_hidden_states=True)
        want = out.hidden_states[-1].numpy() * mask[..., None]
        assert got.shape == want.shape and got.dtype == np.float32 and not got[mask == 0].any()
        if variant == "ort-fp32":
            np.testing.assert_allclose(got, want, atol=1e-4)
        on = mask.astype(bool)
        a, b = got[on], want[on]  # (tokens, H)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.min() > 0.95, (family, variant, cos.min())
        emb = rt.run(feeds)["embedding"]  # the pooled output as before: (B, H) mean, (B, V) SPLADE
        assert emb.shape == (len(mask), out.logits.shape[-1] if family != "bert" else want.shape[-1])
        if family == "bert":  # tiny:bert's mean of the token states, unit length
            mean = want.sum(1) / mask.sum(1, keepdims=True)
            mean /= np.linalg.norm(mean, axis=1, keepdims=True)
            assert ((emb * mean).sum(1) / np.linalg.norm(emb, axis=1)).min() > 0.99


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_cuda_runtime_gives_the_states(tiny_dirs, device):
    """The CUDA runtime's token states (its encoder run eagerly; the graphs capture the pooled forward): on the CPU
    stand-in in fp32 within 1e-4 of transformers' last_hidden_state on BERT (a [CLS]-pooled one too: every token's
    state, not the last layer's first rows alone), ModernBERT and DeBERTa-v2, zeros where the mask drops a token; on
    CUDA in fp16 within 3e-2; the pooled output unchanged beside them."""
    import torch
    from transformers import AutoModel

    from millis.common.samples import sample_texts
    from millis.encoder.source import Pooling, resolve
    from millis.encoder.tasks import base_model_kwargs
    from millis.encoder.text import TextEncoder
    from millis.runtimes.base import gives_token_states
    from millis.runtimes.cuda import CudaGraphRuntime

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    opts = {"dtype": "fp32", "fuse": "torch", "device": "cpu"} if device == "cpu" else {"dtype": "fp16"}
    for family, pooling in (("bert", "mean"), ("bert", "cls"), ("modernbert", "mean"), ("deberta-v2", "mean")):
        folder = tiny_dirs[family]
        src = resolve(str(folder))
        feeds = TextEncoder(src.path, src.input_names, 128).encode(sample_texts()[:3] + ["hi"]).feeds
        mask = feeds["attention_mask"]
        rt = CudaGraphRuntime(folder, "cuda-fp16", src.input_names, "embedding", "embed", Pooling(pooling),
                              buckets=(Shape(4, 64),), **opts)
        assert gives_token_states(rt)
        got = rt.token_states(feeds)
        hf = AutoModel.from_pretrained(folder, **base_model_kwargs(src.model_type)).eval()
        with torch.no_grad():
            want = hf(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
        want = want * mask[..., None]
        assert got.shape == want.shape and got.dtype == np.float32 and not got[mask == 0].any()
        np.testing.assert_allclose(got, want, atol=1e-4 if device == "cpu" else 3e-2, err_msg=f"{family} {pooling}")
        assert rt.run(feeds)["embedding"].shape == (len(mask), want.shape[-1])


def test_dynamic_int8_states_are_each_texts_own(tmp_path, quick_measure):
    """ONNX Runtime's dynamic int8 shares one activation scale across a call's rows: its token states, in process and
    served, are run one row a call padded to its bucket (as `run` and the server run it), so a text's states do not
    depend on the texts beside it, and `token_embeddings` answers what /embed_all does."""
    model = artifact(tmp_path, "ort-int8-dynamic", quick_measure)
    assert model.runtime.shares_scales_across_rows
    alone = model.token_embeddings([TEXTS[1]])[0]
    batched = model.token_embeddings(TEXTS)
    assert [len(b) for b in batched] == [len(r) for r in model.encoder.token_ids(TEXTS)[0]]
    np.testing.assert_array_equal(batched[1], alone)
    with serve(model) as client:
        got = client.post("/embed_all", json={"inputs": TEXTS}).json()
    for a, b in zip(got, batched):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_the_answer_goes_out_in_pieces():
    """/embed_all's JSON is written in pieces of about PIECE_FLOATS, the loop free between them, and is the JSON of
    the arrays (orjson's floats)."""
    import orjson

    from millis.serve.encoder.tei_routes import PIECE_FLOATS, json_pieces

    out = [np.random.default_rng(0).standard_normal((n, 384)).astype(np.float32) for n in (300, 1, 7)]

    async def collect():
        return [p async for p in json_pieces(out)]

    pieces = asyncio.run(collect())
    assert len(pieces) > 300 * 384 // PIECE_FLOATS and max(map(len, pieces)) < 20 * PIECE_FLOATS
    assert b"".join(pieces) == orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY)
    assert asyncio.run(_one(json_pieces([np.zeros((0, 4), np.float32)]))) == b"[[]]"


async def _one(gen) -> bytes:
    return b"".join([p async for p in gen])


def test_batcher_runs_each_kind_in_calls_of_its_own():
    """Token jobs and pooled jobs of one bucket never share a call; each job gets its own kind's rows (a token job:
    its row's tokens alone, the padding cut); a batcher without token states refuses a token job at submit."""
    calls = []

    def pooled(rows, t):
        calls.append(("pooled", len(rows)))
        return np.array([[t, r[0]] for r in rows], np.float32)

    def states(rows, t):
        calls.append(("tokens", len(rows)))
        return np.array([[[r[0], k] for k in range(t)] for r in rows], np.float32)

    async def main():
        loop = asyncio.get_running_loop()
        b = Batcher(pooled, 64, 8, 4096, 0.0, 100, infer_tokens=states)
        jobs = [Job([[7] * 5, [8] * 3], loop.create_future(), tokens=True), Job([[9] * 4], loop.create_future()),
                Job([[10] * 6], loop.create_future(), tokens=True)]
        for j in jobs:
            b.submit(j)
        b.start()
        await asyncio.gather(*(j.future for j in jobs))
        await b.close()
        bare = Batcher(pooled, 64, 8, 4096, 0.0, 100)
        with pytest.raises(ValueError, match="no token states"):
            bare.submit(Job([[1]], loop.create_future(), tokens=True))
        return jobs

    jobs = asyncio.run(main())
    assert sorted(calls) == [("pooled", 1), ("tokens", 3)]
    assert [o.shape for o in jobs[0].out] == [(5, 2), (3, 2)] and jobs[0].out[1][:, 0].tolist() == [8] * 3
    assert jobs[1].out[0].tolist() == [bucket_length(4, 64), 9]  # the bucket's length and the row's first id
    assert jobs[2].out[0][:, 1].tolist() == list(range(6))
