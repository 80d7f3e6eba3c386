"""The decoder embedders' int8-row (millis.gen.embedder, millis.gen.decoder_smooth, kernels/ends_llama.h): the
calibration against what transformers feeds each matrix, the smoothing's folds against the fp32 outputs, int8-row near
fp32 on every build with the ends' residual rows helping, rows independent of their batch-mates, the calibration
optimize stores, and the kinds of matrices a step cannot mix."""
from __future__ import annotations

import numpy as np
import pytest

from millis.common.errors import MillisError
from millis.common.samples import sample_texts
from millis.encoder.tiny import DECODER_TEMPLATES, build_tiny
from millis.kernels.native import native_isa, runnable_isas

DECODERS = tuple(DECODER_TEMPLATES)  # llama, mistral (window 8), qwen2 (biases), qwen3 (q / k norms); GQA 4 over 2
TEXTS = sample_texts()[:10] + ["a", "hello " * 40]
needs_kernels = pytest.mark.skipif(native_isa() is None, reason="no native kernels here")


def feeds_of(folder):
    from millis.encoder.source import inspect_dir, model_max_length
    from millis.encoder.text import TextEncoder

    src = inspect_dir(folder)
    feeds = TextEncoder(src.path, src.input_names, model_max_length(src)).encode(TEXTS).feeds
    return src, (feeds["input_ids"], feeds["attention_mask"])


def tensors_of(folder):
    import json

    from millis.gen.embedder import decoder_config, decoder_tensors

    raw = json.loads((folder / "config.json").read_text())
    c = decoder_config(raw)
    return decoder_tensors(folder, c, raw["model_type"]), c


@pytest.mark.parametrize("family", DECODERS)
def test_the_calibration_sees_what_transformers_feeds_each_matrix(family):
    """input_amax's per-channel amax of q / o / gate / down's inputs = transformers' (pre-hooks on the same ids):
    RoPE, GQA, Mistral's window (64 calibration tokens over a window of 8), Qwen2's biases, Qwen3's q / k norms."""
    import torch
    from transformers import AutoModel

    from millis.gen.decoder_smooth import GROUPS, calibration_ids, input_amax

    folder = build_tiny(family)
    tensors, c = tensors_of(folder)
    got = input_amax(tensors, c)
    hf = AutoModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    want = [{} for _ in hf.layers]

    def hook(i, group):
        def f(_, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).numpy()
            want[i][group] = x
        return f

    for i, layer in enumerate(hf.layers):
        for group, mod in zip(GROUPS, (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj,
                                       layer.mlp.down_proj)):
            mod.register_forward_pre_hook(hook(i, group))
    with torch.no_grad():
        hf(input_ids=calibration_ids(c))
    assert calibration_ids(c).shape[1] > 8  # past Mistral's window
    for i in range(c.n_layers):
        for g in GROUPS:
            np.testing.assert_allclose(got[i][g], want[i][g], rtol=1e-4, atol=1e-6, err_msg=f"{family} {i} {g}")


@needs_kernels
def test_smoothing_keeps_the_fp32_outputs(monkeypatch):
    """The folds (norms / q k v and gate up columns, up rows / down columns, v rows and bias / o columns per KV head's
    channel) leave the fp32 model's vectors as they were (1e-4), with scales far from 1."""
    from millis.gen import embedder
    from millis.gen.decoder_smooth import input_amax, smoothed
    from millis.gen.embedder import NativeDecoder

    for family in DECODERS:
        folder = build_tiny(family)
        src, args = feeds_of(folder)
        plain = NativeDecoder(folder, "fp32", 2, src.pooling)(*args)
        tensors, c = tensors_of(folder)
        folded = smoothed(tensors, input_amax(tensors, c), c, 0.5)
        for name in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                     "ffn_down"):  # every fold moved its weights
            ratio = np.abs(folded[f"blk.0.{name}.weight"].data / tensors[f"blk.0.{name}.weight"].data)
            assert np.abs(np.log(ratio)).max() > 0.05, (family, name)
        t = tensors["blk.0.attn_v.weight"].data[:, 0] / folded["blk.0.attn_v.weight"].data[:, 0]  # v rows / t
        assert np.abs(np.log(t[:c.head_dim] / t[c.head_dim:])).max() > 0.05, family  # each KV head's own t
        with monkeypatch.context() as m:
            m.setattr(embedder, "precision_tensors", lambda t, p, c, a: smoothed(t, input_amax(t, c), c, 0.5))
            got = NativeDecoder(folder, "fp32", 2, src.pooling)(*args)
        np.testing.assert_allclose(got, plain, atol=1e-4, err_msg=family)


