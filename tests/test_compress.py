"""Distillation, structural pruning and `optimize --compress` on a tiny trained teacher.

The teacher is tiny:bert (2 layers, 4 heads, FFN 64) fine-tuned on the two-topic file.
"""
import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from millis.common.errors import MillisError
from millis.encoder.source import resolve
from millis.artifact.meta import read_train_meta

from conftest import train_one_thread

ONE_THREAD = {"threads": 1, "lr": 3e-3, "batch_size": 16, "patience": 10}


@pytest.fixture(scope="module")
def student(tmp_path_factory, trained_classifier, topics_data):
    from millis.train.distill import distill, distill_config

    events = []
    cfg = distill_config(str(trained_classifier), str(topics_data["train"]),
                         out=str(tmp_path_factory.mktemp("distill") / "s"), train={**ONE_THREAD, "epochs": 3},
                         layers=1)
    out = distill(cfg, lambda e, f: events.append((e, f)))
    return out, events


def _logits(model_dir, texts):
    from millis.encoder.tasks import load_task_model
    from millis.encoder.text import TextEncoder

    src = resolve(str(model_dir))
    enc = TextEncoder(src.path, src.input_names, 64)
    feeds = enc.encode(texts).feeds
    with torch.inference_mode():
        return load_task_model(src, "classify")(*(torch.from_numpy(feeds[n]) for n in src.input_names)).numpy()


def test_distilled_student_has_the_asked_layers_loads_and_learns(student, trained_classifier, topics_data):
    out, events = student
    src = resolve(str(out))
    assert src.num_layers == 1 and src.has_classifier and src.id2label == {0: "bank", 1: "market"}
    meta = read_train_meta(out)
    d = meta.distill
    assert d.student_layers == 1 and d.teacher.layers == 2 and d.layer_map == (1,)
    assert d.parameters["student"] < d.parameters["teacher"]
    hist = meta.history
    assert len(hist) == 3 and hist[-1].train_loss < hist[0].train_loss  # the distillation loss falls
    steps = [f["loss"] for e, f in events if e == "step"]
    assert np.mean(steps[-3:]) < np.mean(steps[:3])
    y = _logits(out, ["card transfer pin today", "stock yields profit again"])
    assert y.shape == (2, 2) and np.isfinite(y).all()
    from millis.evaluate.run import EvalConfig, evaluate
    assert evaluate(EvalConfig(model=str(out), data=str(topics_data["test"])))["accuracy"] >= 0.9


def test_student_layers_default_and_map():
    from millis.train.distill import student_layers

    assert student_layers(6, 3) == [1, 3, 5] and student_layers(6, 0) == [1, 3, 5]
    assert student_layers(12, 4) == [2, 5, 8, 11]
    assert student_layers(6, 2, (0, 5)) == [0, 5]
    with pytest.raises(MillisError, match="fewer layers than the teacher"):
        student_layers(2, 2)
    with pytest.raises(MillisError, match="fewer layers than the teacher"):
        student_layers(2, 5)
    with pytest.raises(MillisError, match="--layer-map"):
        student_layers(6, 0, (1, 9))
    with pytest.raises(MillisError, match="--layer-map names 2"):
        student_layers(6, 3, (1, 2))
    with pytest.raises(MillisError, match="fewer layers than the teacher's 2; --layer-map names 2"):
        student_layers(2, 0, (0, 1))  # the teacher's every layer: no student
    # a ModernBERT student keeps layer 0 (hf.cut_layers refuses another first layer)
    assert student_layers(4, 0, from_first=True) == [0, 3] and student_layers(22, 11, from_first=True)[0] == 0
    assert student_layers(22, 4, from_first=True) == [0, 7, 14, 21] and student_layers(6, 1, from_first=True) == [0]


