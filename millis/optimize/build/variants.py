"""Variants: named recipes of passes, each built into its own directory.

A recipe is data (runtime kind, passes, runtime options); `build` turns it into files. The recipe
is written into the artifact's millis.json so the chosen variant can be rebuilt and reloaded.
"""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from millis.common.config import preset_of
from millis.common import hardware
from millis.common.errors import MillisError
from millis.encoder.smooth import AMAX_FILE
from millis.encoder.source import DECODERS, LAST_TOKEN, ModelSource
from millis.kernels.native import native_isa


@dataclass(frozen=True)
class Variant:
    name: str
    runtime: str                   # torch | onnxruntime | openvino | native | cuda
    precision: str                 # fp32 | fp16 | bf16 | int8 | fp8
    passes: tuple[str, ...]        # applied in order, see PASSES
    options: dict[str, Any] = field(default_factory=dict)  # runtime options (graph level, precision...)
    note: str = ""
    keep_fp32: tuple[str, ...] = ()  # graph nodes the int8 pass leaves in fp32 (sensitivity fallback)


REFERENCE = "torch-fp32"

CATALOG: dict[str, Variant] = {v.name: v for v in [
    Variant(REFERENCE, "torch", "fp32", (), {}, "HF eager fp32: the reference"),
    Variant("ort-fp32", "onnxruntime", "fp32", ("export",), {"graph_level": "basic"},
            "ONNX export, ORT basic graph optimizations"),
    Variant("ort-fp32-fused", "onnxruntime", "fp32", ("export", "fuse"), {"graph_level": "all"},
            "transformer fusions (Attention, SkipLayerNorm, BiasGelu) + ORT level all"),
    Variant("ort-int8-dynamic", "onnxruntime", "int8", ("export", "fuse", "int8-dynamic-tensor"),
            {"graph_level": "all"}, "dynamic int8, per-tensor weights"),
    Variant("ort-int8-dynamic-pc", "onnxruntime", "int8", ("export", "fuse", "int8-dynamic-channel"),
            {"graph_level": "all"}, "dynamic int8, per-channel weights"),
    Variant("ort-int8-attention", "onnxruntime", "int8", ("export", "fuse", "int8-dynamic-attention"),
            {"graph_level": "all"}, "dynamic int8 on the fused attention (QKV) only, per-channel; rest fp32"),
    Variant("ort-int8-static", "onnxruntime", "int8", ("export", "fuse", "int8-static-qdq"), {"graph_level": "all"},
            "static int8 QDQ, MatMuls calibrated (MinMax) on the calibration texts, per-channel"),
    Variant("ort-int8-static-percentile", "onnxruntime", "int8", ("export", "fuse", "int8-static-percentile"),
            {"graph_level": "all"}, "static int8 QDQ, ranges at the 99.999th percentile (clips outliers)"),
    Variant("ort-int8-static-entropy", "onnxruntime", "int8", ("export", "fuse", "int8-static-entropy"),
            {"graph_level": "all"}, "static int8 QDQ, ranges minimising KL divergence (entropy)"),
    Variant("ov-fp32", "openvino", "fp32", ("export", "openvino-ir"), {"precision": "f32"},
            "OpenVINO f32, one dynamic-shape model"),
    Variant("ov-bf16", "openvino", "bf16", ("export", "openvino-ir"), {"precision": "bf16"},
            "OpenVINO bf16 (AMX/AVX512-BF16 where the CPU has them)"),
    Variant("ov-int8", "openvino", "int8", ("export", "openvino-ir", "nncf-int8"),
            {"precision": "f32"}, "OpenVINO + NNCF int8 (transformer preset), one dynamic-shape model"),
    Variant("native-fp32", "native", "fp32", ("weights",), {"precision": "fp32"},
            "millis's C encoder: one call per batch, padding skipped, fp32 weights packed at load"),
    Variant("native-bf16", "native", "bf16", ("weights",), {"precision": "bf16"},
            "millis's C encoder, bf16 weights x bf16 activations, fp32 sums (AVX-512 BF16: vdpbf16ps)"),
    Variant("native-int8", "native", "int8", ("weights",), {"precision": "int8"},
            "millis's C encoder, int8 weights (scale per 32) x int8 activations (scale per 32), no saturation"),
    Variant("native-int8-a16", "native", "int8", ("weights",), {"precision": "int8-a16"},
            "millis's C encoder, int8 weights (scale per 32) x int16 activations (scale per 32)"),
    Variant("native-int7", "native", "int8", ("weights",), {"precision": "int7"},
            "millis's C encoder, 7-bit weights (scale per 32) x int8 activations: AVX2 maddubs, no sign fix-ups"),
    Variant("native-int7-a7", "native", "int8", ("weights",), {"precision": "int7-a7"},
            "millis's C encoder, 7-bit weights x 7-bit activations (scales per 32): AVX2 sums 2 steps in int16"),
    Variant("native-int7-row", "native", "int8", ("weights",), {"precision": "int7-row"},
            "millis's C encoder, int7-a7 with one scale per weight row and per token: int32 sums over all of K"),
    Variant("native-int7-row-a8", "native", "int8", ("weights",), {"precision": "int7-row-a8"},
            "millis's C encoder, int7-row's weights x 8-bit activations per token, smoothed (as fast on VNNI)"),
    Variant("native-int8-row", "native", "int8", ("weights",), {"precision": "int8-row"},
            "millis's C encoder, 8-bit weights a row x 8-bit activations a token, [CLS] / [SEP] given a residual row"),
    Variant("native-int7-row-att8", "native", "int8", ("weights",), {"precision": "int7-row", "attention": "int8"},
            "int7-row with the attention in int8 (q, k, v per token and head; AVX-512 VNNI or AVX2, the same bits)"),
    Variant("native-int8-row-att8", "native", "int8", ("weights",), {"precision": "int8-row", "attention": "int8"},
            "int8-row with the attention in int8 (as native-int7-row-att8's)"),
    Variant("cuda-fp16", "cuda", "fp16", ("weights",), {"dtype": "fp16"},
            "millis's compact encoder on the GPU: fp16, fused Triton epilogues, a CUDA graph per shape bucket"),
    Variant("cuda-bf16", "cuda", "bf16", ("weights",), {"dtype": "bf16"},
            "millis's compact encoder on the GPU: bf16, fused Triton epilogues, a CUDA graph per shape bucket"),
    Variant("cuda-int8", "cuda", "int8", ("weights",), {"dtype": "fp16", "gemm": "int8"},
            "the GPU encoder with W8A8 int8 GEMMs: weights per channel, activations per token (in the kernel)"),
    Variant("cuda-fp8", "cuda", "fp8", ("weights",), {"dtype": "fp16", "gemm": "fp8"},
            "the GPU encoder with W8A8 fp8 (e4m3) GEMMs: weights per channel, activations per token (Hopper+)"),
]}

