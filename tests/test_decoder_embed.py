"""Decoder embedders (Qwen3-Embedding, gte-Qwen2, e5-mistral shapes): Llama / Mistral / Qwen2 / Qwen3 folders pooled
at the last token (sentence-transformers' lasttoken), on the torch, ONNX Runtime, OpenVINO and native runtimes, against
sentence-transformers itself and transformers' last_hidden_state in fp32; the truncation that keeps a tokenizer's
trailing special tokens (and none where it adds none); the native runtime's pieces and slots; served."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from millis.common.config import Shape
from millis.common.errors import MillisError
from millis.common.samples import sample_texts
from millis.encoder.tiny import DECODER_TEMPLATES, build_tiny
from millis.kernels.native import native_isa, runnable_isas

DECODERS = tuple(DECODER_TEMPLATES)  # llama (no token after a text), mistral (window 8), qwen2 (biases), qwen3
TEXTS = sample_texts()[:10] + ["a", "hello " * 70]  # one text past Mistral's window many times over


def st_vectors(folder, texts: list[str]) -> np.ndarray:
    """sentence-transformers' own embeddings of the folder (its lasttoken pooling and Normalize), fp32."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_numpy=True)


def hf_states(folder, texts: list[str]):
    """transformers' last_hidden_state of each text alone (no padding) -> list of (n_i, D), and the ids."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok, hf = AutoTokenizer.from_pretrained(str(folder)), AutoModel.from_pretrained(str(folder)).eval()
    out, ids = [], []
    for t in texts:
        row = tok(t, truncation=True, max_length=128)["input_ids"]
        with torch.no_grad():
            out.append(hf(input_ids=torch.tensor([row])).last_hidden_state[0].numpy())
        ids.append(row)
    return out, ids


def feeds_of(folder, texts):
    from millis.encoder.source import inspect_dir, model_max_length
    from millis.encoder.text import TextEncoder

    src = inspect_dir(folder)
    return src, TextEncoder(src.path, src.input_names, model_max_length(src)).encode(texts).feeds


@pytest.mark.parametrize("family", DECODERS)
def test_a_decoder_folder_reads_as_a_last_token_embedder(family, tmp_path):
    """The folder's lasttoken pooling, two inputs, no classifier; torch's vector = sentence-transformers' (1e-5);
    the last-token pool takes each row's last kept token under right and left padding alike."""
    import torch

    from millis.encoder.source import LAST_TOKEN, inspect_dir
    from millis.encoder.tasks import load_task_model, pool

    folder = build_tiny(family)
    src = inspect_dir(folder)
    assert (src.pooling.mode, src.pooling.normalize, src.input_names) == (LAST_TOKEN, True,
                                                                          ("input_ids", "attention_mask"))
    assert not src.has_classifier
    _, feeds = feeds_of(folder, TEXTS)
    with torch.no_grad():
        got = load_task_model(src, "embed")(*(torch.from_numpy(feeds[n]) for n in src.input_names)).numpy()
    want = st_vectors(folder, TEXTS)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(want[0] - want[1]).max() > 0.1  # the texts' vectors differ: the test can fail
    h = torch.randn(2, 5, 3)
    right, left = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]), torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    from millis.encoder.source import Pooling

    np.testing.assert_array_equal(pool(h, right, Pooling(LAST_TOKEN))[0], h[0, 2])
    np.testing.assert_array_equal(pool(h, left, Pooling(LAST_TOKEN))[0], h[0, 4])
    assert not pool(h, torch.zeros(2, 5, dtype=torch.long), Pooling(LAST_TOKEN)).any()  # no token: zeros
    with pytest.raises(MillisError, match="no sequence-classification head"):
        load_task_model(src, "classify")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_cut_keeps_the_trailing_special_tokens_the_tokenizer_adds(family):
    """HF's truncation: Qwen3-Embedding's <|endoftext|> (here [SEP]) stays last, the text cut before it; a Llama
    tokenizer that adds nothing after a text is cut at max_length (its last token a word piece, not a kept one)."""
    from transformers import AutoTokenizer

    from millis.encoder.source import inspect_dir
    from millis.encoder.text import TextEncoder

    folder = build_tiny(family)
    src = inspect_dir(folder)
    enc = TextEncoder(src.path, src.input_names, 16)
    text = "the exchange rate I was given for my transfer looks wrong to me and I want it fixed"
    ids, cut = enc.token_ids([text])
    want = AutoTokenizer.from_pretrained(str(folder))(text, truncation=True, max_length=16)["input_ids"]
    assert cut == [True] and ids[0] == want and len(want) == 16
    assert enc.suffix == (0 if family == "llama" else 1)
    assert (ids[0][-1] == 3) == (family != "llama")  # [SEP]


