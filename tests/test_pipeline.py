"""optimize end to end on tiny models; artifacts reload, verify and match the reference."""
import json
from dataclasses import replace

import numpy as np
import pytest

import millis
from millis.optimize.config import OptimizeConfig, optimize_config_from_dict
from millis.common.config import Shape
from millis.optimize.pipeline import optimize
from millis.common.samples import sample_texts
from millis.artifact.model import open_model

from conftest import reference_outputs, sure, tolerance


def test_classify_artifact_contents(classify_artifact):
    meta = json.loads((classify_artifact / "millis.json").read_text())
    assert meta["format"] == "millis-artifact" and meta["version"] == 1
    assert meta["task"] == "classify"
    assert set(meta["files"]) >= {"tokenizer/tokenizer.json", "report.md", "report.json", "latency.png"}
    assert meta["source"]["sha256"] and meta["hardware"]["cores"] >= 1
    assert set(meta["measured"]["latency"]) == {"b1xs16", "b2xs32"}
    report = json.loads((classify_artifact / "report.json").read_text())
    names = [r["name"] for r in report["variants"]]
    assert names == ["torch-fp32", "ort-fp32-fused", "ort-int8-dynamic"]
    # the shipped variant is exactly the one the selection rule picks from the measured figures
    assert meta["variant"]["name"] == report["chosen"] == _rechoose(report, "b1xs16")
    assert next(r for r in report["variants"] if r["name"] == report["chosen"])["ok"]
    assert all("dir" not in r["facts"] for r in report["variants"])  # no temp paths in the report
    assert all(r["latency"]["b1xs16"]["n"] >= 3 for r in report["variants"])
    # the recipe in millis.json rebuilds the same config
    assert optimize_config_from_dict(meta["config"]).variants == ("ort-fp32-fused", "ort-int8-dynamic")
    assert (classify_artifact / "latency.png").read_bytes()[:4] == b"\x89PNG"


def _rechoose(report: dict, target: str) -> str:
    from millis.optimize.select import Candidate, select

    return select([Candidate(r["name"], r["latency"][target]["p50_ms"], r["ok"], r["reason"],
                             (r["serve_mix"] or {}).get("rows_per_s", 0.0))
                   for r in report["variants"] if r["latency"]]).name


def test_the_artifact_holds_the_variant_choose_returns(tmp_path, tiny_dirs, quick_measure):
    """`choose` pinned to int8: the artifact's files are int8's own build (its directory travelled from the
    judged variant to the writer), whatever the timings."""
    import onnx

    offered = []

    def int8(cands):
        offered.append([c.name for c in cands])
        return next(c for c in cands if c.name == "ort-int8-dynamic")

    out = optimize(OptimizeConfig(source="tiny:bert", task="classify", out=str(tmp_path / "a"), target=Shape(1, 16),
                                  variants=("ort-fp32-fused", "ort-int8-dynamic"),
                                  measure=replace(quick_measure, threads=1, serve_mix=0)), choose=int8)
    assert offered == [["torch-fp32", "ort-fp32-fused", "ort-int8-dynamic"]]
    meta = json.loads((out / "millis.json").read_text())
    assert meta["variant"]["name"] == "ort-int8-dynamic" and meta["variant"]["passes"][-1].startswith("int8")
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "MatMulIntegerToFloat"}, ops
    assert not (out / "hf").exists()
    texts = sample_texts()[:8]
    ref = reference_outputs(tiny_dirs["bert"], "classify", texts)
    logits = np.array([p["logits"] for p in millis.load(out).predict(texts)])
    np.testing.assert_allclose(logits, ref, atol=tolerance(ref, "int8"))  # int8: 5% of the logits' range


