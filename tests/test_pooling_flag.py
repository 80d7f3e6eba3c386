"""`--pooling` (TEI's): an embedder folder that declares no pooling (no sentence-transformers modules.json, read as
mean otherwise) pooled by cls, max or splade on every runtime, recorded in the artifact; the reference `millis eval`
reopens pools alike; a folder's own declaration cannot be overridden; the flag's refusals; a source served with it."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from millis.artifact.model import open_model
from millis.common.config import Shape
from millis.common.errors import MillisError
from millis.encoder.tiny import build_tiny
from millis.kernels.native import native_isa
from millis.optimize.config import OptimizeConfig
from millis.optimize.pipeline import optimize

TEXTS = ["where is my card?", "hello", "the exchange rate I was given for my transfer looks wrong to me"]


def undeclared(family: str, tmp_path) -> str:
    """tiny:<family>'s folder without its sentence-transformers modules (a plain Hugging Face checkpoint)."""
    out = tmp_path / f"{family}-plain"
    shutil.copytree(build_tiny(family), out, ignore=shutil.ignore_patterns("modules.json", "1_*", "2_*"))
    assert not (out / "modules.json").exists()
    return str(out)


def hf_pooled(folder: str, mode: str) -> np.ndarray:
    """transformers fp32, pooled by hand: each text's first token's state (cls), the max over its tokens (max)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = AutoModel.from_pretrained(folder, add_pooling_layer=False).eval()(**batch).last_hidden_state
    if mode == "cls":
        return h[:, 0].numpy()
    return h.masked_fill(batch["attention_mask"][..., None] == 0, -torch.inf).amax(1).numpy()


@pytest.mark.parametrize("mode", ["cls", "max"])
def test_a_plain_folder_pools_as_the_flag_says_on_every_runtime(tmp_path, quick_measure, mode, capsys):
    from millis.encoder.source import resolve, with_pooling
    from millis.artifact.model import run_texts
    from millis.encoder.text import TextEncoder
    from millis.evaluate.run import EvalConfig, evaluate
    from millis.optimize.build.variants import CATALOG, Builder
    from millis.optimize.judge import open_variant

    folder = undeclared("bert", tmp_path)
    want = hf_pooled(folder, mode)
    variants = ("torch-fp32", "ort-fp32-fused", "ov-fp32") + (("native-fp32",) if native_isa() else ())
    src = with_pooling(resolve(folder), mode)  # each runtime's variant as optimize builds and opens it
    enc = TextEncoder(src.path, src.input_names, 128, segments=src.segments)
    builder = Builder(src, "embed", tmp_path / "build", calibration=lambda: [])
    for v in variants:
        vdir, _ = builder.build(CATALOG[v])
        got = run_texts(open_variant("embed", 2, src, CATALOG[v], vdir), enc, TEXTS).outputs
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=v)
    lines: list[str] = []
    out = optimize(OptimizeConfig(source=folder, task="embed", out=str(tmp_path / "art"), target=Shape(1, 16),
                                  variants=("ort-fp32-fused",), pooling=mode, measure=quick_measure), lines.append)
    art = open_model(out)
    assert art.meta.source.pooling.mode == mode
    np.testing.assert_allclose(art.embed(TEXTS), want, atol=1e-4)
    assert not any("declares no pooling" in line for line in lines), lines  # the flag said how
    from millis.cli.main import main

    assert main(["info", str(out)]) == 0 and f"-> embedding ({mode} pooling); " in capsys.readouterr().out
    # `millis eval` on the artifact reopens its fp32 source pooled as the artifact records (mean: cosine 0.78)
    data = tmp_path / "texts.csv"
    data.write_text("text\n" + "\n".join(TEXTS) + "\n")
    res = evaluate(EvalConfig(model=str(out), data=str(data), threads=1), say=lambda m: None)
    assert res["cos_min"] > 0.9999, res
    # the source served as torch fp32 with the flag: the same vectors; an artifact keeps the pooling it was built with
    np.testing.assert_allclose(open_model(folder, pooling=mode).embed(TEXTS), want, atol=1e-4)
    with pytest.raises(MillisError, match=f"pools as it was built \\({mode}\\)"):
        open_model(out, pooling="mean")


def test_without_the_flag_a_plain_folder_is_mean_pooled_and_said_so(tmp_path, quick_measure):
    folder = undeclared("bert", tmp_path)
    lines: list[str] = []
    out = optimize(OptimizeConfig(source=folder, task="embed", out=str(tmp_path / "art"), target=Shape(1, 16),
                                  variants=("torch-fp32",), measure=quick_measure), lines.append)
    assert any("declares no pooling" in line and "--pooling" in line for line in lines), lines
    assert open_model(out).meta.source.pooling.mode == "mean"
    assert open_model(folder).meta.source.pooling.mode == "mean"
    lines.clear()  # told mean: nothing to say
    optimize(OptimizeConfig(source=folder, task="embed", out=str(tmp_path / "art2"), target=Shape(1, 16),
                            variants=("torch-fp32",), pooling="mean", measure=quick_measure), lines.append)
    assert not any("declares no pooling" in line for line in lines), lines


def test_serve_takes_the_flag_before_binding(tmp_path, quick_measure):
    """`millis serve FOLDER --pooling cls`: an embedder (tiny:bert's folder has a classifier head, served as a
    classifier without the flag); an artifact with another pooling than it was built with: refused before binding."""
    from millis.serve.config import ServeConfig
    from millis.serve.server import app_and_loader

    folder = undeclared("bert", tmp_path)
    assert app_and_loader(ServeConfig(artifact=folder))[0].keywords["task"] == "classify"
    factory, load = app_and_loader(ServeConfig(artifact=folder, pooling="cls"))
    assert factory.keywords["task"] == "embed"
    np.testing.assert_allclose(load().embed(TEXTS), hf_pooled(folder, "cls"), atol=1e-4)
    art = optimize(OptimizeConfig(source="tiny:bert", task="embed", out=str(tmp_path / "art"), target=Shape(1, 16),
                                  variants=("torch-fp32",), measure=quick_measure))
    with pytest.raises(MillisError, match="pools as it was built \\(mean\\)"):
        app_and_loader(ServeConfig(artifact=str(art), pooling="cls"))
    assert app_and_loader(ServeConfig(artifact=str(art), pooling="mean"))[0].keywords["task"] == "embed"


def test_splade_by_the_flag_equals_a_declared_splade_folder(tmp_path, quick_measure):
    """A masked LM without modules.json and --pooling splade: the vectors of the same weights laid out as a
    SparseEncoder (tiny:bert-splade); --pooling splade over a checkpoint with no masked-LM head is refused."""
    folder = undeclared("bert-splade", tmp_path)
    variant = "native-fp32" if native_isa() else "ort-fp32-fused"
    got = open_model(optimize(OptimizeConfig(source=folder, task="embed", out=str(tmp_path / "a"), target=Shape(1, 16),
                                             variants=(variant,), pooling="splade", measure=quick_measure)))
    declared = open_model(optimize(OptimizeConfig(source="tiny:bert-splade", task="embed", out=str(tmp_path / "b"),
                                                  target=Shape(1, 16), variants=(variant,), measure=quick_measure)))
    assert got.meta.source.pooling.mode == "splade"
    np.testing.assert_allclose(got.embed(TEXTS), declared.embed(TEXTS), atol=1e-5)
    served = open_model(folder, pooling="splade")  # `millis serve FOLDER --pooling splade`: torch fp32, /embed_sparse's
    assert served.meta.source.pooling.mode == "splade" and served.task == "embed"
    np.testing.assert_allclose(served.embed(TEXTS), declared.embed(TEXTS), atol=1e-4)
    with pytest.raises(MillisError, match=r"no masked-LM head \(\*ForMaskedLM\)"):
        optimize(OptimizeConfig(source=undeclared("bert", tmp_path), task="embed", out=str(tmp_path / "c"),
                                variants=(variant,), pooling="splade", measure=quick_measure))


def test_the_flags_refusals(tmp_path, quick_measure):
    """A folder's own declaration is not overridden (naming modules.json); the flag is an embedder's; with
    --compress (whose students reread the folder) it is refused before any training; a bad mode names the flag."""
    with pytest.raises(MillisError, match="declares mean pooling \\(modules.json\\)"):
        optimize(OptimizeConfig(source="tiny:bert", task="embed", out=str(tmp_path / "a"), pooling="cls",
                                measure=quick_measure))
    optimize(OptimizeConfig(source="tiny:bert", task="embed", out=str(tmp_path / "b"), pooling="mean",
                            variants=("torch-fp32",), measure=quick_measure))  # its own mode: as without the flag
    with pytest.raises(MillisError, match="--pooling is an embedder's"):
        OptimizeConfig(source="tiny:bert", task="classify", pooling="cls")
    with pytest.raises(MillisError, match="--pooling must be one of mean, cls, max, last-token, splade"):
        OptimizeConfig(source="tiny:bert", pooling="last")
    with pytest.raises(MillisError, match="--pooling cls with --compress"):
        optimize(OptimizeConfig(source=undeclared("bert", tmp_path), task="embed", out=str(tmp_path / "c"),
                                pooling="cls", compress="quick", measure=quick_measure))
    with pytest.raises(MillisError, match="declares mean pooling"):
        open_model("tiny:bert", pooling="cls")
    from millis.serve.config import ServeConfig

    assert ServeConfig(pooling="cls").pooling == "cls"
    with pytest.raises(MillisError, match="--pooling must be one of"):
        ServeConfig(pooling="first")