@pytest.mark.parametrize("isa", runnable_isas() if native_isa() else ["scalar"])
def test_native_decoder_matches_transformers(isa, monkeypatch):
    """fp32 on every build this CPU runs within 1e-4 of transformers (each text alone, unpadded) for every family,
    the pooled vector and every token's state; bf16 / int8 / int8-a16 near fp32; a long text in pieces and texts
    over several calls (GROUP_TOKENS, SLOTS) = one call; a left-padded row refused."""
    if native_isa() is None:
        pytest.skip("no native kernels here")
    from millis.gen import embedder
    from millis.gen.embedder import NativeDecoder

    monkeypatch.setenv("MILLIS_KERNEL_ISA", isa)
    for family in DECODERS:
        folder = build_tiny(family)
        src, feeds = feeds_of(folder, TEXTS)
        states, _ = hf_states(folder, TEXTS)
        want = np.stack([s[-1] / np.linalg.norm(s[-1]) for s in states])
        args = feeds["input_ids"], feeds["attention_mask"]
        nd = NativeDecoder(folder, "fp32", 2, src.pooling)
        got = nd(*args)
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=family)
        every = nd.token_states(*args)
        for k, s in enumerate(states):
            np.testing.assert_allclose(every[k, :len(s)], s, atol=1e-4, err_msg=family)
            assert not every[k, len(s):].any()
        monkeypatch.setattr(embedder, "GROUP_TOKENS", 16)  # the long text in pieces, the others in several calls
        monkeypatch.setattr(embedder, "SLOTS", 3)
        np.testing.assert_allclose(nd(*args), got, atol=1e-5, err_msg=family)
        np.testing.assert_allclose(nd.token_states(*args), every, atol=1e-5, err_msg=family)
        monkeypatch.setattr(embedder, "GROUP_TOKENS", 2048)
        monkeypatch.setattr(embedder, "SLOTS", 64)
        for precision in ("bf16", "int8", "int8-a16") if isa != "scalar" else ("int8", "int8-a16"):
            q = NativeDecoder(folder, precision, 2, src.pooling)(*args)
            assert (q * got).sum(1).min() > 0.99, (family, precision)
            assert np.abs(q - got).max() > 1e-6, (family, precision)  # quantized: not the fp32 values
        left = np.roll(args[1][:1], 3, axis=1)
        with pytest.raises(MillisError, match="right-padded rows"):
            nd(args[0][:1], left)


def test_native_variants_a_decoder_does_not_run_are_skipped_by_name(tmp_path):
    from millis.optimize.build.variants import CATALOG, Builder
    from millis.encoder.source import inspect_dir

    builder = Builder(inspect_dir(build_tiny("qwen3")), "embed", tmp_path, calibration=lambda: [])
    for name, why in (("native-int7-row", "not int7-row"), ("native-int8-row-att8", "with int8 attention"),
                      ("cuda-fp16", "CUDA variants run BERT-family encoders")):
        with pytest.raises(MillisError, match=why):
            builder.build(CATALOG[name])