def test_optimize_selects_on_the_validation_split_train_kept(tmp_path, trained_classifier, topics_data, quick_measure):
    """A model from `millis train` and no --data: accuracy is judged on the rows training held out (the
    test file stays for `millis eval`); the artifact and report say which rows."""

    from millis.artifact.meta import read_train_meta
    from millis.artifact.validation import VALIDATION_FILE

    from millis.optimize.config import Budget

    msgs = []
    out = optimize(OptimizeConfig(source=str(trained_classifier), task="classify", out=str(tmp_path / "v"),
                                  target=Shape(1, 16), variants=("ort-int8-dynamic",), budget=Budget(max_logit_diff=0.01),
                                  measure=replace(quick_measure, threads=1, serve_mix=0)), msgs.append)
    assert "warning: --max-logit-diff is not read when selecting on labelled rows (--max-drop is the gate)" in msgs
    tmeta = read_train_meta(trained_classifier)
    kept = str(trained_classifier / VALIDATION_FILE)
    meta = json.loads((out / "millis.json").read_text())
    assert meta["config"]["data"] == kept  # the recorded config names the rows selection used
    sel = meta["measured"]["selection_data"]
    assert sel.startswith(f"{kept}: the validation split") and sel.endswith(f"{tmeta.data.path}, 20 rows")
    assert any(m == f"selecting on accuracy on {sel}" for m in msgs)
    report = json.loads((out / "report.json").read_text())
    assert [r["accuracy"]["n"] for r in report["variants"]] == [20, 20] == [tmeta.data.validation_rows] * 2
    # fp32 on those rows is what training's best epoch scored on them
    assert meta["measured"]["reference_accuracy"] == pytest.approx(tmeta.val_accuracy)
    assert kept in (out / "report.md").read_text()
    assert meta["variant"]["name"] == report["chosen"] == _rechoose(report, "b1xs16")


def test_selection_data_is_the_users_file_or_nothing(trained_classifier, topics_data, tiny_dirs):
    from millis.encoder.source import resolve
    from millis.optimize.pipeline import selection_data

    src = resolve(str(trained_classifier))
    data, where = selection_data(OptimizeConfig(source=str(trained_classifier), task="classify",
                                                data=str(topics_data["test"])), src)
    assert len(data) == 60 and where == f"{topics_data['test']} (--data), 60 rows"  # the user's choice stands
    assert selection_data(OptimizeConfig(source="tiny:bert", task="classify"), resolve("tiny:bert")) == (None, "")
    assert selection_data(OptimizeConfig(source=str(trained_classifier), task="embed"), src) == (None, "")


def test_an_edited_validation_split_is_refused(tmp_path, trained_classifier):
    """validation.jsonl is hashed into millis.json: an edit (here: a label flipped) would change what selection
    judges on, silently; it fails, naming the file."""
    import shutil

    from millis.artifact.validation import VALIDATION_FILE
    from millis.encoder.source import resolve
    from millis.optimize.pipeline import selection_data

    model = tmp_path / "m"
    shutil.copytree(trained_classifier, model)
    kept = model / VALIDATION_FILE
    kept.write_text(kept.read_text().replace('"label": "bank"', '"label": "market"', 1))
    with pytest.raises(millis.MillisError, match=rf"model directory {model} is corrupted: {VALIDATION_FILE} does not "
                                                 rf"match its recorded sha256"):
        selection_data(OptimizeConfig(source=str(model), task="classify"), resolve(str(model)))