@needs_kernels
@pytest.mark.parametrize("isa", runnable_isas() if native_isa() else ["scalar"])
def test_int8_row_is_near_fp32_and_its_rows_do_not_depend_on_their_batch(isa, monkeypatch):
    """int8-row's vectors near fp32's (cosine > 0.993; not the fp32 values), closer with the ends' residual rows than
    without (summed over the families); a text alone = the same text in a batch, bit for bit; every token's states
    (mean pooling's path: every row an output, so each has a residual row) near fp32's."""
    from millis.gen.embedder import NativeDecoder
    from millis.gen.models.native_llama import KERNEL_SOURCES
    from millis.kernels.native import build

    monkeypatch.setenv("MILLIS_KERNEL_ISA", isa)
    lib = build("llama_step", KERNEL_SOURCES, isa)
    err = {0: 0.0, 3: 0.0}
    try:
        for family in DECODERS:
            folder = build_tiny(family)
            src, args = feeds_of(folder)
            f = NativeDecoder(folder, "fp32", 2, src.pooling)
            ref = f(*args)
            q = NativeDecoder(folder, "int8-row", 2, src.pooling)
            for mode in err:
                lib.llm_ends(mode)
                got = q(*args)
                assert (got * ref).sum(1).min() > (0.993 if mode else 0.99), (family, mode)
                assert np.abs(got - ref).max() > 1e-6, (family, mode)
                err[mode] += float(np.abs(got - ref).sum())
            for k in (0, 5, len(TEXTS) - 1):
                np.testing.assert_array_equal(q(args[0][k:k + 1], args[1][k:k + 1])[0], got[k], err_msg=family)
            states, want = q.token_states(*args), f.token_states(*args)
            keep = args[1].astype(bool)
            a, b = states[keep], want[keep]
            cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            assert cos.min() > 0.98 and cos.mean() > 0.999, family
    finally:
        lib.llm_ends(3)
    assert err[3] < 0.8 * err[0], err


@needs_kernels
def test_optimize_stores_the_calibration_and_a_load_without_it_calibrates_the_same(tmp_path, quick_measure):
    """The native variant folder keeps smoothing_amax.npz (input_amax of its weights); int8-row loaded with it and
    without it gives the same bits; an optimize of native-int8-row embeds near sentence-transformers."""
    from millis.artifact.model import open_model
    from millis.common.config import Shape
    from millis.encoder.smooth import AMAX_FILE, load_amax
    from millis.gen.decoder_smooth import GROUPS
    from millis.gen.embedder import NativeDecoder
    from millis.optimize.config import OptimizeConfig
    from millis.optimize.pipeline import optimize
    from tests.test_decoder_embed import st_vectors

    folder = build_tiny("qwen3")
    out = optimize(OptimizeConfig(source=str(folder), task="embed", out=str(tmp_path / "a"), target=Shape(1, 16),
                                  variants=("native-int8-row",), measure=quick_measure))
    art = open_model(out)
    assert art.meta.variant.name == "native-int8-row"
    want = st_vectors(folder, TEXTS[:4])
    assert (art.embed(TEXTS[:4]) * want).sum(1).min() > 0.995
    d = next(p.parent for p in tmp_path.rglob(AMAX_FILE))
    stored = load_amax(d, 2, GROUPS)
    tensors, c = tensors_of(d)
    from millis.gen.decoder_smooth import input_amax

    for i, a in enumerate(input_amax(tensors, c)):
        for g in GROUPS:
            np.testing.assert_array_equal(stored[i][g], a[g])
    src, args = feeds_of(folder)
    with_file = NativeDecoder(d, "int8-row", 2, src.pooling)(*args)
    (d / AMAX_FILE).unlink()
    np.testing.assert_array_equal(NativeDecoder(d, "int8-row", 2, src.pooling)(*args), with_file)