def test_optimize_and_serve_a_decoder_embedder(tmp_path, quick_measure):
    """optimize over the CPU runtimes: every variant's vectors near sentence-transformers' (fp32 ones within 1e-4);
    the native artifact served: /embed, /v1/embeddings and /embed_all as transformers."""
    from starlette.testclient import TestClient

    from millis.artifact.model import open_model
    from millis.optimize.config import OptimizeConfig
    from millis.optimize.pipeline import optimize
    from millis.serve.config import ServeConfig
    from millis.serve.encoder import app as appmod

    folder = build_tiny("qwen3")
    texts = TEXTS[:4]
    want = st_vectors(folder, texts)
    variants = ("ort-fp32-fused", "ort-int8-dynamic-pc", "ov-fp32") + (("native-fp32",) if native_isa() else ())
    for v in variants:
        art = open_model(optimize(OptimizeConfig(source=str(folder), task="embed", out=str(tmp_path / v),
                                                 target=Shape(1, 16), variants=(v,), measure=quick_measure)))
        if art.meta.variant.name == v:
            got = art.embed(texts)
        else:  # selection is by time: on a model this small torch eager may be the fastest (0.82 against OpenVINO
            # fp32's 0.90 ms once): the variant itself, built and opened as optimize opens it
            from millis.artifact.model import run_texts
            from millis.optimize.build.variants import CATALOG, REFERENCE, Builder
            from millis.optimize.judge import open_variant

            assert art.meta.variant.name == REFERENCE, art.meta.variant.name
            src, _ = feeds_of(folder, texts)
            vdir, _ = Builder(src, "embed", tmp_path / f"{v}-built", calibration=lambda: []).build(CATALOG[v])
            got = run_texts(open_variant("embed", 2, src, CATALOG[v], vdir), art.encoder, texts).outputs
        if "int8" in v:
            assert (got * want).sum(1).min() > 0.99, v
        else:
            np.testing.assert_allclose(got, want, atol=1e-4, err_msg=v)
    states, ids = hf_states(folder, texts[:1])
    with TestClient(appmod.create_app(ServeConfig(artifact="x", model_name="m"), lambda: art, task="embed")) as c:
        import time

        deadline = time.time() + 60
        while c.get("/ready").status_code != 200 and time.time() < deadline:
            time.sleep(0.02)
        r = c.post("/embed", json={"inputs": texts})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json()), want, atol=1e-4)
        r = c.post("/v1/embeddings", json={"input": texts[0], "model": "m"})
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], want[0], atol=1e-4)
        r = c.post("/embed_all", json={"inputs": texts[0]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json()[0]), states[0], atol=1e-4)


def test_a_plain_decoder_folder_embeds_only_as_the_flag_says_and_serves_by_its_layout(tmp_path):
    """A decoder checkpoint without modules.json (a chat model's layout): refused as an embedder unless --pooling
    names how (last-token: as its sentence-transformers folder would, unnormalized; mean); `millis serve FOLDER`
    serves a decoder folder laid out as an embedder (modules.json) or given --pooling as one, a plain one as a
    chat model; is_causal false and a tokenizer of the model's own code (gte-Qwen2's) refused."""
    import json

    from millis.artifact.model import open_model
    from millis.serve.config import ServeConfig
    from millis.serve.generation.models import is_generation_model
    from millis.serve.server import app_and_loader

    plain = tmp_path / "plain"
    shutil.copytree(build_tiny("mistral"), plain, ignore=shutil.ignore_patterns("modules.json", "1_*", "2_*"))
    states, _ = hf_states(plain, TEXTS[:3])
    with pytest.raises(MillisError, match="declares no pooling .* --pooling last-token"):
        open_model(str(plain))
    plain_qwen3 = tmp_path / "plain-qwen3"  # (not a model_type millis's chat server loads: refused before binding)
    shutil.copytree(build_tiny("qwen3"), plain_qwen3, ignore=shutil.ignore_patterns("modules.json", "1_*", "2_*"))
    with pytest.raises(MillisError, match="declares no pooling"):
        app_and_loader(ServeConfig(artifact=str(plain_qwen3)))
    got = open_model(str(plain), pooling="last-token").embed(TEXTS[:3])
    np.testing.assert_allclose(got, np.stack([s[-1] for s in states]), atol=1e-4)
    np.testing.assert_allclose(open_model(str(plain), pooling="mean").embed(TEXTS[:3]),
                               np.stack([s.mean(0) for s in states]), atol=1e-4)
    assert is_generation_model(plain) and not is_generation_model(build_tiny("mistral"))
    for folder, pooling in ((build_tiny("mistral"), ""), (plain, "last-token")):
        factory, load = app_and_loader(ServeConfig(artifact=str(folder), pooling=pooling))
        assert factory.keywords["task"] == "embed", folder
    bidirectional = tmp_path / "bidirectional"
    shutil.copytree(build_tiny("qwen2"), bidirectional)
    cfg = json.loads((bidirectional / "config.json").read_text())
    (bidirectional / "config.json").write_text(json.dumps(dict(cfg, is_causal=False)))
    with pytest.raises(MillisError, match="is_causal false"):
        open_model(str(bidirectional))
    remote = tmp_path / "remote-tokenizer"  # gte-Qwen2's tokenizer code (it adds <|endoftext|>): refused, not guessed
    shutil.copytree(build_tiny("qwen2"), remote)
    tc = json.loads((remote / "tokenizer_config.json").read_text())
    (remote / "tokenizer_config.json").write_text(json.dumps(dict(tc, auto_map={
        "AutoTokenizer": ["tokenization_qwen.Qwen2Tokenizer", None]})))
    with pytest.raises(MillisError, match="auto_map names a tokenizer"):
        open_model(str(remote))
    gguf = tmp_path / "chat.gguf"  # (a chat model's file, given --pooling: refused naming it, before loading)
    gguf.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(MillisError, match="chat model's file"):
        app_and_loader(ServeConfig(artifact=str(gguf), pooling="mean"))