def test_selection_on_a_validation_file_says_so_and_is_recorded(tmp_path, topics_data, tiny_dirs):
    """A model trained with --validation FILE: selection names that file (not "held out of" the training file),
    and the artifact records the sha256 of every file whose rows chose it."""
    from conftest import train_one_thread
    from millis.artifact.validation import VALIDATION_FILE
    from millis.common.files import file_sha256
    from millis.encoder.source import resolve
    from millis.optimize.pipeline import selection_data, selection_sha256
    from millis.train.classify import train_config

    model = train_one_thread(train_config("tiny:bert", str(topics_data["train"]), out=str(tmp_path / "m"), epochs=1,
                                          validation=str(topics_data["test"]), limit=48))
    src = resolve(str(model))
    data, where = selection_data(OptimizeConfig(source=str(model), task="classify"), src)
    assert where == (f"{model / VALIDATION_FILE}: the validation rows `millis train` read from {topics_data['test']}, "
                     f"60 rows")
    cfg = OptimizeConfig(source=str(model), task="classify")
    assert selection_sha256(cfg, data, src) == (file_sha256(model / VALIDATION_FILE), file_sha256(topics_data["test"]))
    # every file whose rows chose or fitted the shipped variant: the fidelity texts' and the calibration texts' too
    texts, calib = tmp_path / "texts.txt", tmp_path / "calib.txt"
    texts.write_text("a text\n")
    calib.write_text("another text\n")
    got = selection_sha256(replace(cfg, sample_texts=str(texts), calibration_texts=str(calib)), None, src)
    assert set(got) == {file_sha256(f) for f in (texts, calib, model / VALIDATION_FILE, topics_data["test"])}


def test_calibration_never_sees_the_selection_rows(tmp_path, trained_classifier, topics_data, quick_measure,
                                                   monkeypatch):
    """Static int8 calibration and the sensitivity ranking default to rows selection does not judge on: the
    teacher's training rows less its validation rows (and less --data's rows), else the shipped texts."""
    from millis.artifact.validation import read_validation
    from millis.common.readers import read_labeled
    from millis.encoder.source import resolve
    from millis.optimize import pipeline
    from millis.optimize.recover import Recovery

    calibrated, ranked = [], []
    batches = pipeline.calibration_batches
    monkeypatch.setattr(pipeline, "calibration_batches", lambda enc, texts, length, **kw: calibrated.append(texts)
                        or batches(enc, texts, length, **kw))
    monkeypatch.setattr(pipeline, "recover", lambda judged, judge, rank, texts, progress: ranked.append(texts) or
                        Recovery({"needed": False, "why": "test", "attempts": []}))
    optimize(OptimizeConfig(source=str(trained_classifier), task="classify", out=str(tmp_path / "a"),
                            target=Shape(1, 16), variants=("ort-int8-static",),
                            measure=replace(quick_measure, threads=1, serve_mix=0)))
    judged = set(read_validation(trained_classifier).texts)
    assert len(calibrated) == 1 and len(ranked) == 1 and calibrated[0] and ranked[0] == calibrated[0]
    assert not judged & set(calibrated[0]) and set(calibrated[0]) <= set(read_labeled(topics_data["train"]).texts)
    src = resolve(str(trained_classifier))
    test = read_labeled(topics_data["test"])
    texts, _ = pipeline.calibration_rows(OptimizeConfig(source=str(trained_classifier), task="classify",
                                                        data=str(topics_data["test"])), src, test)
    assert texts and not (judged | set(test.texts)) & set(texts)
    shipped = tmp_path / "d.csv"  # no training file: the shipped texts, less the selection rows
    shipped.write_text("text,label\n" + "".join(f'"{t}",x\n' for t in sample_texts()[:5] if '"' not in t))
    rows = read_labeled(shipped)
    texts, where = pipeline.calibration_rows(OptimizeConfig(source="tiny:bert", task="classify", data=str(shipped)),
                                             resolve("tiny:bert"), rows)
    assert where == "the texts shipped with millis" and texts and not set(rows.texts) & set(texts)
    # --calibration-texts: less the rows selection judges (it fitted static int8 on the very validation rows)
    kept = trained_classifier / "validation.jsonl"
    cfg = OptimizeConfig(source=str(trained_classifier), task="classify", calibration_texts=str(kept))
    with pytest.raises(millis.MillisError, match="every text is one selection judges"):
        pipeline.calibration_rows(cfg, src, read_validation(trained_classifier))
    mixed = tmp_path / "calib.txt"
    mixed.write_text("\n".join(sorted(judged)[:3] + ["a text nobody judges"]) + "\n")
    texts, where = pipeline.calibration_rows(replace(cfg, calibration_texts=str(mixed)), src,
                                             read_validation(trained_classifier))
    assert texts == ["a text nobody judges"] and where == f"{mixed} (less 3 texts selection judges)"
    # an embedder with no data: fidelity on every other shipped text, calibration on the rest (they judged each
    # other's variants: calibration fitted on the very texts the fidelity gate read)
    calibrated.clear()
    optimize(OptimizeConfig(source="tiny:bert", task="embed", out=str(tmp_path / "e"), target=Shape(1, 16),
                            variants=("ort-int8-static",), measure=replace(quick_measure, threads=1, serve_mix=0)))
    meta = json.loads((tmp_path / "e" / "millis.json").read_text())
    assert meta["measured"]["fidelity_texts"].startswith(f"{len(sample_texts()[::2])} texts from the texts shipped")
    assert "short forms of them (their first word or two)" in meta["measured"]["fidelity_texts"]
    assert calibrated and not set(calibrated[-1]) & {t.strip() for t in sample_texts()[::2]}