# dynamic int8 passes -> quantize.dynamic arguments
DYNAMIC_INT8: dict[str, dict[str, Any]] = {
    "int8-dynamic-tensor": {"per_channel": False},
    "int8-dynamic-channel": {"per_channel": True},
    "int8-dynamic-attention": {"per_channel": True, "op_types": ("Attention",)},
}

# static int8 passes -> calibration method
STATIC_INT8: dict[str, str] = {"int8-static-qdq": "minmax", "int8-static-percentile": "percentile",
                               "int8-static-entropy": "entropy"}

# Tried, in this order, only when plain int8 misses the budget (see millis.optimize.recover).
RECOVERY = ("ort-int8-dynamic-pc", "ort-int8-static", "ort-int8-static-percentile", "ort-int8-static-entropy")
MIXED_BASE = "ort-int8-dynamic-pc"  # the sensitivity fallback keeps some of its MatMuls in fp32

PRESET_VARIANTS = {
    "cpu": tuple(n for n, v in CATALOG.items() if n not in RECOVERY[2:] and v.runtime != "cuda"),
    "quick": (REFERENCE, "ort-fp32-fused", "ort-int8-attention", "ort-int8-dynamic-pc"),
}
GPU_VARIANTS = tuple(n for n, v in CATALOG.items() if v.runtime == "cuda")  # optimize --device cuda


def variants_for(names: tuple[str, ...], preset: str, device: str = "cpu") -> list[Variant]:
    """The named variants, else the device's defaults (cuda: the GPU variants; cpu: the preset's), the
    reference first."""
    names = names or (GPU_VARIANTS if device == "cuda" else preset_of(PRESET_VARIANTS, preset, "--preset"))
    unknown = [n for n in names if n not in CATALOG]
    if unknown:
        raise MillisError(f"unknown variant(s) {', '.join(unknown)}; available: {', '.join(CATALOG)}")
    if REFERENCE not in names:
        names = (REFERENCE, *names)  # fidelity is always measured against the reference
    return [CATALOG[n] for n in names]