def test_a_decoder_embeds_at_most_max_tokens(tmp_path):
    """A decoder whose positions reach past MAX_TOKENS (a 128k context) embeds texts of MAX_TOKENS at most: its
    limit, so the server cuts (or refuses) longer ones rather than the native runtime failing on them."""
    import json

    from millis.encoder.decoders import MAX_TOKENS
    from millis.encoder.source import inspect_dir, model_max_length

    long = tmp_path / "long"
    shutil.copytree(build_tiny("qwen2"), long)
    cfg = json.loads((long / "config.json").read_text())
    (long / "config.json").write_text(json.dumps(dict(cfg, max_position_embeddings=131072)))
    tc = json.loads((long / "tokenizer_config.json").read_text())
    (long / "tokenizer_config.json").write_text(json.dumps(dict(tc, model_max_length=10 ** 30)))
    src = inspect_dir(long)
    assert src.max_length == MAX_TOKENS == model_max_length(src)
    with pytest.raises(MillisError, match=f"exceeds the model's limit {MAX_TOKENS}"):
        model_max_length(src, MAX_TOKENS + 1)


def test_native_decoder_pools_mean_max_cls_and_empty_rows(tmp_path):
    """The native decoder's other poolings against transformers' states pooled by hand; a row with no token between
    others: zeros, the others as alone."""
    if native_isa() is None:
        pytest.skip("no native kernels here")
    from millis.encoder.source import Pooling
    from millis.gen.embedder import NativeDecoder

    folder = build_tiny("qwen2")
    src, feeds = feeds_of(folder, TEXTS[:4])
    states, _ = hf_states(folder, TEXTS[:4])
    for mode, want in (("mean", [s.mean(0) for s in states]), ("max", [s.max(0) for s in states]),
                       ("cls", [s[0] for s in states])):
        got = NativeDecoder(folder, "fp32", 2, Pooling(mode))(feeds["input_ids"], feeds["attention_mask"])
        np.testing.assert_allclose(got, np.stack(want), atol=1e-4, err_msg=mode)
    nd = NativeDecoder(folder, "fp32", 2, src.pooling)
    mask = feeds["attention_mask"].copy()
    mask[1] = 0
    got = nd(feeds["input_ids"], mask)
    assert not got[1].any()
    np.testing.assert_allclose(got[[0, 2, 3]], nd(feeds["input_ids"][[0, 2, 3]], feeds["attention_mask"][[0, 2, 3]]),
                               atol=1e-6)