def test_loaded_artifact_matches_reference(classify_artifact, tiny_dirs):
    m = millis.load(classify_artifact)
    texts = sample_texts()[:16]
    ref = reference_outputs(tiny_dirs["bert"], "classify", texts)
    preds = m.predict(texts)
    logits = np.array([p["logits"] for p in preds])
    atol = tolerance(ref, m.meta.variant.precision, labels=True)  # fp32-fused or int8, as selection chose
    np.testing.assert_allclose(logits, ref, atol=atol)
    keep = sure(ref, atol)  # int8 may flip a near-tie: the labels of the texts it cannot
    assert [p["label"] for p, k in zip(preds, keep) if k] == [m.id2label[int(i)] for i in ref.argmax(1)[keep]]
    assert all(abs(sum(p["probs"].values()) - 1) < 1e-5 for p in preds)


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta", "mpnet", "modernbert"])
def test_embed_pipeline_other_families(tmp_path, tiny_dirs, quick_measure, family):
    out = optimize(OptimizeConfig(source=f"tiny:{family}", task="embed", out=str(tmp_path / family),
                                  variants=("ort-fp32-fused", "ov-int8"), target=Shape(1, 16), measure=quick_measure))
    m = millis.load(out)
    assert m.meta.id2label == {}  # an embedder's artifact, whatever head the source has
    texts = sample_texts()[:12]
    emb = m.embed(texts)
    ref = reference_outputs(tiny_dirs[family], "embed", texts)
    assert emb.shape == ref.shape
    assert (emb * ref).sum(1).min() > 0.98  # both are normalised


def test_a_roberta_reranker_calibrates_on_its_one_token_type(tmp_path, tiny_dirs, quick_measure):
    """RoBERTa has one token type: calibration's pair rows gave the document type 1 (the fidelity rows did not), and
    static int8 failed to build ("idx=1 must be within [-1,0]"); a --sample-texts file's column is --text-col's."""
    texts = tmp_path / "st.csv"
    texts.write_text("sentence,id\n" + "".join(f"{t.replace(',', ' ')},{i}\n" for i, t in enumerate(sample_texts()[:40])))
    out = optimize(OptimizeConfig(source="tiny:roberta-reranker", task="rerank", out=str(tmp_path / "rr"),
                                  target=Shape(1, 16),
                                  variants=("ort-int8-static",), sample_texts=str(texts), text_col="sentence",
                                  measure=replace(quick_measure, threads=1, serve_mix=0)))
    report = json.loads((out / "report.json").read_text())
    static = next(r for r in report["variants"] if r["name"] == "ort-int8-static")
    assert "Gather" not in str(static["reason"]) and static["latency"], static["reason"]