def test_distill_bad_arguments(tmp_path, trained_classifier, topics_data):
    from millis.train.distill import distill, distill_config

    def run(**kw):
        return distill(distill_config(str(trained_classifier), str(topics_data["train"]), preset="quick",
                                      out=str(tmp_path / "x"), train={"threads": 1}, **kw))
    with pytest.raises(MillisError, match="fewer layers than the teacher's 2"):
        run(layers=3)
    with pytest.raises(MillisError, match="another tokenizer"):
        run(student="builtin:minilm")
    with pytest.raises(MillisError, match="--temperature"):
        run(temperature=0.0)
    with pytest.raises(MillisError, match="no sequence-classification head"):
        distill(distill_config("builtin:minilm", str(topics_data["train"]), out=str(tmp_path / "y"), task="classify"))
    assert not (tmp_path / "x").exists()


def test_distill_embedder_matches_teacher_vectors(tmp_path, tiny_dirs):
    from millis.train.distill import distill, distill_config
    from millis.common.samples import sample_texts

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(sample_texts() * 3))
    out = distill(distill_config("tiny:bert", str(texts), out=str(tmp_path / "emb"), train={**ONE_THREAD, "epochs": 2},
                                 layers=1, task="embed"))
    meta = read_train_meta(out)
    assert meta.distill.task == "embed" and 0.5 < meta.val_cosine <= 1.0 and meta.val_accuracy is None
    src = resolve(str(out))
    assert src.num_layers == 1 and src.pooling.normalize  # the sentence-transformers folder came along


def test_distill_embedder_validates_on_the_validation_file_given(tmp_path, tiny_dirs):
    from millis.train.distill import distill, distill_config
    from millis.common.samples import sample_texts

    pool = list(dict.fromkeys(sample_texts()))
    texts, val = tmp_path / "texts.txt", tmp_path / "val.txt"
    texts.write_text("\n".join(pool * 2))
    val.write_text("\n".join(pool[:5] + ["a text the training file does not hold"]))
    events = []
    out = distill(distill_config("tiny:bert", str(texts), out=str(tmp_path / "emb"),
                                 train={**ONE_THREAD, "epochs": 1, "validation": str(val)}, layers=1, task="embed"),
                  lambda e, f: events.append((e, f)))
    meta = read_train_meta(out)
    start = next(f for e, f in events if e == "start")
    assert meta.data.validation == str(val) and start["val_rows"] == 6  # was 10% of the training texts
    assert start["rows"] == len(pool) - 5  # a validation text never trains
    with pytest.raises(MillisError, match="0 training and"):
        distill(distill_config("tiny:bert", str(texts), out=str(tmp_path / "e2"),
                               train={**ONE_THREAD, "epochs": 1, "validation": str(texts)}, layers=1, task="embed"))


def test_a_file_of_validation_rows_only_is_a_clear_error(tmp_path, trained_classifier):
    from millis.artifact.validation import read_validation
    from millis.train.classify import train_config

    rows = read_validation(trained_classifier)
    data = tmp_path / "val_only.csv"
    data.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(rows.texts, rows.labels)))
    with pytest.raises(MillisError, match="no training rows are left: every row is a validation row"):
        train_one_thread(train_config(str(trained_classifier), str(data), out=str(tmp_path / "m"), epochs=1))


# --- pruning ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def planned(trained_classifier):
    from transformers import AutoModelForSequenceClassification

    from millis.train.loop import prepare
    from millis.train.prune import plan, prune_config
    from millis.encoder.hf import load_hf

    src = resolve(str(trained_classifier))
    cfg = prune_config(str(trained_classifier), read_train_meta(trained_classifier).data.path,
                       heads=0.5, ffn=0.25, layers=1, train={"threads": 1})
    model = load_hf(src.path, AutoModelForSequenceClassification).eval()
    td = prepare(cfg.train, src, classes=["bank", "market"])
    return model, td, plan(model, td, cfg, lambda e, f: None)


