"""millis.json is read and written through typed, versioned dataclasses (millis.artifact.meta): a round
trip gives back what was written, version-1 files written before the types existed still read, and a
malformed file fails naming the file and the field."""
import copy
import json
import subprocess
import sys
from dataclasses import replace

import pytest

from millis.artifact import store
from millis.artifact.meta import (Accuracy, ArtifactMeta, ColdStart, CompressedStudent, Hardware, LatencyStats,
                                  Measured, ServeMix, SourceMeta, Stall, TrainMeta, VariantRecipe, read_train_meta)
from millis.common.errors import MillisError
from millis.encoder.source import Pooling

# An artifact's millis.json as millis wrote it before the typed metadata (version 1, trimmed to one shape).
V1_ARTIFACT = {
    "format": "millis-artifact", "version": 1, "millis_version": "0.1.0", "created": "2026-11-30T06:33:06+0000",
    "task": "classify", "output": "logits", "input_names": ["input_ids", "attention_mask", "token_type_ids"],
    "max_length": 130, "id2label": {"0": "bank", "1": "market"},
    "source": {"spec": "/m/topics", "path": "/m/topics", "sha256": "275f", "model_type": "bert", "layers": 2,
               "hidden": 32, "heads": 4, "pooling": {"mode": "mean", "normalize": False}},
    "variant": {"name": "l-half+ort-int8-dynamic-pc", "precision": "int8", "runtime": "onnxruntime",
                "passes": ["export", "fuse", "int8-dynamic-channel"], "options": {"graph_level": "all"},
                "compressed": {"recipe": {"name": "l-half", "layers": 0.5, "heads": 0.0, "ffn": 0.0, "drop_layers": 0},
                               "model": "/cache/distill-dc71", "sha256": "efab", "layers": 1, "heads": 4,
                               "intermediate": 64, "train_s": 0.27, "val_score": 1.0}},
    "compressed": {"recipe": {"name": "l-half", "layers": 0.5, "heads": 0.0, "ffn": 0.0, "drop_layers": 0},
                   "model": "/cache/distill-dc71", "sha256": "efab", "layers": 1, "heads": 4, "intermediate": 64,
                   "train_s": 0.27, "val_score": 1.0},
    "measured": {"target": "b1xs16",
                 "latency": {"b1xs16": {"mean_ms": 0.32, "n": 4, "p50_ms": 0.31, "p95_ms": 0.51, "p99_ms": 0.52,
                                        "rows_per_s": 3215.4}},
                 "fidelity": {"max_abs_diff": 0.04, "max_logit_diff": 0.04, "top1_agreement": 1.0},
                 "accuracy": {"accuracy": 1.0, "drop_pts": 0.0, "macro_f1": 1.0, "n": 60},
                 "reference_accuracy": 1.0,
                 "cold_start": {"first_call_s": 0.0005, "load_s": 0.009, "total_s": 0.0095},
                 "serve_mix": {"calls": 4, "rows_per_s": 14993.5, "shapes": ["b11xs16", "b2xs16"],
                               "stalls": [{"shape": "b2xs16", "cold_ms": 900.0, "warm_ms": 1.0}],
                               "worst_ms": 900.0, "worst_shape": "b2xs16", "worst_warm_ms": 1.0},
                 "fidelity_texts": "60 texts from test.csv"},
    "hardware": {"cores": 2, "cpu": "AMD EPYC", "isa": ["avx2", "fma"], "machine": "x86_64", "python": "3.11.7",
                 "versions": {"onnxruntime": "1.32.0", "torch": "2.13.0+cpu"}},
    "config": {"source": "/m/topics", "task": "classify", "label_col": "topic", "budget": {"max_drop": 0.5}},
    "files": {"model.onnx": "abcd", "tokenizer/tokenizer.json": "ef01"},
}

