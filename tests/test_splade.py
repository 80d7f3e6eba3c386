"""SPLADE (sentence-transformers' SparseEncoder: a masked LM + SpladePooling; TEI's /embed_sparse): the folder read as
SPLADE pooling (or refused by name), the native head against transformers' masked-LM logits pooled by hand (max over
a text's tokens of log(1 + relu)), every exported runtime through optimize, and the served routes."""
from __future__ import annotations

import contextlib
import json
import shutil
import time

import numpy as np
import pytest
from starlette.testclient import TestClient

from millis.common.config import Shape
from millis.common.errors import MillisError
from millis.encoder.source import SPLADE, inspect_dir, read_pooling
from millis.encoder.tiny import build_tiny
from millis.kernels.native import native_isa, runnable_isas

TEXTS = ["where is my card?", "hello", "the exchange rate I was given for my transfer looks wrong to me, please "
         "check it again and tell me what the bank charged", "x"]


def hf_splade(folder, texts: list[str]) -> np.ndarray:
    """transformers' masked-LM logits of each text alone (no padding), pooled as SpladePooling: (N, V) float32."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    hf = AutoModelForMaskedLM.from_pretrained(str(folder)).eval()
    rows = []
    with torch.no_grad():
        for t in texts:
            logits = hf(**tok([t], return_tensors="pt")).logits[0]       # (T, V)
            rows.append(torch.log1p(torch.relu(logits)).amax(0).numpy())
    return np.stack(rows)


def untied_copy(folder, out):
    """`folder`'s SPLADE model with its vocabulary matrix untied from the word embeddings, and other values in it and
    its decoder bias (a checkpoint transformers reads with a matrix of its own)."""
    import torch
    from transformers import AutoModelForMaskedLM

    shutil.copytree(folder, out)
    hf = AutoModelForMaskedLM.from_pretrained(str(folder))
    hf.config.tie_word_embeddings = False
    m = AutoModelForMaskedLM.from_config(hf.config)
    m.load_state_dict(hf.state_dict(), strict=False)
    with torch.no_grad():
        dec = m.get_output_embeddings()
        assert dec.weight.data_ptr() != m.get_input_embeddings().weight.data_ptr()  # untied: its own matrix
        dec.weight.mul_(-0.7)
        dec.bias.copy_(dec.bias + 1.0)
    m.save_pretrained(out)
    return out


def normalized_copy(folder, out):
    """`folder` with a Normalize module after its SpladePooling (unit vectors)."""
    shutil.copytree(folder, out)
    modules = json.loads((out / "modules.json").read_text())
    (out / "modules.json").write_text(json.dumps(modules + [
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    return out


@contextlib.contextmanager
def serve(model):
    """A TestClient of the encoder app over `model`, once it answers /ready."""
    from millis.serve.config import ServeConfig
    from millis.serve.encoder import app as appmod

    with TestClient(appmod.create_app(ServeConfig(artifact="x", model_name="m"), lambda: model, task="embed")) as c:
        deadline = time.time() + 60
        while c.get("/ready").status_code != 200 and time.time() < deadline:
            time.sleep(0.02)
        yield c


def test_a_sparse_encoder_folder_reads_as_splade_and_other_strategies_are_refused(tmp_path):
    folder = build_tiny("bert-splade")
    src = inspect_dir(folder)
    assert src.pooling.mode == SPLADE and not src.pooling.normalize and not src.has_classifier
    for key, value in (("pooling_strategy", "sum"), ("activation_function", "log1p_relu")):
        d = tmp_path / f"{key}"
        shutil.copytree(folder, d)
        (d / "1_SpladePooling" / "config.json").write_text(json.dumps({key: value}))
        with pytest.raises(MillisError, match=f"{key} '{value}' is not supported"):
            read_pooling(d)
    from millis.gpu.encoder import RunOptions, from_hf

    enc = from_hf(folder, "embed", src.pooling, RunOptions(dtype="fp32", fuse="torch", device="cpu"))
    assert enc.out_dim == json.loads((folder / "config.json").read_text())["vocab_size"]  # the CUDA form's head
    from millis.optimize.compress import candidates
    from millis.train.distill import distill, distill_config

    with pytest.raises(MillisError, match="SPLADE model"):  # students learn pooled states: no masked-LM head
        candidates(src, "embed", "quick", "", "text", progress=lambda m: None)
    with pytest.raises(MillisError, match="SPLADE model"):
        distill(distill_config(str(folder), str(tmp_path / "none.csv"), out=str(tmp_path / "s"), task="embed"))
    d = tmp_path / "no-mlm"  # SPLADE pooling over a checkpoint without a masked-LM head
    shutil.copytree(folder, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, architectures=["BertModel"])))
    with pytest.raises(MillisError, match="no masked-LM head"):
        inspect_dir(d)


def hf_rows(folder, rows: list[tuple]) -> tuple[dict, np.ndarray]:
    """Texts or (text, text_pair) rows through transformers' tokenizer, padded in one batch (numpy feeds, token types
    1 on a pair's second text), and each row's SPLADE vector from its own unpadded ids (N, V)."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    hf = AutoModelForMaskedLM.from_pretrained(str(folder)).eval()
    firsts, seconds = [r[0] for r in rows], [r[1] if len(r) > 1 else None for r in rows]
    one = [tok(a, b, return_tensors="pt") for a, b in zip(firsts, seconds)]
    if hf.config.to_dict().get("type_vocab_size", 2) == 1:  # RoBERTa: a pair's second text is type 0 too
        for f in one:
            f["token_type_ids"] = torch.zeros_like(f["token_type_ids"])
    with torch.no_grad():
        want = np.stack([torch.log1p(torch.relu(hf(**f).logits[0])).amax(0).numpy() for f in one])
    T = max(f["input_ids"].shape[1] for f in one)
    feeds = {k: np.zeros((len(rows), T), np.int64) for k in one[0]}
    for i, f in enumerate(one):
        for k, v in f.items():
            feeds[k][i, :v.shape[1]] = v[0].numpy()
    return feeds, want


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta"])
def test_native_splade_matches_transformers(family, tmp_path):
    """fp32 within 1e-4 of transformers' logits pooled by hand, rows of 1 to ~30 tokens padded in one batch, a pair
    (token type 1 on its second text, where the family has types); the vectors are sparse (most weights exactly 0, as
    the reference's); a row with no token gives zeros (some vocabulary biases are above 0: relu(bias) would not). On
    BERT also: an untied checkpoint (its own vocabulary matrix and decoder bias, as transformers reads them) and a
    Normalize module after the pooling (unit vectors, as the exported graphs')."""
    if native_isa() is None:
        pytest.skip("no native kernels here")
    from millis.encoder.bert_weights import load_arrays
    from millis.encoder.native import NativeBert

    folder = build_tiny(f"{family}-splade")
    rows = [(t,) for t in TEXTS] + [(TEXTS[0], TEXTS[2])]

    def check(folder):
        src = inspect_dir(folder)
        feeds, want = hf_rows(folder, rows)
        assert 0.01 < (want > 0).mean() < 0.5  # sparse, and not empty
        nb = NativeBert(load_arrays(folder, "embed", src.pooling), "fp32", 2)
        types = feeds.get("token_type_ids") if "token_type_ids" in src.input_names else None
        got = nb(feeds["input_ids"], feeds["attention_mask"], types)
        assert got.shape == want.shape == (len(rows), json.loads((folder / "config.json").read_text())["vocab_size"])
        np.testing.assert_allclose(got, want, atol=1e-4)
        assert ((got > 0) == (want > 1e-4)).mean() > 0.999  # the same zeros, but for values at rounding's edge
        mask = feeds["attention_mask"].copy()
        mask[1] = 0  # a row with no token: a zero vector, the others unchanged
        none = nb(feeds["input_ids"], mask, types)
        assert not none[1].any() and np.array_equal(none[[0, 2, 3, 4]], got[[0, 2, 3, 4]])
        return feeds, got

    feeds, _ = check(folder)
    if family == "distilbert":
        return
    assert (feeds["token_type_ids"][-1] == 1).any() or family == "roberta"
    if family != "bert":
        return
    import torch

    check(untied_copy(folder, tmp_path / "untied"))
    normed = normalized_copy(folder, tmp_path / "normed")
    src = inspect_dir(normed)
    assert src.pooling.normalize
    from millis.encoder.tasks import load_task_model

    f, _ = hf_rows(normed, rows)
    with torch.no_grad():
        want = load_task_model(src, "embed")(*(torch.from_numpy(f[n]) for n in src.input_names)).numpy()
    got = NativeBert(load_arrays(normed, "embed", src.pooling), "fp32", 2)(*(f[n] for n in src.input_names))
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_cuda_encoder_pools_splade(family, device, tmp_path):
    """The compact torch / CUDA encoder's masked-LM head (the transform in fp32, the vocabulary product in the
    encoder's dtype): on the CPU stand-in in fp32 within 1e-4 of transformers' logits pooled by hand, rows padded in one
    batch (an empty row: zeros), through the CUDA runtime's buckets; an untied BERT checkpoint and a Normalize module
    too; on CUDA in fp16, graphs captured, cosine > 0.999 and the same nonzero entries to rounding's edge."""
    import torch

    from millis.common.config import Shape
    from millis.runtimes.cuda import CudaGraphRuntime

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    folder = build_tiny(f"{family}-splade")
    rows = [(t,) for t in TEXTS] + [(TEXTS[0], TEXTS[2])]
    opts = {"dtype": "fp32", "fuse": "torch", "device": "cpu"} if device == "cpu" else {"dtype": "fp16"}

    def check(folder, normalize=False):
        src = inspect_dir(folder)
        assert src.pooling.normalize == normalize
        feeds, want = hf_rows(folder, rows)
        if normalize:
            want = want / np.linalg.norm(want, axis=1, keepdims=True)
        rt = CudaGraphRuntime(folder, "cuda", src.input_names, "embedding", "embed", src.pooling,
                              buckets=(Shape(8, 64),), **opts)
        feeds = {n: feeds[n] for n in src.input_names}
        got = rt.run(feeds)["embedding"]
        assert got.shape == want.shape
        if device == "cpu":
            np.testing.assert_allclose(got, want, atol=1e-4)
        cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert cos.min() > 0.999, cos
        assert ((got > 0) == (want > 1e-3)).mean() > 0.99
        feeds["attention_mask"][1] = 0  # a row with no token: zeros
        assert not rt.run(feeds)["embedding"][1].any()

    check(folder)
    if family != "bert":
        return
    check(untied_copy(folder, tmp_path / "untied"))
    check(normalized_copy(folder, tmp_path / "normed"), normalize=True)