def test_last_token_on_an_encoder_runs_where_it_is_computed(tmp_path):
    """--pooling last-token on a BERT folder: the exported graph pools each text's last token ([SEP]) as transformers'
    states; the native encoder, which pools otherwise in C, is skipped by name rather than pooling the mean."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from millis.artifact.model import run_texts
    from millis.encoder.source import resolve, with_pooling
    from millis.encoder.text import TextEncoder
    from millis.optimize.build.variants import CATALOG, Builder
    from millis.optimize.judge import open_variant

    plain = tmp_path / "bert"
    shutil.copytree(build_tiny("bert"), plain, ignore=shutil.ignore_patterns("modules.json", "1_*", "2_*"))
    src = with_pooling(resolve(str(plain)), "last-token")
    tok = AutoTokenizer.from_pretrained(str(plain))
    batch = tok(TEXTS[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        h = AutoModel.from_pretrained(str(plain), add_pooling_layer=False).eval()(**batch).last_hidden_state
    want = h[torch.arange(3), batch["attention_mask"].sum(1) - 1].numpy()
    builder = Builder(src, "embed", tmp_path / "b", calibration=lambda: [])
    enc = TextEncoder(src.path, src.input_names, 128, segments=src.segments)
    vdir, _ = builder.build(CATALOG["ort-fp32-fused"])
    got = run_texts(open_variant("embed", 2, src, CATALOG["ort-fp32-fused"], vdir), enc, TEXTS[:3]).outputs
    np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.raises(MillisError, match="does not pool last-token"):
        builder.build(CATALOG["native-fp32"])


def test_a_graph_over_2gb_keeps_its_weights_in_one_file_beside_it(tmp_path, monkeypatch):
    """torch writes a graph over protobuf's 2 GB (Qwen3-Embedding-0.6B's fp32: 2.4 GB) with a file per tensor beside
    it: export gathers them into model.onnx.data, and the fuse, int8 (dynamic, static) and OpenVINO passes read it
    and write theirs alike; each variant's folder holds model.onnx + model.onnx.data alone, and answers as the same
    variant built from an inline graph. (A tiny graph made to write its weights outside, as torch does past 2 GB.)"""
    import onnx
    import torch

    from millis.encoder.source import inspect_dir
    from millis.encoder.text import TextEncoder
    from millis.optimize.build.variants import CATALOG, Builder
    from millis.optimize.judge import open_variant
    from millis.artifact.model import run_texts

    src = inspect_dir(build_tiny("qwen3"))
    enc = TextEncoder(src.path, src.input_names, 128)
    calib = [enc.encode(TEXTS[:4]).feeds]
    variants = ("ort-fp32-fused", "ort-int8-dynamic-pc", "ort-int8-static", "ov-fp32")
    inline = Builder(src, "embed", tmp_path / "inline", calibration=lambda: calib)
    want = {v: run_texts(open_variant("embed", 2, src, CATALOG[v], inline.build(CATALOG[v])[0]), enc, TEXTS).outputs
            for v in variants}
    export = torch.onnx.export

    def scattered(model, args, path, **kw):  # torch's own layout past 2 GB: a file per tensor beside the graph
        export(model, args, path, **kw)
        onnx.save_model(onnx.load(path), path, save_as_external_data=True, all_tensors_to_one_file=False,
                        size_threshold=0)

    monkeypatch.setattr(torch.onnx, "export", scattered)
    outside = Builder(src, "embed", tmp_path / "outside", calibration=lambda: calib)
    for v in variants:
        vdir, facts = outside.build(CATALOG[v])
        names = sorted(p.name for p in vdir.iterdir())
        if v.startswith("ort"):
            assert names == ["model.onnx", "model.onnx.data"], (v, names)
            assert facts["bytes"] == sum(p.stat().st_size for p in vdir.iterdir())
        got = run_texts(open_variant("embed", 2, src, CATALOG[v], vdir), enc, TEXTS).outputs
        np.testing.assert_allclose(got, want[v], atol=1e-5, err_msg=v)
    assert sorted(p.name for p in (tmp_path / "outside" / "_passes" / "export").iterdir()) == \
        ["model.onnx", "model.onnx.data"]
    from millis.optimize.build import quantize  # a graph rewritten in place (the sensitivity ranking's): the same size
    fused = outside.graph(CATALOG["ort-fp32-fused"].passes)
    again = tmp_path / "again" / "model.onnx"
    again.parent.mkdir()
    sizes = []
    for _ in range(2):
        quantize.dynamic(fused, again, per_channel=True)
        sizes.append(again.with_name("model.onnx.data").stat().st_size)
    assert sizes[0] == sizes[1], sizes


def test_a_decoder_embedder_is_embedded_as_it_is_and_other_uses_are_refused_by_name(tmp_path, quick_measure):
    """optimize --task classify / rerank and --compress, millis train, distill and prune: refused naming the
    decoder, before any work."""
    from millis.optimize.config import OptimizeConfig
    from millis.optimize.pipeline import optimize
    from millis.train.classify import train_config, train
    from millis.train.distill import distill, distill_config
    from millis.train.prune import prune, prune_config

    folder = str(build_tiny("qwen3"))
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "\n".join(f"text {i},{i % 2}" for i in range(20)) + "\n")
    for kw in ({"task": "classify"}, {"task": "rerank"}, {"compress": "quick", "compress_data": str(data)}):
        with pytest.raises(MillisError, match="qwen3 decoder embedder"):
            optimize(OptimizeConfig(source=folder, out=str(tmp_path / "a"), measure=quick_measure, **kw))
    for run, cfg in ((train, train_config(folder, str(data), out=str(tmp_path / "t"))),
                     (distill, distill_config(folder, str(data), out=str(tmp_path / "s"), task="embed")),
                     (prune, prune_config(folder, str(data), out=str(tmp_path / "p"), layers=1))):
        with pytest.raises(MillisError, match="qwen3 decoder embedder"):
            run(cfg)