# A `millis distill` (embed) directory's millis.json, version 1.
V1_TRAIN = {
    "format": "millis-train", "version": 1, "millis_version": "0.1.0", "created": "2026-11-30T06:40:37+0000",
    "best_epoch": 2, "train_s": 0.45, "config": {"layers": 1, "train": {"seed": 0, "val_fraction": 0.1}},
    "data": {"path": "/d/texts.txt", "rows": 189, "text_col": "text", "validation": "10% held out"},
    "distill": {"layer_map": [1], "parameters": {"student": 27616, "teacher": 36160}, "student_layers": 1,
                "student_source": "", "task": "embed", "teacher": {"layers": 2, "sha256": "aa79", "spec": "tiny:bert"},
                "teacher_score": 1.0},
    "hardware": V1_ARTIFACT["hardware"], "files": {"model.safetensors": "1234"},
    "history": [{"epoch": 1, "rows_per_s": 795.9, "seconds": 0.21, "train_loss": 1.85, "val_cosine": 0.989},
                {"epoch": 2, "rows_per_s": 741.5, "seconds": 0.23, "train_loss": 1.84, "val_cosine": 0.995}],
    "source": {"model_type": "bert", "sha256": "aa79", "spec": "tiny:bert"}, "val_cosine": 0.995,
}


def test_version_1_files_read_and_write_back_unchanged():
    meta = ArtifactMeta.from_dict(copy.deepcopy(V1_ARTIFACT), "x/millis.json")
    assert meta.id2label == {0: "bank", 1: "market"} and meta.input_names[0] == "input_ids"
    assert meta.source.pooling == Pooling("mean", False) and meta.label_col == "topic"
    assert meta.variant.compressed == meta.compressed and meta.compressed.name == "l-half"
    assert meta.measured.latency["b1xs16"].p50_ms == 0.31 and meta.measured.latency["b1xs16"].n == 4
    assert meta.measured.serve_mix.stalls == (Stall("b2xs16", 900.0, 1.0),)
    assert meta.measured.accuracy == Accuracy(1.0, 1.0, 60, 0.0) and meta.hardware.isa == ("avx2", "fma")
    assert meta.to_dict() == V1_ARTIFACT  # the same keys and values: existing artifacts and readers keep working
    train = TrainMeta.from_dict(copy.deepcopy(V1_TRAIN), "t/millis.json")
    assert train.val_score == 0.995 and train.labels == () and train.prune is None
    assert train.distill.teacher.spec == "tiny:bert" and train.distill.layer_map == (1,)
    assert [e.val_cosine for e in train.history] == [0.989, 0.995] and train.history[0].val_accuracy is None
    assert train.train_config == {"seed": 0, "val_fraction": 0.1}
    assert train.to_dict() == V1_TRAIN


def test_empty_optional_parts_of_older_files_read_as_absent():
    raw = copy.deepcopy(V1_ARTIFACT)
    raw["measured"].update(accuracy={}, serve_mix={}, reference_accuracy=None)  # no labelled data, no serve mix
    del raw["measured"]["fidelity_texts"], raw["compressed"], raw["variant"]["compressed"]
    m = ArtifactMeta.from_dict(raw, "x").measured
    assert (m.accuracy, m.serve_mix, m.reference_accuracy, m.fidelity_texts) == (None, None, None, "")
    written = ArtifactMeta.from_dict(raw, "x").to_dict()
    assert "accuracy" not in written["measured"] and written["measured"]["reference_accuracy"] is None
    assert "compressed" not in written and "keep_fp32" not in written["variant"]