class Builder:
    """Builds variants for one source and task, sharing the export and fused graph between them."""

    def __init__(self, src: ModelSource, task: str, work: Path, calibration: Callable[[], list[dict]]):
        self.src, self.task, self.work = src, task, work
        self.calibration = calibration  # () -> list of feeds dicts (B, T) int64
        self._cache: dict[tuple[str, ...], Path] = {}

    def build(self, v: Variant) -> tuple[Path, dict[str, Any]]:
        """Build `v` into work/<name>/ and return (dir, facts such as op counts and file size)."""
        out = self.work / v.name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        if v.runtime == "torch":
            return self.src.path, {"file": None}
        if self.src.model_type in DECODERS:
            check_decoder(v)
        if v.runtime == "cuda" and v.options.get("device", "cuda") == "cuda" and not hardware.has_cuda():
            raise MillisError("no CUDA device: the GPU variant is skipped (optimize --device cuda on a GPU machine)")
        if v.precision == "bf16" and v.runtime != "cuda" and not hardware.has_bf16():
            raise MillisError("this CPU has no native bf16 (AMX or AVX512-BF16): the variant would run "
                              "as fp32 or emulated, so it is skipped")
        if v.options.get("attention") == "int8" and native_isa() not in ("avx512", "avx2"):
            raise MillisError("the int8 attention runs on the avx512 and avx2 builds, which this CPU lacks: "
                              "the variant is skipped")
        path = self._apply(v.passes, v.keep_fp32)
        if self.src.model_type in DECODERS and v.options.get("precision") == "int8-row" and \
                not path.with_name(AMAX_FILE).is_file():  # its smoothing's calibration, once beside the shared weights
            from millis.gen.embedder import save_calibration

            save_calibration(path.parent)
        files = [path] + ([path.with_suffix(".bin")] if path.suffix == ".xml" else []) + \
            [f for f in [path.with_name(path.name + ".data")] if path.suffix == ".onnx" and f.is_file()] + \
            ([path.with_name("config.json")] if path.suffix == ".safetensors" else []) + \
            [f for f in [path.with_name(AMAX_FILE)] if path.suffix == ".safetensors" and f.is_file()]
        for f in files:  # the model file as model.<ext> (a graph's weights beside it: model.onnx.data); the native
            # runtime's HF config and amax keep their names
            shutil.copy2(f, out / (f.name if f.name in ("config.json", AMAX_FILE) else
                                   "model.onnx.data" if f.name.endswith(".onnx.data") else f"model{f.suffix}"))
        facts: dict[str, Any] = {"file": f"model{path.suffix}", "bytes": sum(f.stat().st_size for f in files)}
        if path.suffix == ".onnx":
            from millis.optimize.build import graph
            facts["ops"] = graph.count_ops(path)
        return out, facts

    def _apply(self, passes: tuple[str, ...], keep: tuple[str, ...] = ()) -> Path:
        """Run passes in order; every prefix is cached so shared steps run once. `keep` names nodes
        the last (int8) step leaves in fp32."""
        key = (passes, keep)
        if key in self._cache:
            return self._cache[key]
        prev = self._apply(passes[:-1]) if len(passes) > 1 else None
        step = passes[-1]
        if keep and step not in DYNAMIC_INT8:
            raise MillisError(f"keeping nodes in fp32 needs a dynamic int8 pass, not {step!r}")
        tag = f"-keep{len(keep)}-{hashlib.sha1(chr(0).join(keep).encode()).hexdigest()[:8]}" if keep else ""
        d = self.work / "_passes" / ("+".join(passes) + tag)
        d.mkdir(parents=True, exist_ok=True)
        if step != "weights":  # onnx, imported here: the native and GPU variants' runs need none of it
            from millis.optimize.build import graph, quantize
        if step == "weights":  # the fp32 weights as they are (the native runtime packs them at load)
            path = native_weights(self.src, d)
        elif step == "export":
            from millis.optimize.build.export import export
            path = export(self.src, self.task, d)
        elif step == "fuse":
            path = d / "model.onnx"
            graph.fuse(self.src, prev, path)
        elif step in DYNAMIC_INT8:
            path = d / "model.onnx"
            quantize.dynamic(prev, path, **DYNAMIC_INT8[step], exclude=keep)
        elif step in STATIC_INT8:
            path = d / "model.onnx"
            quantize.static(prev, path, self.calibration(), method=STATIC_INT8[step], per_channel=True)
        elif step == "openvino-ir":
            path = _to_openvino(prev, d)
        elif step == "nncf-int8":
            path = _nncf_int8(prev, d, self.calibration())
        else:
            raise MillisError(f"unknown pass {step!r}")
        self._cache[key] = path
        return path

    def graph(self, passes: tuple[str, ...]) -> Path:
        """The file after `passes` (built if needed), e.g. the fused fp32 graph for sensitivity."""
        return self._apply(passes)