def test_pruned_model_is_smaller_and_equals_the_masked_model(planned):
    from millis.train.prune import apply, masks_of

    model, td, p = planned
    assert len(p.layers) == 1 and len(p.heads[0]) == 2 and len(p.ffn[0]) == 48
    x = td.tensors(td.va_ids[:16])
    with torch.inference_mode(), masks_of(model, p):
        masked = model(**x).logits
    cut = copy.deepcopy(model)
    apply(cut, p)
    layer = cut.bert.encoder.layer
    assert len(layer) == 1
    assert tuple(layer[0].attention.self.query.weight.shape) == (16, 32)   # 2 heads x 8, was 32 x 32
    assert tuple(layer[0].attention.output.dense.weight.shape) == (32, 16)
    assert tuple(layer[0].intermediate.dense.weight.shape) == (48, 32)     # FFN 64 -> 48
    with torch.inference_mode():
        out = cut(**x).logits
    torch.testing.assert_close(out, masked, rtol=0, atol=1e-5)
    with torch.inference_mode():  # and the masks did change something
        assert (model(**x).logits - masked).abs().max() > 1e-4


def test_head_importance_is_per_layer_normalised(planned):
    from millis.train.prune import importance

    model, td, _ = planned
    h, f = importance(model, td, rows=64)
    assert h.shape == (2, 4) and f.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(h, axis=1), 1.0, rtol=1e-5)


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, trained_classifier, topics_data):
    from millis.train.prune import prune, prune_config

    cfg = prune_config(str(trained_classifier), str(topics_data["train"]), out=str(tmp_path_factory.mktemp("p") / "m"),
                       heads=0.5, ffn=0.25, train={**ONE_THREAD, "lr": 1e-3, "epochs": 1})
    return prune(cfg)


def test_pruned_dir_reloads_and_exports_to_fused_onnx(pruned_dir, tmp_path, quick_measure):
    from millis.optimize.config import OptimizeConfig
    from millis.common.config import Shape
    from millis.optimize.pipeline import optimize

    cfg = json.loads((pruned_dir / "config.json").read_text())
    assert cfg["millis_pruned"] == {"attention_heads": 2, "head_dim": 8} and cfg["intermediate_size"] == 48
    meta = read_train_meta(pruned_dir)
    assert meta.prune.parameters["pruned"] < meta.prune.parameters["original"]
    assert (meta.prune.layers_kept == (0, 1) and meta.prune.ffn_kept == 48
            and [len(h) for h in meta.prune.heads_kept] == [2, 2])
    src = resolve(str(pruned_dir))
    assert src.num_heads == 2 and src.attention_size == 16 and src.hidden_size == 32
    art = optimize(OptimizeConfig(source=str(pruned_dir), task="classify", out=str(tmp_path / "art"),
                                  target=Shape(1, 16), variants=("ort-fp32-fused",), measure=quick_measure))
    rows = {r["name"]: r for r in json.loads((art / "report.json").read_text())["variants"]}
    fused = rows["ort-fp32-fused"]
    assert fused["ok"] and fused["facts"]["ops"].get("Attention") == 2, fused["facts"]["ops"]  # fused, 2 layers
    assert fused["fidelity"]["max_logit_diff"] < 1e-4
    from millis.artifact.model import load
    texts = ["card transfer pin today", "stock yields profit again"]
    np.testing.assert_allclose(load(art).run(texts).outputs, _logits(pruned_dir, texts), atol=1e-4)


@pytest.mark.parametrize("kw, match", [({"heads": 1.0}, "must be in"), ({"heads": -0.2}, "must be in"),
                                        ({"ffn": 1.5}, "must be in"), ({}, "nothing to prune"),
                                        ({"layers": -1}, ">= 0")])
def test_prune_bad_arguments(kw, match, trained_classifier, topics_data):
    from millis.train.prune import prune_config

    with pytest.raises(MillisError, match=match):
        prune_config(str(trained_classifier), str(topics_data["train"]), **kw)