def sample_meta() -> ArtifactMeta:
    """Every part filled, built from the types (not from JSON)."""
    student = CompressedStudent({"name": "l-half", "layers": 0.5}, "/cache/s", "beef", 1, 2, 64, 0.9, 1.5)
    variant = VariantRecipe("l-half+ort-int8-mixed", "onnxruntime", "int8", ("export", "fuse"), {"graph_level": "all"},
                            keep_fp32=("Attention_4",), compressed=student)
    measured = Measured("b1xs16", {"b1xs16": LatencyStats(1.0, 1.5, 2.0, 1.1, 10, 1000.0)},
                        {"cos_min": 0.999}, ColdStart(0.1, 0.01, 0.11), Accuracy(0.9, 0.88, 50, 0.4), 0.904,
                        ServeMix(("b2xs32",), 2, 500.0, 4.0, "b2xs32", 2.0, ()), "30 texts", "val.jsonl, 50 rows")
    return ArtifactMeta(task="embed", output="embedding", input_names=("input_ids", "attention_mask"), max_length=128,
                        id2label={},
                        source=SourceMeta("tiny:bert", "/s", "cafe", "bert", 2, 32, 4, Pooling("cls", True)),
                        variant=variant, millis_version="0.1.0", created="2026-01-01T00:00:00+0000", measured=measured,
                        hardware=Hardware("cpu", 2, ("avx2",), "x86_64", "3.11", {"numpy": "2"}),
                        config={"source": "tiny:bert", "label_col": ""}, compressed=student)


def test_write_read_round_trip(tmp_path):
    meta = sample_meta()

    def fill(d):
        (d / "model.onnx").write_bytes(b"weights")
        return meta

    out = store.write(tmp_path / "a", fill)
    back = store.read_meta(out)
    assert back == replace(meta, files={"model.onnx": back.files["model.onnx"]}) and len(back.files["model.onnx"]) == 64
    assert back.format == "millis-artifact" and back.version == 1
    raw = json.loads((out / "millis.json").read_text())
    assert raw["variant"]["keep_fp32"] == ["Attention_4"] and raw["measured"]["latency"]["b1xs16"]["p50_ms"] == 1.0
    assert raw["source"]["pooling"] == {"mode": "cls", "normalize": True} and raw["id2label"] == {}


def test_an_unreadable_meta_is_never_written(tmp_path):
    bad = replace(sample_meta(), max_length="128")  # dataclasses do not check types; the write does
    with pytest.raises(MillisError, match="'max_length' should be an integer, got str '128'"):
        store.write(tmp_path / "a", lambda d: bad)
    assert list(tmp_path.iterdir()) == []  # no artifact, no temp dir


@pytest.mark.parametrize("change,message", [
    (lambda m: m["measured"].pop("target"), "field 'measured.target' is missing"),
    (lambda m: m.pop("source"), "field 'source' is missing"),
    (lambda m: m.__setitem__("max_length", "130"), "field 'max_length' should be an integer, got str '130'"),
    (lambda m: m["measured"]["latency"]["b1xs16"].__setitem__("p50_ms", "fast"),
     "field 'measured.latency.b1xs16.p50_ms' should be a number"),
    (lambda m: m.__setitem__("input_names", ["input_ids", 7]), "field 'input_names[1]' should be a string, got int 7"),
    (lambda m: m.__setitem__("id2label", {"zero": "bank"}), "field 'id2label' should have integer keys, got 'zero'"),
    (lambda m: m["source"]["pooling"].__setitem__("normalize", "yes"),
     "'source.pooling.normalize' should be true or false"),
    (lambda m: m.__setitem__("variant", ["ort"]), "field 'variant' should be an object, got a list"),
    (lambda m: m.__setitem__("version", 2), "has millis artifact format version 2; this millis reads 1 to 1"),
    (lambda m: m.__setitem__("version", "1"), "format version '1'"),
    (lambda m: m.__setitem__("format", "millis-train"), "describes a model `millis train` wrote, not an artifact"),
    (lambda m: m.__setitem__("format", "x"), "is not a millis artifact description"),
    (lambda m: m.__setitem__("task", "translate"), "task 'translate': expected one of classify, embed"),
    (lambda m: m.__setitem__("max_length", -5), "max_length -5: expected a positive number of tokens"),
    (lambda m: m.__setitem__("output", "embedding"), "output 'embedding': the classify task's output is 'logits'"),
])
def test_a_malformed_artifact_names_the_file_and_the_field(tmp_path, change, message):
    raw = copy.deepcopy(V1_ARTIFACT)
    change(raw)
    d = tmp_path / "art"
    d.mkdir()
    (d / "millis.json").write_text(json.dumps(raw))
    with pytest.raises(MillisError, match=str(d / "millis.json")) as e:
        store.read_meta(d, verify=False)
    assert message in str(e.value)


