"""Every variant's outputs against the fp32 HF reference, within per-precision tolerances."""
import numpy as np
import pytest

from millis.common import hardware
from millis.common.errors import MillisError
from millis.optimize.fidelity import compare
from millis.optimize.pipeline import calibration_batches
from millis.runtimes import open_runtime
from millis.runtimes.base import shares_scales_across_rows
from millis.encoder.source import resolve
from millis.encoder.tasks import OUTPUT_NAME
from millis.encoder.text import TextEncoder
from millis.common.samples import sample_texts
from millis.optimize.build.variants import CATALOG, Builder, Variant

from conftest import reference_outputs

TEXTS = sample_texts()[:24]
# precision -> (max |delta| on normalised embeddings / logits, min cosine)
TOL = {"fp32": (1e-4, 0.99999), "fp16": (0.02, 0.999), "bf16": (0.05, 0.99), "int8": (0.25, 0.95),
       "fp8": (0.3, 0.95)}


def _outputs(rt, enc, texts):
    return np.concatenate([rt.run(enc.encode(texts[i:i + 8]).feeds)[rt.output_name] for i in range(0, len(texts), 8)])


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_dirs):
    res = {}
    for fam, task in CASES:
        src = resolve(f"tiny:{fam}")
        enc = TextEncoder(src.path, src.input_names, 128)
        # equal (8, 128) batches, as optimize makes them: Percentile / Entropy stack all batches
        calib = lambda enc=enc: calibration_batches(enc, sample_texts()[:48], 128)
        res[(fam, task)] = (src, enc, Builder(src, task, tmp_path_factory.mktemp(fam), calib),
                            reference_outputs(src.path, task, TEXTS))
    return res


CASES = (("bert", "embed"), ("distilbert", "classify"), ("roberta", "classify"), ("xlm-roberta", "embed"),
         ("mpnet", "embed"), ("electra", "classify"), ("deberta-v2", "classify"))  # electra: electra-small's layout
COMPACT = ("bert", "distilbert", "roberta", "xlm-roberta", "mpnet", "electra", "deberta-v2")  # the compact encoders'


@pytest.mark.parametrize("case,name", [pytest.param(c, n, id=f"{c[0]}-{c[1]}-{n}") for c in CASES for n in CATALOG
                                       if c in CASES[:2] or CATALOG[n].runtime in ("native", "cuda")])
def test_variant_matches_reference(built, case, name):
    src, enc, builder, ref = built[case]
    v = CATALOG[name]
    if v.runtime == "cuda" and not hardware.has_cuda():  # optimize --device cuda's variants need a GPU
        with pytest.raises(MillisError, match="no CUDA device"):
            builder.build(v)
        if case[0] not in COMPACT:
            return
        # then its CPU stand-in: the same runtime reading the same directory, eager, fp32 with torch epilogues
        v = Variant(v.name, "cuda", v.precision, v.passes, dict(v.options, dtype="fp32", fuse="torch", device="cpu"))
    if v.precision == "bf16" and v.runtime != "cuda" and not hardware.has_bf16():
        with pytest.raises(MillisError, match="no native bf16"):
            builder.build(v)
        return
    if v.runtime in ("native", "cuda") and case[0] not in COMPACT:  # the compact encoders run BERT's layers only
        with pytest.raises(MillisError, match="BERT-family"):
            builder.build(v)
        return
    if v.options.get("attention") == "int8":  # AVX-512 VNNI and head sizes 32 / 64 (the tiny models': 8)
        with pytest.raises(MillisError, match="int8 attention"):
            vdir, facts = builder.build(v)
            open_runtime(v.runtime, vdir, v.name, src.input_names, OUTPUT_NAME[case[1]],
                         dict(v.options, task=case[1], file=facts.get("file") or ""), threads=1)
        return
    vdir, facts = builder.build(v)
    rt = open_runtime(v.runtime, vdir, v.name, src.input_names, OUTPUT_NAME[case[1]],
                      dict(v.options, task=case[1], file=facts.get("file") or ""), threads=1)
    # one activation scale per tensor (quantize_dynamic's graphs): the server must not batch requests together
    assert shares_scales_across_rows(rt) == any(p.startswith("int8-dynamic") for p in v.passes), name
    out = _outputs(rt, enc, TEXTS)
    assert out.shape == ref.shape
    fid = compare(case[1], ref, out)
    max_diff, min_cos = TOL[v.precision]
    assert fid["max_abs_diff"] <= max_diff, (name, fid)
    if case[1] == "embed":
        assert fid["cos_min"] >= min_cos, (name, fid)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-3)  # Normalize is in the graph
    else:
        assert fid["top1_agreement"] >= 0.9, (name, fid)