def check_decoder(v: Variant) -> None:
    """The variants a decoder embedder builds: the CPU runtimes', the native ones in the decoder's precisions."""
    if v.runtime == "cuda":
        raise MillisError("the CUDA variants run BERT-family encoders; a decoder embedder runs on the CPU variants: "
                          "the variant is skipped")
    if v.runtime == "native":
        from millis.gen.embedder import check_decoder_variant

        check_decoder_variant(v.options)


def decoder_weights(src: ModelSource, d: Path) -> Path:
    """A decoder embedder's config.json (its pooling recorded) + model.safetensors (fp32), for the native runtime;
    checked at build (millis.gen.embedder.decoder_config refuses what it would compute otherwise)."""
    import json

    from safetensors.numpy import save_file

    from millis.gen.embedder import decoder_config
    from millis.gen.load import read_safetensors

    cfg = json.loads((src.path / "config.json").read_text())
    decoder_config(cfg)
    cfg["millis_pooling"] = {"mode": src.pooling.mode, "normalize": src.pooling.normalize}
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    path = d / "model.safetensors"
    save_file({k: np.ascontiguousarray(v.float().numpy()) for k, v in read_safetensors(src.path).items()
               if k.removeprefix("model.") != "lm_head.weight"}, str(path))  # (the embedder reads no vocabulary head)
    return path


def native_weights(src: ModelSource, d: Path) -> Path:
    """config.json + model.safetensors (fp32) of `src` in `d`, for the native runtime; checked at build:
    a model it cannot run (not BERT-family, pruned heads) fails here, naming why. Beside them the smoothing's
    calibration (millis.encoder.smooth: each GEMM's input amax on its random ids), so that loading a row
    precision runs no fp32 forward (BERT-base: ~3 s of a load)."""
    import json

    from safetensors.numpy import save_file

    from millis.encoder.smooth import input_amax, save_amax
    from millis.gpu.encoder import EncoderConfig, RunOptions, from_hf, load_state

    if src.model_type in DECODERS:
        return decoder_weights(src, d)
    if src.pooling.mode == LAST_TOKEN:  # (its C pooling: mean, max, a [CLS] row's, SPLADE's)
        raise MillisError("the native encoder does not pool last-token: the ONNX Runtime, OpenVINO and torch variants "
                          "do (the variant is skipped)")
    cfg, state = load_state(src.path)
    EncoderConfig.from_hf(cfg)
    # the sentence-transformers pooling lives beside the weights in the source; the runtime reads it here
    cfg = dict(cfg, millis_pooling={"mode": src.pooling.mode, "normalize": src.pooling.normalize})
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    path = d / "model.safetensors"
    save_file({k: np.ascontiguousarray(v.float().numpy()) for k, v in state.items()}, str(path))
    save_amax(input_amax(from_hf(d, "embed", options=RunOptions(dtype="fp32", fuse="torch", device="cpu"))), d)
    return path


def _to_openvino(onnx_path: Path, d: Path) -> Path:
    import openvino as ov

    path = d / "model.xml"
    ov.save_model(ov.convert_model(str(onnx_path)), str(path), compress_to_fp16=False)
    return path


def _nncf_int8(xml: Path, d: Path, feeds: list[dict[str, np.ndarray]]) -> Path:
    import logging

    import nncf
    import openvino as ov

    logging.getLogger("nncf").setLevel(logging.ERROR)
    if not feeds:
        raise MillisError("NNCF int8 needs calibration texts; none were given")
    model = ov.Core().read_model(str(xml))
    q = nncf.quantize(model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
                      preset=nncf.QuantizationPreset.MIXED, subset_size=len(feeds))
    path = d / "model.xml"
    ov.save_model(q, str(path), compress_to_fp16=False)
    return path