def test_a_row_precision_without_its_stored_calibration_calibrates_at_load(tmp_path):
    """A native SPLADE variant of a row precision whose folder lacks the stored smoothing calibration (an artifact
    from before it): calibrated at load as optimize stores it, the same vectors as with the stored file."""
    if native_isa() is None:
        pytest.skip("no native kernels here")
    from millis.encoder.smooth import AMAX_FILE
    from millis.optimize.build.variants import native_weights
    from millis.runtimes.native import NativeRuntime

    src = inspect_dir(build_tiny("bert-splade"))
    d = tmp_path / "w"
    d.mkdir()
    native_weights(src, d)
    feeds, _ = hf_rows(src.path, [(t,) for t in TEXTS])
    args = ("x", src.input_names, "embedding", 2, "embed", None, "int8-row")
    stored = NativeRuntime(d, *args).run(feeds)["embedding"]
    (d / AMAX_FILE).unlink()
    np.testing.assert_array_equal(NativeRuntime(d, *args).run(feeds)["embedding"], stored)


@pytest.mark.parametrize("isa", runnable_isas() if native_isa() else ["scalar"])
def test_splade_in_every_native_precision(isa, monkeypatch):
    """Every native precision on every build this CPU runs against fp32 (cosine; the int8 vocabulary matrix's
    rounding), a row alone = the row in its batch (bits), the head's chunks (CHUNK_TOKENS) = one pass."""
    if native_isa() is None:
        pytest.skip("no native kernels here")
    from millis.encoder import splade
    from millis.encoder.bert_weights import load_arrays
    from millis.encoder.native import PRECISIONS, NativeBert
    from millis.encoder.smooth import input_amax
    from millis.encoder.source import Pooling
    from millis.encoder.text import TextEncoder
    from millis.gpu.encoder import RunOptions, from_hf

    monkeypatch.setenv("MILLIS_KERNEL_ISA", isa)
    folder = build_tiny("bert-splade")
    src = inspect_dir(folder)
    arrays = load_arrays(folder, "embed", src.pooling)
    amax = input_amax(from_hf(folder, "embed", Pooling(), RunOptions(dtype="fp32", fuse="torch", device="cpu")))
    feeds = TextEncoder(src.path, src.input_names, 128, segments=src.segments).encode(TEXTS).feeds
    args = (feeds["input_ids"], feeds["attention_mask"], feeds["token_type_ids"])
    ref = NativeBert(arrays, "fp32", 2)(*args)
    for precision in PRECISIONS:
        if precision == "bf16" and isa == "scalar":
            continue
        nb = NativeBert(arrays, precision, 2, amax)
        got = nb(*args)
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() > 0.99, (precision, cos)
        alone = nb(*(a[2:3] for a in args))
        assert np.array_equal(alone[0], got[2]), precision
        monkeypatch.setattr(splade, "CHUNK_TOKENS", 3)  # texts in chunks of a few tokens (or one text alone)
        assert np.array_equal(nb(*args), got), precision
        monkeypatch.setattr(splade, "CHUNK_TOKENS", 512)