def test_a_variant_with_nan_outputs_is_rejected_and_the_report_still_written(tmp_path, monkeypatch, trained_classifier,
                                                                             topics_data, quick_measure):
    """A variant whose outputs are NaN on short rows (an fp16 overflow) gets no accuracy: the Pareto plot read its
    accuracy and the run died writing the report, after every measurement."""
    import millis.optimize.judge as judge

    real = judge.open_variant

    class NanOnShort:
        def __init__(self, rt):
            self.rt, self.name, self.input_names, self.output_name = rt, rt.name, rt.input_names, rt.output_name

        def run(self, feeds):
            y = self.rt.run(feeds)[self.output_name].copy()
            y[feeds["attention_mask"].sum(1) <= 4] = np.nan
            return {self.output_name: y}

    monkeypatch.setattr(judge, "open_variant", lambda task, threads, src, v, vdir, gpu_buckets=(): (
        NanOnShort if v.name == "ort-int8-dynamic" else (lambda rt: rt))(real(task, threads, src, v, vdir, gpu_buckets)))
    rows = tmp_path / "sel.csv"
    rows.write_text(topics_data["test"].read_text() + "card,bank\n")
    out = optimize(OptimizeConfig(source=str(trained_classifier), task="classify", out=str(tmp_path / "a"),
                                  target=Shape(1, 16), data=str(rows), variants=("ort-fp32-fused", "ort-int8-dynamic"),
                                  recover=False, measure=replace(quick_measure, threads=1, serve_mix=0)))
    report = json.loads((out / "report.json").read_text())
    assert report["chosen"] == "ort-fp32-fused" and (out / "pareto.png").is_file()


@pytest.mark.parametrize("where", ["timing", "serve mix"])
def test_a_variant_that_raises_while_timed_is_rejected_not_the_run(tmp_path, monkeypatch, tiny_dirs, quick_measure,
                                                                   where):
    """A runtime that raises at one shape (memory, a kernel refusing it) while measured or in the serve mix: that
    variant is rejected with the reason, the others measured, the artifact written (the run died with a traceback)."""
    import millis.optimize.judge as judge
    import millis.optimize.pipeline as pipeline

    real, armed = judge.open_variant, []
    stage = "measure" if where == "timing" else "serve_mix"
    inner = getattr(pipeline, stage)
    monkeypatch.setattr(pipeline, stage, lambda *a, **k: armed.append(1) or inner(*a, **k))

    class FailsWide:  # from the stage on, at more than one row
        def __init__(self, rt):
            self.rt, self.name, self.input_names, self.output_name = rt, rt.name, rt.input_names, rt.output_name

        def run(self, feeds):
            if armed and feeds["input_ids"].shape[0] > 1:
                raise RuntimeError("out of memory")
            return self.rt.run(feeds)

    monkeypatch.setattr(judge, "open_variant", lambda task, threads, src, v, vdir, gpu_buckets=(): (
        FailsWide if v.name == "ort-int8-dynamic" else (lambda rt: rt))(real(task, threads, src, v, vdir, gpu_buckets)))
    shapes = (Shape(1, 16), Shape(2, 32)) if where == "timing" else (Shape(1, 16),)
    out = optimize(OptimizeConfig(source="tiny:bert", task="embed", out=str(tmp_path / "a"), target=Shape(1, 16),
                                  variants=("ort-fp32-fused", "ort-int8-dynamic"), recover=False,
                                  measure=replace(quick_measure, threads=1, shapes=shapes,
                                                  serve_mix=0 if where == "timing" else 6)))
    rows = {r["name"]: r for r in json.loads((out / "report.json").read_text())["variants"]}
    bad = rows["ort-int8-dynamic"]
    assert not bad["ok"] and "failed at b" in bad["reason"] and "RuntimeError: out of memory" in bad["reason"], bad
    assert rows["ort-fp32-fused"]["latency"] and json.loads((out / "millis.json").read_text())["variant"]["name"] != \
        "ort-int8-dynamic"


