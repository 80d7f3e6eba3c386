"""Selection on accuracy: fake runtimes with set predictions go through VariantEvaluator, then select."""
from pathlib import Path

import numpy as np
import pytest

from millis.config import Budget, OptimizeConfig
from millis.errors import MillisError
from millis.evaluator import VariantEvaluator
from millis.labeled import Labeled
from millis.select import Candidate, accuracy_gate, select
from millis.sources import resolve
from millis.text import TextEncoder
from millis.variants import CATALOG, REFERENCE, Variant

N = 1000  # one text = 0.1 accuracy point
LABELS = ("negative", "neutral", "positive")  # tiny:bert's id2label


class FakeRuntime:
    """Logits that encode a fixed prediction per text; rows are recognised by their token ids."""

    def __init__(self, name: str, enc: TextEncoder, preds: dict[str, int]):
        ids, _ = enc.token_ids(list(preds))
        self.by_ids = {tuple(r): p for r, p in zip(ids, preds.values())}
        self.name, self.input_names, self.output_name = name, enc.input_names, "logits"
        self.calls = 0

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        out = np.zeros((len(batch["input_ids"]), len(LABELS)), np.float32)
        for i, (row, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"])):
            out[i, self.by_ids.get(tuple(row[mask == 1].tolist()), 0)] = 5.0
        return {"logits": out}


class FakeBuilder:
    def build(self, v):
        return Path("."), {}


class FakeEvaluator(VariantEvaluator):
    """Opens the fake runtime named like the variant instead of a built file."""

    fakes: dict[str, FakeRuntime] = {}

    def open(self, v, vdir):
        return self.fakes[v.name]


@pytest.fixture(scope="module")
def setup(tiny_dirs):
    src = resolve("tiny:bert")
    enc = TextEncoder(src.path, src.input_names, 128)
    texts = [f"where is my card {i}" for i in range(N)]
    truth = [i % 3 for i in range(N)]
    data = Labeled(tuple(texts), tuple(LABELS[y] for y in truth), tuple(range(2, N + 2)), "fake.csv", "text", "label")

    def wrong_on(k: int) -> FakeRuntime:  # the last k texts predicted wrongly (shifted by one class)
        preds = {t: (y + 1) % 3 if i >= N - k else y for i, (t, y) in enumerate(zip(texts, truth))}
        return FakeRuntime("fake", enc, preds)

    fakes = {REFERENCE: wrong_on(100),      # 90.0 %
             "same": wrong_on(100),         # 90.0 %: 0.0 pt
             "at-budget": wrong_on(105),    # 89.5 %: exactly 0.5 pt
             "over": wrong_on(106)}         # 89.4 %: 0.6 pt
    return src, enc, data, fakes


def _judge(setup, max_drop: float, with_data: bool = True):
    src, enc, data, fakes = setup
    cfg = OptimizeConfig(source="tiny:bert", task="classify", budget=Budget(max_drop=max_drop))
    ev = FakeEvaluator(cfg, src, enc, FakeBuilder(), list(data.texts[:40]), enc.encode(["refund?"]).feeds,
                       data if with_data else None, lambda msg: None)
    ev.fakes = fakes
    variants = [CATALOG[REFERENCE]] + [Variant(n, "onnxruntime", "int8", ("export",)) for n in fakes if n != REFERENCE]
    for v in variants:
        r = ev.judge(v)
        assert not r.error, r.error
    return ev


LATENCY = {REFERENCE: 10.0, "same": 8.0, "at-budget": 5.0, "over": 2.0}


def _chosen(ev) -> str:
    return select([Candidate(r.name, LATENCY[r.name], r.ok, r.reason) for r in ev.results.values()]).name


def test_accuracy_through_the_evaluator(setup):
    ev = _judge(setup, max_drop=0.5)
    assert ev.ref_acc == pytest.approx(0.9)
    acc = {n: r.accuracy for n, r in ev.results.items()}
    assert acc["at-budget"]["accuracy"] == pytest.approx(0.895) and acc["at-budget"]["n"] == N
    assert acc["over"]["drop_pts"] == pytest.approx(0.6) and acc["same"]["drop_pts"] == pytest.approx(0.0)
    assert all(f.calls > 0 for f in setup[3].values())


def test_faster_variant_only_within_max_drop(setup):
    ev = _judge(setup, max_drop=0.5)
    ok = {n: r.ok for n, r in ev.results.items()}
    assert ok == {REFERENCE: True, "same": True, "at-budget": True, "over": False}  # exactly 0.5 counts as within
    assert "exceeds --max-drop 0.5" in ev.results["over"].reason
    assert "within" in ev.results["at-budget"].reason
    assert _chosen(ev) == "at-budget"  # the fastest, "over", is 0.6 pt worse: rejected
    tighter = _judge(setup, max_drop=0.4)
    assert not tighter.results["at-budget"].ok and _chosen(tighter) == "same"
    looser = _judge(setup, max_drop=0.6)
    assert _chosen(looser) == "over"


def test_without_data_the_gate_is_fidelity(setup):
    ev = _judge(setup, max_drop=0.5, with_data=False)
    assert ev.ref_acc is None and ev.results["over"].accuracy == {}
    # the first 40 texts are predicted alike by every fake: identical logits pass the fidelity budget
    assert all(r.ok for r in ev.results.values())
    assert ev.results["over"].reason == "within budget"


def test_accuracy_gate():
    assert accuracy_gate(0.9, 0.895, 0.5)[0]  # exactly at the budget
    ok, reason = accuracy_gate(0.9, 0.894, 0.5)
    assert not ok and reason == "accuracy drop 0.60 pt exceeds --max-drop 0.5"
    assert accuracy_gate(0.9, 0.95, 0.0)[0]  # better than the reference
    assert not accuracy_gate(0.9, 0.9, -1.0)[0]  # a negative budget demands an improvement


def test_select():
    cands = [Candidate("ref", 10.0, True), Candidate("a", 4.0, True), Candidate("b", 4.0, True),
             Candidate("c", 1.0, False, "accuracy drop 0.60 pt exceeds --max-drop 0.5")]
    assert select(cands).name == "a"  # fastest within budget; ties go to the earlier
    with pytest.raises(MillisError, match="no variant meets the"):
        select([Candidate("x", 1.0, False), Candidate("y", 2.0, False)])
