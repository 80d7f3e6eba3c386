"""`millis optimize --device cuda`: the GPU variants (the compact encoder through CUDA graphs) judged,
measured and shipped like the others, and GPU artifacts loaded only where they run.

Without CUDA the GPU variant is stood in for by the same runtime on the CPU (device "cpu": the padded
buckets, run eagerly in fp32 with the torch epilogues), so the whole path (build, judge against the
reference, measure, write, load) runs in CI; the real fp16 / bf16 variants run on a GPU (marked gpu).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from millis.common.config import Shape
from millis.common.errors import MillisError
from millis.optimize.build import variants as variants_mod
from millis.optimize.build.variants import CATALOG, GPU_VARIANTS, PRESET_VARIANTS, Variant, variants_for
from millis.optimize.config import OptimizeConfig

TEXTS = ["refund my card payment", "where is my parcel", "a"]


def test_gpu_variants_are_the_cuda_defaults_and_not_the_cpus():
    assert set(GPU_VARIANTS) == {"cuda-fp16", "cuda-bf16", "cuda-int8", "cuda-fp8"}
    assert not set(GPU_VARIANTS) & set(PRESET_VARIANTS["cpu"])
    names = [v.name for v in variants_for((), "cpu", "cuda")]
    # the reference first: fidelity is against it
    assert names == ["torch-fp32", "cuda-fp16", "cuda-bf16", "cuda-int8", "cuda-fp8"]
    with pytest.raises(MillisError, match="device must be"):
        OptimizeConfig(source="tiny:bert", device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU errors")
def test_without_cuda_the_gpu_run_and_variants_say_so(tmp_path, quick_measure):
    from millis.optimize.pipeline import optimize

    with pytest.raises(MillisError, match="needs a CUDA GPU"):
        optimize(OptimizeConfig(source="tiny:bert", task="classify", out=str(tmp_path / "a"), device="cuda",
                                measure=quick_measure, target=Shape(1, 16)))
    # asked for by name on a CPU run: skipped with the reason, the run goes on
    art = optimize(OptimizeConfig(source="tiny:bert", task="classify", out=str(tmp_path / "b"),
                                  variants=("cuda-fp16",), measure=quick_measure, target=Shape(1, 16)))
    rows = {r["name"]: r for r in json.loads((art / "report.json").read_text())["variants"]}
    assert "no CUDA device" in rows["cuda-fp16"]["error"]


def test_gpu_artifact_written_loaded_and_kept_to_its_device(tmp_path, quick_measure, monkeypatch):
    from millis.artifact.model import load, open_model
    from millis.optimize.pipeline import optimize

    if not torch.cuda.is_available():  # the CPU stand-in of cuda-fp16: same runtime, eager, fp32
        monkeypatch.setitem(CATALOG, "cuda-fp16", Variant("cuda-fp16", "cuda", "fp16", ("weights",),
                                                          {"dtype": "fp32", "fuse": "torch", "device": "cpu"}))
        assert variants_mod.CATALOG["cuda-fp16"].options["device"] == "cpu"
    out = tmp_path / "gpu-art"
    cfg = OptimizeConfig(source="tiny:bert", task="classify", out=str(out), target=Shape(1, 16),
                         variants=("cuda-fp16",), measure=quick_measure,
                         device="cuda" if torch.cuda.is_available() else "cpu")
    art = optimize(cfg, choose=lambda cands: next(c for c in cands if c.name == "cuda-fp16"))
    meta = json.loads((art / "millis.json").read_text())
    assert meta["variant"]["runtime"] == "cuda" and meta["variant"]["name"] == "cuda-fp16"
    assert (art / "config.json").is_file() and (art / "model.safetensors").is_file()
    rows = {r["name"]: r for r in json.loads((art / "report.json").read_text())["variants"]}
    assert rows["cuda-fp16"]["latency"] and rows["cuda-fp16"]["fidelity"] and not rows["cuda-fp16"].get("error")

    model = load(art, max_batch=4, max_batch_tokens=256)
    buckets = {s.name for s in model.runtime.buckets}
    assert "b1xs16" in buckets and "b4xs64" in buckets and "b8xs16" not in buckets  # the server's shapes
    ref = open_model("tiny:bert", task="classify")
    got, want = model.run(TEXTS).outputs, ref.run(TEXTS).outputs
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=0.05 if torch.cuda.is_available() else 1e-4)
    with pytest.raises(MillisError, match="GPU artifact"):
        open_model(art, device="cpu")


def test_cpu_artifact_refused_on_cuda(classify_artifact):
    from millis.artifact.model import load

    with pytest.raises(MillisError, match="CPU artifact"):
        load(classify_artifact, device="cuda")