def test_padding_and_batching_do_not_change_outputs(built):
    src, enc, builder, ref = built[("bert", "embed")]
    v = CATALOG["ort-fp32-fused"]
    vdir, facts = builder.build(v)
    rt = open_runtime(v.runtime, vdir, v.name, src.input_names, "embedding", dict(v.options, file=facts["file"]))
    batched = rt.run(enc.encode(TEXTS, pad_to=96).feeds)["embedding"]  # heavy padding
    np.testing.assert_allclose(batched, ref, atol=2e-5)


def test_runtime_rejects_bad_batches(built):
    from millis.common.errors import MillisError

    src, enc, builder, _ = built[("bert", "embed")]
    v = CATALOG["ort-fp32-fused"]
    vdir, facts = builder.build(v)
    rt = open_runtime(v.runtime, vdir, v.name, src.input_names, "embedding", dict(v.options, file=facts["file"]))
    with pytest.raises(MillisError, match="non-empty"):
        rt.run({"input_ids": np.zeros((0, 4), np.int64), "attention_mask": np.zeros((0, 4), np.int64)})
    with pytest.raises(MillisError, match="shape"):
        rt.run({"input_ids": np.zeros((1, 4), np.int64), "attention_mask": np.zeros((1, 5), np.int64)})


# (B, T) as the server forms them (rows x 16-token buckets) and some it never would: none is warmed
NEW_SHAPES = [(1, 16), (3, 48), (8, 32), (5, 16), (17, 64), (2, 128), (1, 7), (32, 16), (4, 33)]