def test_every_runtime_and_the_served_artifact_answer_as_transformers(tmp_path, quick_measure, capsys):
    """Each runtime's variant of a SPLADE folder (the exported graphs pool the masked LM's logits; the native head)
    near transformers, the fp32 ones within 1e-4; optimize's artifact of the native int8 variant (its weights with the
    masked-LM head) served: /embed_sparse answers the nonzero weights of /embed's vector with normalize false, in TEI's
    shape; its fields are checked; a mean-pooled embedder answers 424 and leaves the route out of its OpenAPI."""
    from millis.artifact.model import open_model, run_texts
    from millis.cli.main import main as cli
    from millis.encoder.source import resolve
    from millis.encoder.text import TextEncoder
    from millis.optimize.build.variants import CATALOG, Builder
    from millis.optimize.config import OptimizeConfig
    from millis.optimize.judge import open_variant
    from millis.optimize.pipeline import optimize

    folder = build_tiny("bert-splade")
    src = resolve(str(folder))
    enc = TextEncoder(src.path, src.input_names, 128, segments=src.segments)
    want = hf_splade(folder, TEXTS)
    builder = Builder(src, "embed", tmp_path / "build", calibration=lambda: [])
    for variant in ("torch-fp32", "ort-fp32-fused", "ort-int8-dynamic", "ov-fp32"):
        vdir, _ = builder.build(CATALOG[variant])
        got = run_texts(open_variant("embed", 2, src, CATALOG[variant], vdir), enc, TEXTS).outputs
        assert got.shape == want.shape
        if variant.endswith("fp32") or variant.endswith("fused"):
            np.testing.assert_allclose(got, want, atol=1e-4, err_msg=variant)
        cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert cos.min() > 0.98, (variant, cos)
    variant = "native-int8-row" if native_isa() else "ort-fp32-fused"
    out = optimize(OptimizeConfig(source="tiny:bert-splade", task="embed", out=str(tmp_path / "art"),
                                  target=Shape(1, 16), variants=(variant,), measure=quick_measure))
    vecs = open_model(out).embed(TEXTS)
    cos = (vecs * want).sum(1) / np.linalg.norm(vecs, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.98, cos
    assert cli(["predict", str(out), TEXTS[0]]) == 0  # `millis predict`: the heaviest entries as tokens
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    top = np.argsort(-vecs[0], kind="stable")[:8]
    assert line["nonzero"] == np.count_nonzero(vecs[0]) > 0
    assert [t for t, _ in line["top"]] == enc.token_strings(top[vecs[0][top] > 0].tolist())
    with serve(open_model(out)) as c:
        r = c.post("/embed_sparse", json={"inputs": TEXTS})
        assert r.status_code == 200, r.text
        for items, v in zip(r.json(), vecs):
            assert [i["index"] for i in items] == np.flatnonzero(v).tolist()
            np.testing.assert_allclose([i["value"] for i in items], v[v != 0], rtol=1e-6)
        assert len(c.post("/embed_sparse", json={"inputs": TEXTS[0]}).json()) == 1
        dense = np.asarray(c.post("/embed", json={"inputs": TEXTS, "normalize": False}).json())
        np.testing.assert_allclose(dense, vecs, rtol=1e-6)
        for body, field, status in (({"inputs": TEXTS, "normalize": True}, "normalize", 422),
                                    ({"inputs": []}, "inputs", 400), ({"inputs": TEXTS, "truncate": "yes"}, "truncate",
                                                                       422)):
            r = c.post("/embed_sparse", json=body)  # (TEI's codes: an empty input is its 400, as on /embed)
            assert r.status_code == status and r.json()["param"] == field, (body, r.text)
        assert "/embed_sparse" in c.get("/openapi.json").json()["paths"]
        vocab = vecs.shape[1]  # a cut of a vocabulary's weights is no shorter embedding: refused, the full size taken
        spec = c.get("/openapi.json").json()["paths"]["/embed"]["post"]["requestBody"]["content"]["application/json"]
        assert spec["schema"]["properties"]["dimensions"]["anyOf"][0]["minimum"] == vocab, spec
        for path, body, status in (("/embed", {"inputs": TEXTS}, 422), ("/v1/embeddings", {"input": TEXTS}, 400)):
            r = c.post(path, json={**body, "dimensions": 8})  # (each route's code for a bad field: TEI's, OpenAI's)
            assert r.status_code == status and '"param":"dimensions"' in r.text and "SPLADE" in r.text, (path, r.text)
            assert c.post(path, json={**body, "dimensions": vocab}).status_code == 200, path
    mean = open_model(build_tiny("bert"), task="embed", device="cpu")
    with serve(mean) as c:
        r = c.post("/embed_sparse", json={"inputs": TEXTS})
        assert r.status_code == 424 and "SPLADE" in r.text, r.text
        assert "/embed_sparse" not in c.get("/openapi.json").json()["paths"]
        assert c.post("/embed", json={"inputs": TEXTS}).status_code == 200  # the server still answers
        assert len(c.post("/embed", json={"inputs": TEXTS, "dimensions": 8}).json()[0]) == 8  # a mean vector's cut