def test_selection_respects_the_budget(tmp_path, tiny_dirs, quick_measure):
    """An impossible budget leaves only the exact variants: int8 must not be chosen."""
    from millis.optimize.config import Budget

    out = optimize(OptimizeConfig(source="tiny:bert", task="classify", out=str(tmp_path / "a"),
                                  variants=("ort-int8-dynamic",), target=Shape(1, 16),
                                  # no serve mix: this is about the fidelity gate, and a loaded machine can
                                  # make torch's first call on a new shape look like a stall
                                  measure=replace(quick_measure, serve_mix=0),
                                  budget=Budget(max_logit_diff=1e-6)))
    meta = json.loads((out / "millis.json").read_text())
    assert meta["variant"]["name"] == "torch-fp32"
    report = json.loads((out / "report.json").read_text())
    int8 = next(r for r in report["variants"] if r["name"] == "ort-int8-dynamic")
    assert not int8["ok"] and "dlogit" in int8["reason"]
    # and the reference artifact reloads and serves
    ref = open_model("tiny:bert", task="classify").predict(["hello"])[0]
    got = millis.load(out).predict(["hello"])[0]
    assert got["label"] == ref["label"] and got["logits"] == pytest.approx(ref["logits"], abs=1e-5)


def test_shape_longer_than_model_is_rejected(tmp_path, tiny_dirs):
    from millis.optimize.config import MeasureConfig

    with pytest.raises(millis.MillisError, match="longer than the model's max length"):
        optimize(OptimizeConfig(source="tiny:bert", task="embed", out=str(tmp_path / "x"), target=Shape(1, 16),
                                measure=MeasureConfig(shapes=(Shape(1, 4096),))))


def test_reference_embed_artifact_keeps_pooling(tmp_path, tiny_dirs, quick_measure):
    """A budget no approximation can meet ships the torch reference; reloaded, it still pools and
    normalises as the sentence-transformers folder declares."""
    from millis.optimize.config import Budget

    out = optimize(OptimizeConfig(source="tiny:bert", task="embed", out=str(tmp_path / "ref"),
                                  variants=("ort-fp32-fused",), target=Shape(1, 16), measure=quick_measure,
                                  budget=Budget(min_cosine=1.01)))
    m = millis.load(out)
    assert m.variant == "torch-fp32"
    # quick_measure's footprint=False (--no-footprint): no RSS probe, no figure
    assert [r["rss_mb"] for r in json.loads((out / "report.json").read_text())["variants"]] == [None, None]
    texts = sample_texts()[:8]
    np.testing.assert_allclose(m.embed(texts), reference_outputs(tiny_dirs["bert"], "embed", texts), atol=1e-5)