def test_prune_refuses_what_it_cannot_do(tmp_path, trained_classifier, topics_data, tiny_dirs):
    from millis.train.prune import prune, prune_config

    with pytest.raises(MillisError, match="at least one must stay"):
        prune(prune_config(str(trained_classifier), str(topics_data["train"]), out=str(tmp_path / "a"), layers=2,
                           train={"threads": 1}))
    with pytest.raises(MillisError, match="no sequence-classification head"):
        prune(prune_config("builtin:minilm", str(topics_data["train"]), out=str(tmp_path / "b"), heads=0.5))
    with pytest.raises(MillisError, match="pruning supports"):
        prune(prune_config(str(tiny_dirs["distilbert"]), str(topics_data["train"]), out=str(tmp_path / "c"),
                           heads=0.5, train={"threads": 1}))


# --- optimize --compress ---------------------------------------------------------------------

@pytest.mark.slow
def test_optimize_compress_adds_students_and_reuses_them(tmp_path, trained_classifier, topics_data, quick_measure,
                                                         monkeypatch):
    """No --data: every variant, students included, is judged on the validation split the teacher kept,
    which the students also held out. Each student is either within the accuracy budget or rejected
    with the reason, and the shipped variant is the one the selection rule picks."""
    from millis.artifact.validation import read_validation
    from millis.optimize.compress import COMPRESS_VARIANTS
    from millis.optimize.config import OptimizeConfig
    from millis.common.config import Shape
    from millis.optimize.pipeline import optimize
    from millis.optimize.select import Candidate, select

    monkeypatch.setenv("MILLIS_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    msgs = []
    cfg = OptimizeConfig(source=str(trained_classifier), task="classify", out=str(tmp_path / "art"),
                         target=Shape(1, 16), variants=("ort-int8-dynamic",), measure=replace(quick_measure, threads=1),
                         compress="quick")
    art = optimize(cfg, msgs.append)
    report = json.loads((art / "report.json").read_text())
    rows = {r["name"]: r for r in report["variants"]}
    n_val = read_train_meta(trained_classifier).data.validation_rows
    ref_acc = report["measured"]["reference_accuracy"]
    assert n_val == 20 and rows["torch-fp32"]["accuracy"]["accuracy"] == ref_acc
    for v in COMPRESS_VARIANTS:
        r = rows[f"l-half+{v}"]
        assert not r["error"] and r["latency"], r
        assert r["recipe"]["compressed"]["layers"] == 1 and r["accuracy"]["n"] == n_val, r
        drop = 100 * (ref_acc - r["accuracy"]["accuracy"])
        assert r["accuracy"]["drop_pts"] == pytest.approx(drop)
        if drop <= cfg.budget.max_drop + 1e-9:  # within budget: selectable unless the serve mix rejected it
            assert r["ok"] or "rejected: serve mix" in r["reason"], r
        else:
            assert not r["ok"] and r["reason"].startswith(f"accuracy drop {drop:.2f} pt exceeds --max-drop"), r
    student = rows["l-half+ort-fp32-fused"]["recipe"]["compressed"]["model"]
    held, teacher_held = read_validation(student), read_validation(trained_classifier)
    assert sorted(zip(held.texts, held.labels)) == sorted(zip(teacher_held.texts, teacher_held.labels))
    assert any("compress l-half: epoch 1" in m for m in msgs)
    chosen = select([Candidate(r["name"], r["latency"]["b1xs16"]["p50_ms"], r["ok"], r["reason"],
                               (r["serve_mix"] or {}).get("rows_per_s", 0.0)) for r in rows.values() if r["latency"]])
    meta = json.loads((art / "millis.json").read_text())
    assert meta["variant"]["name"] == report["chosen"] == chosen.name
    assert bool(meta.get("compressed")) == chosen.name.startswith("l-half+")  # a student won iff the artifact says so
    from millis.artifact.model import load
    assert load(art).run(["card pin"]).outputs.shape == (1, 2)
    msgs.clear()
    optimize(replace(cfg, out=str(tmp_path / "art2")), msgs.append)
    assert not any("epoch" in m for m in msgs)  # the student came from the cache


def test_students_hold_out_the_teachers_validation_rows(tmp_path, student, trained_classifier, topics_data):
    import shutil

    from millis.artifact.validation import VALIDATION_FILE
    from millis.common.files import hash_files
    from millis.optimize.compress import check_same_holdout, teacher_split

    split = teacher_split(resolve(str(trained_classifier)), "")
    assert split == {"seed": 0, "val_fraction": 0.1, "validation": "", "limit": 0, "sample": 0}
    # --compress-data naming the teacher's own file (its sha256): the same split; another file: the students' own
    assert teacher_split(resolve(str(trained_classifier)), str(topics_data["train"])) == split
    assert teacher_split(resolve(str(trained_classifier)), str(topics_data["test"])) == {}
    check_same_holdout(trained_classifier, student[0])  # distilled with the same split: the same rows
    other = tmp_path / "other"
    shutil.copytree(student[0], other)
    rows = (other / VALIDATION_FILE).read_text().splitlines()
    (other / VALIDATION_FILE).write_text("\n".join(rows[1:]) + "\n")  # one held-out row less: it trained on it
    meta = json.loads((other / "millis.json").read_text())  # as its own millis.json says (else: not verified)
    meta["files"][VALIDATION_FILE] = hash_files([other / VALIDATION_FILE])
    (other / "millis.json").write_text(json.dumps(meta))
    with pytest.raises(MillisError, match="held out other validation rows than its teacher"):
        check_same_holdout(trained_classifier, other)


def fake_students(monkeypatch, teacher):
    """Replace the training of students: record what each would train on, and hand back the teacher."""
    from millis.optimize import compress

    trained, holdout_checked = [], []
    monkeypatch.setattr(compress, "cached", lambda kind, src, data, cfg, build, progress=None: trained.append(
        (data, cfg)) or teacher)
    monkeypatch.setattr(compress, "check_same_holdout", lambda t, s: holdout_checked.append(s))
    return trained, holdout_checked


def test_compress_data_that_is_the_teachers_file_keeps_the_teachers_split(tmp_path, trained_classifier, topics_data,
                                                                         monkeypatch):
    """--compress-data with the sha256 `millis train` recorded: the students hold out the teacher's rows,
    and that is checked."""
    import shutil

    from millis.optimize.compress import candidates

    copy = tmp_path / "elsewhere" / topics_data["train"].name
    copy.parent.mkdir()
    shutil.copy(topics_data["train"], copy)
    trained, holdout_checked = fake_students(monkeypatch, trained_classifier)
    out = candidates(resolve(str(trained_classifier)), "classify", "quick", str(copy), "text", lambda m: None)
    assert [r.name for r, _ in out] == ["l-half"] and trained[0][0] == str(copy)
    assert holdout_checked == [trained_classifier]


def test_students_never_train_on_the_rows_selection_judges(tmp_path, trained_classifier, topics_data, monkeypatch):
    """--compress-data another file: its rows that are selection rows (text and label) are dropped, said so."""
    from millis.artifact.validation import read_validation
    from millis.common.readers import read_labeled
    from millis.optimize.compress import candidates

    selection = read_validation(trained_classifier)
    other = tmp_path / "more.csv"  # the teacher's rows under another name: another file, selection rows and all
    other.write_text(topics_data["train"].read_text() + "card pin today,market\n")
    assert ("card pin today", "market") not in set(zip(selection.texts, selection.labels))
    trained, holdout_checked = fake_students(monkeypatch, trained_classifier)
    msgs = []
    candidates(resolve(str(trained_classifier)), "classify", "quick", str(other), "text", msgs.append, selection)
    used = read_labeled(trained[0][0], "text", trained[0][1].train.label_col)
    judged = set(zip(selection.texts, selection.labels))
    assert not judged & set(zip(used.texts, used.labels)) and ("card pin today", "market") in set(zip(used.texts,
                                                                                                      used.labels))
    dropped = 201 - len(used)
    assert dropped >= len(judged) and any(m.startswith(f"compress: dropped {dropped} of the 201 rows of {other}")
                                          for m in msgs)
    assert holdout_checked == []  # their own split: not the teacher's


def test_a_cached_student_that_fails_verification_is_rebuilt(tmp_path, monkeypatch, trained_classifier):
    from millis.artifact import store
    from millis.artifact.meta import TrainMeta
    from millis.optimize.compress import cached
    from millis.train.distill import distill_config

    from test_artifact_meta import V1_TRAIN

    monkeypatch.setenv("MILLIS_CACHE", str(tmp_path / "cache"))
    builds, msgs = [], []

    def build(cfg):
        builds.append(cfg.train.out)

        def fill(d):
            (d / "validation.jsonl").write_text('{"text": "card", "label": "bank"}\n')
            return TrainMeta.from_dict(V1_TRAIN, "a test record")
        return store.write(cfg.train.out, fill)

    teacher, cfg = resolve(str(trained_classifier)), distill_config("t", str(trained_classifier / "validation.jsonl"))
    out = cached("distill", teacher, cfg.train.data, cfg, build, msgs.append)
    assert cached("distill", teacher, cfg.train.data, cfg, build, msgs.append) == out and len(builds) == 1  # reused
    (out / "validation.jsonl").write_text('{"text": "card", "label": "market"}\n')  # edited after training
    assert cached("distill", teacher, cfg.train.data, cfg, build, msgs.append) == out and len(builds) == 2
    assert msgs == [f"compress: rebuilding the cached student: model directory {out} is corrupted: validation.jsonl "
                    f"does not match its recorded sha256"]
    assert "bank" in (out / "validation.jsonl").read_text()


def test_compress_needs_training_data(tmp_path, topics_data, tiny_dirs):
    from millis.optimize.compress import training_data

    src = resolve("tiny:bert")
    with pytest.raises(MillisError, match="--compress-data"):
        training_data(src, "classify", "", "text")
    assert training_data(src, "embed", str(topics_data["train"]), "text") == (str(topics_data["train"]), "text", "")


def test_cuda_encoder_refuses_pruned_heads():
    from millis.gpu.encoder import EncoderConfig

    cfg = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 64, "vocab_size": 100, "millis_pruned": {"attention_heads": 2, "head_dim": 8}}
    with pytest.raises(MillisError, match="pruned attention heads"):
        EncoderConfig.from_hf(cfg)


def test_cli_distill_and_prune(tmp_path, trained_classifier, topics_data, capsys):
    from millis.cli.main import main

    common = ["--data", str(topics_data["train"]), "--preset", "quick", "--threads", "1"]
    assert main(["distill", str(trained_classifier), *common, "--layers", "1", "--out", str(tmp_path / "s")]) == 0
    assert "1 layers" in capsys.readouterr().out and resolve(str(tmp_path / "s")).num_layers == 1
    assert main(["prune", str(tmp_path / "s"), *common, "--ffn", "0.5", "--out", str(tmp_path / "p")]) == 0
    assert "before recovery" in capsys.readouterr().out
    assert json.loads((tmp_path / "p" / "config.json").read_text())["intermediate_size"] == 32
    assert main(["prune", str(trained_classifier), *common, "--heads", "1.5", "--out", str(tmp_path / "x")]) == 2
    assert "(0, 1)" in capsys.readouterr().err
    assert main(["distill", str(trained_classifier), *common, "--layer-map", "a,b", "--out", str(tmp_path / "y")]) == 2