def _ragged(enc, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    """A (batch, seq) batch of real tokens, each row cut to its own length and padded, as the server sends."""
    feeds = enc.fill(TEXTS, batch, seq)
    rng = np.random.default_rng(seed)
    for i, n in enumerate(rng.integers(2, seq + 1, batch)):
        feeds["input_ids"][i, n:] = enc.pad_id
        feeds["attention_mask"][i, n:] = 0
    return feeds


@pytest.mark.parametrize("options", [{}, {"static": True}], ids=["current", "old-artifact-static"])
def test_openvino_serves_new_shapes_with_one_compile(built, monkeypatch, options):
    """Every shape equals the torch fp32 reference, and no shape is compiled on the request path:
    one compile_model at open, whatever shapes follow (artifacts written with "static": true too)."""
    import openvino as ov

    compiles = []

    class CountingCore(ov.Core):
        def compile_model(self, *args, **kwargs):
            compiles.append(args[0])
            return super().compile_model(*args, **kwargs)

    monkeypatch.setattr(ov, "Core", CountingCore)
    src, enc, builder, _ = built[("bert", "embed")]
    v = CATALOG["ov-fp32"]
    vdir, facts = builder.build(v)
    rt = open_runtime("openvino", vdir, v.name, src.input_names, "embedding",
                      dict(v.options, **options, file=facts["file"]), threads=1)
    ref = open_runtime("torch", src.path, "torch-fp32", src.input_names, "embedding",
                       {"task": "embed", "pooling": {"mode": src.pooling.mode, "normalize": src.pooling.normalize}},
                       threads=1)
    assert len(compiles) == 1
    for k, (b, t) in enumerate(NEW_SHAPES):
        feeds = _ragged(enc, b, t, seed=k)
        out = rt.run(feeds)["embedding"]
        assert out.shape == (b, ref.run(feeds)["embedding"].shape[1])
        np.testing.assert_allclose(out, ref.run(feeds)["embedding"], atol=1e-4, err_msg=f"b{b}xs{t}")
    assert len(compiles) == 1, f"{len(compiles)} compiles for {len(NEW_SHAPES)} shapes"


def test_dynamic_int8_serves_each_row_apart_from_its_batch_mates(built):
    """ORT's dynamic int8 quantizes each activation with one scale for the whole batch (DynamicQuantizeLinear),
    so a batch-mate moves a row's result (~7e-5 here, against ~3e-8 for the same row batched with itself). Such a
    runtime says so, and the server's batcher runs each row in a call of its own: a row served beside another
    request, or beside its own request's other texts, equals the row served alone (a request's texts ran together:
    a text's vector moved with the texts sent beside it)."""
    import asyncio

    from millis.serve.encoder.batcher import Batcher, Job

    enc, runtimes = embed_runtimes(built, ("ort-fp32-fused", "ort-int8-dynamic"))
    assert not shares_scales_across_rows(runtimes["ort-fp32-fused"])
    rt = runtimes["ort-int8-dynamic"]
    assert shares_scales_across_rows(rt)

    def infer(rows, t):
        return rt.run(enc.pack(rows, t))["embedding"]

    ids, _ = enc.token_ids(TEXTS[:5])
    row, mates = ids[0], [[5] * 14] + ids[1:5]  # the batch-mates: one request of 5 rows, all in the 16-token bucket
    alone = [infer([r], 16)[0] for r in [row] + mates]
    assert np.abs(infer([row] + mates, 16)[0] - alone[0]).max() > 1e-5  # in one call, the mates would move it
    assert np.abs(infer(mates, 16)[1] - alone[2]).max() > 1e-5  # and a request's own texts move one another

    async def serve():
        loop = asyncio.get_running_loop()
        mine, theirs = Job([row], loop.create_future()), Job(mates, loop.create_future())
        b = Batcher(infer, 128, 32, 4096, 0.0, 64, one_row_per_call=shares_scales_across_rows(rt))
        b.submit(theirs)
        b.submit(mine)
        b.start()
        await asyncio.gather(mine.future, theirs.future)
        await b.close()
        return mine, theirs

    mine, theirs = asyncio.run(serve())
    np.testing.assert_allclose(np.stack(mine.out + theirs.out), np.stack(alone), rtol=0, atol=1e-6)
    assert theirs.batch_rows == [1] * 5 and mine.batch_rows == [1]


def test_fused_ort_graphs_refuse_masks_they_would_misread(built):
    """ORT's fused BERT ops read the attention mask as one length per row: a left-padded row attended to the wrong
    tokens (0.25 off on MiniLM's unit vectors). Such a runtime knows it and refuses such a mask; a right-padded
    one runs as before, and the unfused graph takes any mask."""
    from millis.common.errors import MillisError

    enc, runtimes = embed_runtimes(built, ("ort-fp32", "ort-fp32-fused"))
    assert runtimes["ort-fp32-fused"].mask_as_length and not runtimes["ort-fp32"].mask_as_length
    feeds = enc.pack(enc.token_ids(TEXTS[:2])[0], 16)
    right = {k: v.copy() for k, v in feeds.items()}
    np.testing.assert_allclose(runtimes["ort-fp32-fused"].run(right)["embedding"],
                               runtimes["ort-fp32"].run(right)["embedding"], atol=1e-5)
    left = {k: v[:, ::-1].copy() for k, v in feeds.items()}  # the same rows, padded on the left
    with pytest.raises(MillisError, match="right-padded"):
        runtimes["ort-fp32-fused"].run(left)
    runtimes["ort-fp32"].run(left)  # the unfused graph reads the mask as it is


def embed_runtimes(built, names: tuple[str, ...]):
    """(the encoder, {name: runtime}) of the tiny BERT embedder's variants `names`, one thread each."""
    src, enc, builder, _ = built[("bert", "embed")]
    runtimes = {}
    for name in names:
        v = CATALOG[name]
        vdir, facts = builder.build(v)
        runtimes[name] = open_runtime(v.runtime, vdir, v.name, src.input_names, "embedding",
                                      dict(v.options, file=facts["file"]), threads=1)
    return enc, runtimes