def test_rerank_is_judged_on_query_document_pairs(tmp_path, tiny_dirs, quick_measure, monkeypatch):
    """--task rerank: built and shipped as a classifier, but every variant's fidelity is judged on (query,
    document) pairs encoded as the cross-encoder reads them (token types 1 on the document), not on
    single texts; run_pairs scores a pair as the HF tokenizer's pair encoding does."""
    from transformers import AutoTokenizer

    import millis.optimize.judge as judge_mod
    from millis.artifact.model import run_pairs
    from millis.optimize.pipeline import rerank_pairs

    texts = ["where is my card", "the weather is nice", "card delivery", "hello", "a b c"]
    pairs = rerank_pairs(texts)  # every fourth text a query, among itself, its first half and the 3 after it
    q, e = texts[0], texts[4]
    assert pairs == ((q, q), (q, "where is"), (q, texts[1]), (q, texts[2]), (q, texts[3]),
                     (e, e), (e, "a"), (e, texts[0]), (e, texts[1]), (e, texts[2]))
    seen = []

    def spy(rt, enc, ps, max_batch=32):
        seen.append((rt, enc, list(ps)))
        return run_pairs(rt, enc, ps, max_batch)

    monkeypatch.setattr(judge_mod, "run_pairs", spy)
    cfg = OptimizeConfig(source="tiny:bert-reranker", task="rerank", out=str(tmp_path / "r"), target=Shape(1, 16),
                         variants=("ort-fp32-fused", "ort-int8-dynamic"),
                         measure=replace(quick_measure, threads=1, serve_mix=0))
    assert cfg.model_task == "classify"
    out = optimize(cfg)
    meta = json.loads((out / "millis.json").read_text())
    assert meta["task"] == "classify" and meta["config"]["task"] == "rerank"
    n = len(sample_texts()[::2])  # every other shipped text judges; the rest calibrate
    n_pairs = len(rerank_pairs(sample_texts()[::2]))
    assert meta["measured"]["fidelity_texts"].startswith(f"{n_pairs} (query, document) pairs of {n} texts")
    # 3 variants judged on the pairs, the dynamic int8 one (its rows share activation scales) at one pair a call too
    assert len(seen) == 4 and all(ps == list(rerank_pairs(sample_texts()[::2])) for _, _, ps in seen)
    report = json.loads((out / "report.json").read_text())
    assert [v["name"] for v in report["variants"] if "order_agreement" in (v["fidelity"] or {})] == \
        ["torch-fp32", "ort-fp32-fused", "ort-int8-dynamic"]  # judged by query: the ranking's agreement
    # a pair is scored as the tokenizer's pair encoding: the runtime on HF's own batch gives the same logits
    rt, enc, _ = seen[0]
    tok = AutoTokenizer.from_pretrained(str(tiny_dirs["bert"]))
    q, d = ["where is my card?", "card"], ["I lost my card", "delivery of a new card takes a week"]
    hf = tok(q, d, padding=True, return_tensors="np")
    assert (hf["token_type_ids"] == 1).any()
    want = rt.run({k: hf[k].astype(np.int64) for k in rt.input_names})[rt.output_name]
    np.testing.assert_allclose(run_pairs(rt, enc, list(zip(q, d))).outputs, want, atol=1e-5)