def test_a_malformed_or_newer_training_record_fails(tmp_path):
    (tmp_path / "millis.json").write_text(json.dumps({k: v for k, v in V1_TRAIN.items() if k != "best_epoch"}))
    with pytest.raises(MillisError, match=r"millis.json: field 'best_epoch' is missing"):
        read_train_meta(tmp_path)
    (tmp_path / "millis.json").write_text(json.dumps(dict(V1_TRAIN, version=9)))
    with pytest.raises(MillisError, match="trained model format version 9"):
        read_train_meta(tmp_path)
    (tmp_path / "millis.json").write_text(json.dumps(V1_ARTIFACT))
    assert read_train_meta(tmp_path) is None  # another format: not a trained model, no error


def test_a_real_artifact_round_trips_and_info_prints_it(classify_artifact):
    raw = json.loads((classify_artifact / "millis.json").read_text())
    meta = store.read_meta(classify_artifact)
    assert meta.to_dict() == {**raw, "measured": {k: v for k, v in raw["measured"].items() if v != {}}}
    assert ArtifactMeta.from_dict(meta.to_dict(), "again") == meta
    assert (meta.source.spec == "tiny:bert" and meta.task == "classify"
            and set(meta.measured.latency) == {"b1xs16", "b2xs32"})
    r = subprocess.run([sys.executable, "-m", "millis.cli", "info", str(classify_artifact)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"(format v1, millis {meta.millis_version})" in r.stdout
    assert f"source     tiny:bert (bert, sha256 {meta.source.sha256[:12]})" in r.stdout
    assert f"variant    {meta.variant.name}: {meta.variant.runtime} {meta.variant.precision}" in r.stdout
    for shape, s in meta.measured.latency.items():
        assert f"{shape:>10}  p50 {s.p50_ms:.2f} ms  p99 {s.p99_ms:.2f} ms  ({s.n} calls)" in r.stdout
    from millis.common.hardware import cpu_family_model

    # the CPU family / model tells a VM's "AMD EPYC" Zen 3 from Zen 4 (describe() had it; the artifact dropped it)
    assert meta.hardware.cpu_id == cpu_family_model()
    assert not meta.hardware.cpu_id or f"({meta.hardware.cpu_id})" in r.stdout
    r = subprocess.run([sys.executable, "-m", "millis.cli", "info", str(classify_artifact), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout) == meta.to_dict()


def test_an_edited_artifact_fails_with_a_message_not_a_traceback(classify_artifact, tmp_path):
    """A millis.json of another format is read as an artifact (it passed for a model directory: "no config.json"),
    and an artifact whose tokenizer went, with the list edited to match, is refused at load."""
    import shutil

    from millis.artifact.model import load, open_model

    other = tmp_path / "other"
    other.mkdir()
    (other / "millis.json").write_text(json.dumps({**V1_ARTIFACT, "format": "x"}))
    with pytest.raises(MillisError, match="is not a millis artifact description"):
        open_model(other)
    art = tmp_path / "art"
    shutil.copytree(classify_artifact, art)
    shutil.rmtree(art / "tokenizer")
    meta = json.loads((art / "millis.json").read_text())
    meta["files"] = {k: v for k, v in meta["files"].items() if not k.startswith("tokenizer/")}
    (art / "millis.json").write_text(json.dumps(meta))
    with pytest.raises(MillisError, match="lists no tokenizer files"):
        load(art)
