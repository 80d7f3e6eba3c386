"""The optimize review of 2026-12-06: a shipped fp32 fallback is said, batch-dependent variants are judged at one row a
call too, a budget finer than a row is flagged, flipped predictions are counted, the reports say what their figures
are (few calls, load %, validation accuracy, RSS, cold start), and two CLI messages say what is wrong."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from millis.common.config import Shape
from millis.common.errors import MillisError
from millis.common.readers import Labeled
from millis.encoder.source import resolve
from millis.encoder.text import TextEncoder
from millis.optimize.build.variants import REFERENCE, Variant
from millis.optimize.config import Budget, OptimizeConfig
from millis.optimize.judge import JudgeContext, judge, judge_reference
from millis.optimize.pipeline import optimize
from millis.optimize.report import accuracy_text
from millis.optimize import select as selection  # its new names read per test: each fails on its own before the fix
from millis.optimize.select import Candidate, select
from millis.optimize.svg import esc

N = 200  # one selection row = 0.5 accuracy point
LABELS = ("negative", "neutral", "positive")  # tiny:bert's id2label


class FakeRuntime:
    """Logits for a fixed prediction per text (rows recognised by their token ids): `alone` where a call holds one
    row, else `batched`. `shares_scales_across_rows` as ORT's dynamic int8 declares it."""

    def __init__(self, enc: TextEncoder, texts: list[str], batched: list[int], alone: list[int] | None = None,
                 shares: bool = False):
        ids, _ = enc.token_ids(texts)
        keys = [tuple(r) for r in ids]
        self.batched, self.alone = dict(zip(keys, batched)), dict(zip(keys, alone or batched))
        self.name, self.input_names, self.output_name = "fake", enc.input_names, "logits"
        self.shares_scales_across_rows = shares
        self.rows_per_call: list[int] = []

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["input_ids"])
        self.rows_per_call.append(n)
        preds = self.alone if n == 1 else self.batched
        out = np.zeros((n, len(LABELS)), np.float32)
        for i, (row, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"])):
            out[i, preds.get(tuple(row[mask == 1].tolist()), 0)] = 5.0
        return {"logits": out}


class FakeBuilder:
    def build(self, v):
        return Path(f"built/{v.name}"), {}


@pytest.fixture(scope="module")
def fakes(tiny_dirs):
    src = resolve("tiny:bert")
    enc = TextEncoder(src.path, src.input_names, 128)
    texts = [f"where is my card {i}" for i in range(N)]
    truth = [i % 3 for i in range(N)]
    data = Labeled(tuple(texts), tuple(LABELS[y] for y in truth), tuple(range(2, N + 2)), "fake.csv", "text", "label")

    def wrong_on(rows) -> list[int]:
        return [(y + 1) % 3 if i in rows else y for i, y in enumerate(truth)]

    runtimes = {
        REFERENCE: FakeRuntime(enc, texts, wrong_on(range(20))),                           # 90 %
        # dynamic int8: as the reference in batches, 10% more rows wrong when a row runs alone
        "shared": FakeRuntime(enc, texts, wrong_on(range(20)), wrong_on(set(range(20)) | set(range(20, N, 10))),
                              shares=True),
        "plain": FakeRuntime(enc, texts, wrong_on(range(20))),
        "swapped": FakeRuntime(enc, texts, wrong_on(range(20, 40))),  # 90 % too: other 20 rows wrong
    }
    return src, enc, data, runtimes


def judged(fakes, max_drop: float = 1.0) -> dict:
    src, enc, data, runtimes = fakes
    ctx = JudgeContext("classify", Budget(max_drop=max_drop), 1, src, enc, list(data.texts[:40]),
                       enc.encode(["refund?"]).feeds, data, open=lambda v, vdir: runtimes[v.name])
    _, ref = judge_reference(ctx, FakeBuilder())
    return {n: judge(Variant(n, "onnxruntime", "int8", ("export",)), ctx, ref, FakeBuilder()).result
            for n in runtimes if n != REFERENCE}


def test_a_batch_dependent_variant_is_judged_at_one_row_a_call_too(fakes):
    """Within budget in calls of 32 rows, 10 points worse one row a call (as a server runs a one-text request): the
    worse verdict is kept, and the batchings are recorded. A variant whose rows are independent pays no extra pass."""
    for f in fakes[3].values():
        f.rows_per_call.clear()
    res = judged(fakes)
    shared = res["shared"]
    assert not shared.ok and shared.reason == "accuracy drop 9.00 pt exceeds --max-drop 1.0"
    assert shared.accuracy["accuracy"] == pytest.approx(0.81)
    assert shared.batching == {"shares_scales_across_rows": True, "fidelity_rows_per_call": [8, 1],
                               "accuracy_rows_per_call": [32, 1], "accuracy_at": {"32": 0.9, "1": pytest.approx(0.81)}}
    assert shared.fidelity["top1_agreement"] == pytest.approx(38 / 40)  # rows 20, 30 of the 40 flip alone: the worse
    plain = res["plain"]
    assert plain.ok and plain.batching == {"shares_scales_across_rows": False, "fidelity_rows_per_call": [8],
                                           "accuracy_rows_per_call": [32], "accuracy_at": {"32": 0.9}}
    assert plain.fidelity["top1_agreement"] == 1.0
    assert fakes[3]["plain"].rows_per_call.count(1) <= 2  # its cold-start call only: no one-row pass
    assert fakes[3]["shared"].rows_per_call.count(1) >= N + 40


def test_flipped_predictions_are_counted_beside_the_drop(fakes):
    """The same accuracy on other rows: a drop of 0.00 pt, yet 40 of 200 predictions differ from fp32's."""
    swapped = judged(fakes)["swapped"]
    assert swapped.ok and swapped.accuracy["drop_pts"] == pytest.approx(0.0)
    assert swapped.flipped == {"rows": 40, "share": pytest.approx(0.2)}
    assert accuracy_text(vars(swapped)) == "90.00% (+0.00 pt; 40 flipped, 20.00%)"


def test_a_budget_finer_than_one_row_is_flagged():
    finer = selection.finer_than_a_row
    assert finer(0.5, 100) == ("--max-drop 0.5 is finer than one selection row (1.00 pt each of 100 rows): it lets "
                               "no row go wrong (more labelled rows, or a budget of whole rows, say what you mean)")
    assert finer(1.0, 100) == finer(0.5, 1000) == finer(0.0, 20) == ""


def test_the_reference_shipping_for_want_of_a_variant_is_said():
    rows = [{"name": REFERENCE, "ok": True, "reason": "reference"},
            {"name": "ort-int8-dynamic-pc", "ok": False, "reason": "cosine min 0.99812 < 0.99999"},
            {"name": "ov-int8", "ok": False, "reason": "build or run failed", "error": "RuntimeError: no openvino"}]
    assert selection.reference_fallback(rows, REFERENCE) == (
        "no optimized variant met the budget (ort-int8-dynamic-pc: cosine min 0.99812 < 0.99999; ov-int8: "
        "RuntimeError: no openvino); shipping the fp32 reference torch-fp32")
    rows[1]["ok"] = True  # one met it, and the reference was merely faster: nothing to warn of
    assert selection.reference_fallback(rows, REFERENCE) == ""
    assert selection.reference_fallback(rows, "ort-int8-dynamic-pc") == ""


def test_the_no_variant_error_names_max_drop_when_selecting_on_accuracy():
    cands = [Candidate(REFERENCE, 10.0, False, "nan outputs"), Candidate("ort-int8", 5.0, False, "drop")]
    with pytest.raises(MillisError, match=r"^no variant meets the accuracy budget \(not even the reference\); check "
                                          r"the model and the --max-drop value$"):
        select(cands, budget_flags=selection.ACCURACY_FLAGS)
    with pytest.raises(MillisError, match=r"fidelity budget .* the --min-cosine / --max-logit-diff values$"):
        select(cands)


def test_the_load_warning_and_the_report_say_the_same_share():
    """report.md said "other processes used 70%" and then "Warning: other processes used 69%": one rounded value."""
    from millis.common import machine_load
    from millis.optimize.report import load_lines

    before = {"wall": 0.0, "busy": 0.0, "steal": 0.0, "total": 10.0, "own": 0.0, "workers": {}, "cpus": 1}
    after = dict(before, wall=10.0, busy=6.949, total=20.0)  # other processes: 69.49% of one CPU
    load = machine_load.check(before, after, {})
    said = " ".join(load_lines(SimpleNamespace(**load)))
    assert load["other_share"] == 0.695  # what millis.json keeps, and both sentences read
    assert "other processes used 70% of the CPUs, the hypervisor" in said
    assert "**Warning: other processes used 70% of the CPUs while millis measured" in said


def test_data_naming_a_directory_says_so(tmp_path):
    """It said "data file not found: DIR" of a directory that is there."""
    given = tmp_path / "rows"
    given.mkdir()
    out = str(tmp_path / "a")
    with pytest.raises(MillisError, match=rf"^--data {given}: is a directory; name a file in it \(CSV, TSV or JSONL\)$"):
        optimize(OptimizeConfig(source="tiny:bert", task="classify", data=str(given), out=out))
    with pytest.raises(MillisError, match=rf"^--sample-texts {given}: is a directory; .*, or text lines\)$"):
        optimize(OptimizeConfig(source="tiny:bert", sample_texts=str(given), out=out))


def test_embedding_a_classifier_notes_the_unused_head(tmp_path, tiny_dirs):
    msgs: list[str] = []
    with pytest.raises(MillisError, match="unknown variant"):  # stops before any build; the note came first
        optimize(OptimizeConfig(source="tiny:bert", task="embed", out=str(tmp_path / "a"), variants=("nope",)),
                 msgs.append)
    assert msgs == ["note: tiny:bert is a classifier (3 labels); --task embed pools its encoder's outputs and leaves "
                    "the classification head unused (--task classify keeps it)"]


@pytest.mark.slow
def test_a_run_where_only_the_reference_passes_says_so_everywhere(tmp_path, tiny_dirs, quick_measure):
    """`--min-cosine` above 1: only fp32 qualifies. It shipped with "fastest within the fidelity budget" and no word."""
    msgs: list[str] = []
    out = optimize(OptimizeConfig(source="tiny:bert", task="embed", out=str(tmp_path / "a"), target=Shape(1, 16),
                                  variants=("ort-int8-dynamic",), budget=Budget(min_cosine=1.5), recover=False,
                                  measure=replace(quick_measure, threads=1, serve_mix=0)), msgs.append)
    rep = json.loads((out / "report.json").read_text())
    why = next(r["reason"] for r in rep["variants"] if r["name"] == "ort-int8-dynamic")
    said = f"no optimized variant met the budget (ort-int8-dynamic: {why}); shipping the fp32 reference torch-fp32"
    assert why.startswith("cosine min ") and why.endswith(" < 1.5")
    assert rep["chosen"] == REFERENCE and rep["fallback"] == said
    assert f"warning: {said}" in msgs
    assert f"**Warning: {said}.**" in (out / "report.md").read_text()
    assert f"<strong>Warning: {esc(said)}.</strong>" in (out / "report.html").read_text()


@pytest.mark.slow
def test_a_run_on_labelled_rows_reports_what_its_figures_are(tmp_path, trained_classifier, quick_measure):
    """20 validation rows (5 pt each) and --max-drop 0.5; ort-int8-dynamic shares its activation scales."""
    from test_report_html import md_rows, parse

    msgs: list[str] = []
    out = optimize(OptimizeConfig(source=str(trained_classifier), task="classify", out=str(tmp_path / "v"),
                                  target=Shape(1, 16), variants=("ort-int8-dynamic",), recover=False,
                                  measure=replace(quick_measure, threads=1, serve_mix=0, footprint=True)), msgs.append)
    coarse = selection.finer_than_a_row(0.5, 20)
    assert coarse.startswith("--max-drop 0.5 is finer than one selection row (5.00 pt each of 20 rows)")
    assert f"warning: {coarse}" in msgs
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    rep = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in rep["variants"]}
    assert f"**Warning: {coarse}.**" in md and f"Warning: {coarse}." in html
    int8 = rows["ort-int8-dynamic"]
    assert set(int8["flipped"]) == {"rows", "share"} and int8["flipped"]["share"] == int8["flipped"]["rows"] / 20
    assert int8["batching"]["accuracy_rows_per_call"] == [32, 1]
    assert set(int8["batching"]["accuracy_at"]) == {"32", "1"}
    assert rows[REFERENCE]["batching"]["accuracy_rows_per_call"] == [32] and rows[REFERENCE]["flipped"] == {}
    batching = ("Batching: fidelity in calls of 8 rows, accuracy in calls of 32 rows sorted by length. ort-int8-dynamic: "
                "one activation scale per call (dynamic int8), so a row's outputs depend on its batch-mates; judged at "
                "one row a call too, the worse kept (accuracy ort-int8-dynamic ")
    for text in (md, html):
        assert "accuracy = validation (selection) accuracy on the labelled rows selection chose on" in text
        assert "run `millis eval ARTIFACT --data TEST` on rows selection never saw" in text
        assert "cold start = load + first call at the target shape, runtime already imported" in text
        assert "4 timed calls per cell (under 100: the p99 is near the slowest call)" in text
        assert batching in text.replace("&#x27;", "'")
    assert "accuracy on every row of the labelled data" not in md
    assert parse(html).rows == md_rows(md)
    # RSS: each variant's own, in a fresh process; it read ~0 for the first variant of each runtime
    assert all(r["rss_mb"] is not None and r["rss_mb"] > 1.0 for r in rows.values()), \
        {n: r["rss_mb"] for n, r in rows.items()}