def test_rerank_refuses_a_classifier_of_three_labels(tmp_path, tiny_dirs):
    """--task rerank on a classifier of three labels (tiny:bert's negative / neutral / positive): refused before any
    work, by name (it was built, judged by its last label's probability, and served as a reranker); the tiny
    reranker is the same model with one logit."""
    from transformers import AutoConfig

    with pytest.raises(millis.MillisError, match="--task rerank: tiny:bert is a classifier of 3 labels, not a cross"):
        optimize(OptimizeConfig(source="tiny:bert", task="rerank", out=str(tmp_path / "r"), target=Shape(1, 16)))
    assert not (tmp_path / "r").exists()
    one = AutoConfig.from_pretrained(open_model("tiny:bert-reranker", task="classify").meta.source.path)
    base = AutoConfig.from_pretrained(str(tiny_dirs["bert"]))
    assert one.num_labels == 1 and base.num_labels == 3 and one.hidden_size == base.hidden_size


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta"])
def test_pairs_on_a_one_token_type_model_score_as_hf(tiny_dirs, family):
    """RoBERTa and XLM-R embed one token type: a (query, document) pair goes in with every type 0, as HF runs it
    (its tokenizer may still mark the document 1: a type 1 was an index error, every rerank a 500), and a literal
    separator inside a text changes nothing about the types."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from millis.artifact.model import run_pairs

    m = open_model(f"tiny:{family}", task="classify")
    assert m.encoder.segments is False
    sep = AutoTokenizer.from_pretrained(str(tiny_dirs[family])).sep_token
    pairs = [("where is my card", "my card is lost"), (f"q {sep} x", f"the {sep} stock")]
    got = run_pairs(m.runtime, m.encoder, pairs).outputs
    hf = AutoModelForSequenceClassification.from_pretrained(str(tiny_dirs[family])).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_dirs[family]))
    with torch.no_grad():
        want = np.concatenate([hf(**{k: v for k, v in tok(q, d, return_tensors="pt").items()
                                     if k != "token_type_ids"}).logits.numpy() for q, d in pairs])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_reranker_calibrates_and_ranks_sensitivity_on_pairs():
    """--task rerank: static int8's calibration batches are (query, document) rows as the cross-encoder reads
    them ([CLS] q [SEP] d [SEP], token type 1 on d), not single texts; and the sensitivity ranking's outputs
    (judge.outputs_on) are the pairs' when the run judges pairs, the texts' otherwise."""
    from millis.encoder.source import resolve
    from millis.encoder.text import TextEncoder
    from millis.optimize import judge
    from millis.optimize.pipeline import calibration_batches

    src = resolve("tiny:bert")
    enc = TextEncoder(src.path, src.input_names, 32)
    texts = ["where is my card", "the weather is nice today", "card delivery", "hello"] * 3
    singles = calibration_batches(enc, texts, 32)
    pairs = calibration_batches(enc, texts, 32, pairs=True)
    assert len(pairs) == len(singles) == 2 and all(b["input_ids"].shape == (8, 32) for b in pairs)
    sep = enc.ids_of(["a"], special=True)[0][-1]
    for b in pairs:
        assert ((b["input_ids"] == sep).sum(1) == 2).all()  # two segments a row
        assert (b["token_type_ids"].max(1) == 1).all() and not (b["token_type_ids"] * (1 - b["attention_mask"])).any()
    assert all(((b["input_ids"] == sep).sum(1) == 1).all() and not b["token_type_ids"].any() for b in singles)
    want = [enc.pair_ids(q, [d])[0][0] for q, d in judge.rerank_pairs(texts)[:8]]
    assert [list(r[:m.sum()]) for r, m in zip(pairs[0]["input_ids"], pairs[0]["attention_mask"])] == want

    class Echo:  # a runtime whose output is each row's token count and its type-1 count
        input_names, output_name = src.input_names, "o"

        def run(self, feeds):
            return {"o": np.stack([feeds["attention_mask"].sum(1), feeds["token_type_ids"].sum(1)], 1)}

    class Ctx:
        enc, pairs = TextEncoder(src.path, src.input_names, 32), ()

    ctx = Ctx()
    assert not judge.outputs_on(Echo(), ctx, texts[:4])[:, 1].any()
    ctx.pairs = (("q", "d"),)
    assert (judge.outputs_on(Echo(), ctx, texts[:4])[:, 1] > 0).all()


def test_the_load_check_covers_the_serve_mix_too(tmp_path, monkeypatch, tiny_dirs, quick_measure):
    """The serve mix's rows/s break ties and gate variants: the load check's second reading came before it."""
    import millis.optimize.pipeline as pipeline

    calls = []
    snapshot, serve_mix = pipeline.machine_load.snapshot, pipeline._serve_mix
    monkeypatch.setattr(pipeline.machine_load, "snapshot", lambda *a: calls.append("snapshot") or snapshot(*a))
    monkeypatch.setattr(pipeline, "_serve_mix", lambda *a, **k: calls.append("serve mix") or serve_mix(*a, **k))
    optimize(OptimizeConfig(source="tiny:bert", task="embed", out=str(tmp_path / "a"), target=Shape(1, 16),
                            variants=("ort-fp32-fused",), recover=False,
                            measure=replace(quick_measure, threads=1, shapes=(Shape(1, 16),), serve_mix=4)))
    assert calls == ["snapshot", "serve mix", "snapshot"], calls


def test_the_report_says_how_many_calls_each_percentile_is_of(classify_artifact):
    md = (classify_artifact / "report.md").read_text()
    n = json.loads((classify_artifact / "millis.json").read_text())["measured"]["latency"]["b1xs16"]["n"]
    assert f"p50 / p99 latency in ms per shape ({n} timed calls per cell" in md
    assert "(under 100: the p99 is near the slowest call)" in md  # 4 calls a cell: its p99 is nearly the max