def test_a_step_takes_one_kind_of_quantized_matrices():
    """int8-row's matrices (int8 per token) beside Q8_0's (int8 per 32) refused by name; alone, its kind."""
    from millis.gen.load import Weight
    from millis.gen.models.native_llama import INT8_ROW, NativeLlama

    w = lambda q: Weight(q, (32, 32), np.zeros((32, 34), np.uint8))  # noqa: E731
    with pytest.raises(MillisError, match="Q8_ROW matrices cannot run beside"):
        NativeLlama._activations({"a": w("Q8_ROW"), "b": w("Q8_0")})
    assert NativeLlama._activations({"a": w("Q8_ROW"), "e": Weight("F32", (32, 32), np.zeros((32, 32)))}) == INT8_ROW


@needs_kernels
def test_a_float_matrix_beside_int8_row_ones_takes_no_residual_rows():
    """One matrix left fp32 (the smoothed weights) among int8-row ones: the step runs it on the exact rows (no residual
    rows through it, whose product would be counted twice) and stays near fp32; all int8-row differs from it."""
    from millis.gen.decoder_smooth import input_amax, smoothed
    from millis.gen.embedder import ROW_ALPHA, precision_tensors
    from millis.gen.models.native_llama import NativeLlama, kv_bytes_per_token

    tensors, c = tensors_of(build_tiny("qwen3"))
    amax = input_amax(tensors, c)
    rows = precision_tensors(tensors, "int8-row", c, amax)
    mixed = dict(rows, **{"blk.0.ffn_down.weight": smoothed(tensors, amax, c, ROW_ALPHA)["blk.0.ffn_down.weight"]})
    ids = np.arange(5, 30, dtype=np.int32)

    def last(t):
        m = NativeLlama(c, t, True, 2, 128, kv_bytes_per_token(c) * 256, 2, head=False)
        v = m.forward_flat(ids, np.arange(len(ids), dtype=np.int32), np.zeros(len(ids), np.int32),
                           np.array([len(ids) - 1], np.int32))[0]
        return v / np.linalg.norm(v)
    want, got, q = last(tensors), last(mixed), last(rows)
    assert got @ want > 0.995 and np.abs(got - q).max() > 1e-6


def test_a_calibration_of_another_model_is_refused_by_name(tmp_path):
    """An encoder's file (qkv / o / inter / down) or one of other widths, read for a decoder: refused naming why."""
    from millis.encoder.smooth import GEMMS, load_amax, save_amax
    from millis.gen.decoder_smooth import GROUPS, check_amax, input_amax

    tensors, c = tensors_of(build_tiny("llama"))
    save_amax([{g: np.ones(4, np.float32) for g in GEMMS}] * 2, tmp_path)
    with pytest.raises(MillisError, match="gate_up"):
        load_amax(tmp_path, 2, GROUPS)
    amax = input_amax(tensors, c)
    check_amax(amax, c, tmp_path)
    amax[1]["down"] = amax[1]["down"][:-1]
    with pytest.raises(MillisError, match="layer 1 down"):
        check_amax(amax, c, tmp_path)


def test_only_the_int8_row_variant_computes_the_calibration(tmp_path):
    """optimize's native decoder variants share one fp32 weights folder; the fp32 forward on calibration ids runs for
    native-int8-row only (a 7B's costs minutes)."""
    from millis.encoder.smooth import AMAX_FILE
    from millis.encoder.source import inspect_dir
    from millis.optimize.build.variants import CATALOG, Builder

    builder = Builder(inspect_dir(build_tiny("qwen3")), "embed", tmp_path, calibration=lambda: [])
    out, _ = builder.build(CATALOG["native-int8"])
    assert not (out / AMAX_FILE).exists() and not list(tmp_path.rglob(AMAX_FILE))
    out, _ = builder.build(CATALOG["native-int8-row"])
    assert (out / AMAX_FILE).is_file()
