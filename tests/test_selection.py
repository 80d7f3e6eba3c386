"""Selection on accuracy: fake runtimes with set predictions go through `judge`, then select.
Selection on serving: a runtime that stalls on new shapes is never chosen."""
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from millis.optimize.config import Budget, MeasureConfig, OptimizeConfig
from millis.common.config import Shape
from millis.common.errors import MillisError
from millis.optimize.judge import JudgeContext, judge, judge_reference
from millis.common.readers import Labeled
from millis.optimize.measure import serve_mix, serve_mix_shapes
from millis.optimize.pipeline import optimize
from millis.optimize.select import Candidate, accuracy_gate, select, serve_gate
from millis.encoder.source import resolve
from millis.encoder.text import TextEncoder
from millis.optimize.build.variants import REFERENCE, Variant

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
        return Path(f"built/{v.name}"), {}


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
    """(reference, {name: judged}) for the reference and every fake, opened by name."""
    src, enc, data, fakes = setup
    ctx = JudgeContext("classify", Budget(max_drop=max_drop), 1, src, enc, list(data.texts[:40]),
                       enc.encode(["refund?"]).feeds, data if with_data else None, open=lambda v, vdir: fakes[v.name])
    reference, ref = judge_reference(ctx, FakeBuilder())
    judged = {REFERENCE: reference}
    for n in fakes:
        if n != REFERENCE:
            judged[n] = judge(Variant(n, "onnxruntime", "int8", ("export",)), ctx, ref, FakeBuilder())
            assert not judged[n].result.error, judged[n].result.error
            assert judged[n].dir == Path(f"built/{n}") and judged[n].runtime is fakes[n]  # typed, not in facts
    return ref, {n: j.result for n, j in judged.items()}


LATENCY = {REFERENCE: 10.0, "same": 8.0, "at-budget": 5.0, "over": 2.0}


def _chosen(results) -> str:
    return select([Candidate(r.name, LATENCY[r.name], r.ok, r.reason) for r in results.values()]).name


def test_accuracy_through_judge(setup):
    ref, results = _judge(setup, max_drop=0.5)
    assert ref.accuracy == pytest.approx(0.9) and ref.outputs.shape == (40, len(LABELS))
    acc = {n: r.accuracy for n, r in results.items()}
    assert acc[REFERENCE]["accuracy"] == pytest.approx(0.9) and acc[REFERENCE]["n"] == N
    assert acc[REFERENCE]["drop_pts"] == 0.0
    assert acc["at-budget"]["accuracy"] == pytest.approx(0.895) and acc["at-budget"]["n"] == N
    assert acc["over"]["drop_pts"] == pytest.approx(0.6) and acc["same"]["drop_pts"] == pytest.approx(0.0)
    assert all(f.calls > 0 for f in setup[3].values())
    assert all("dir" not in r.facts for r in results.values())


def test_faster_variant_only_within_max_drop(setup):
    _, results = _judge(setup, max_drop=0.5)
    ok = {n: r.ok for n, r in results.items()}
    assert ok == {REFERENCE: True, "same": True, "at-budget": True, "over": False}  # exactly 0.5 counts as within
    assert "exceeds --max-drop 0.5" in results["over"].reason
    assert "within" in results["at-budget"].reason
    assert _chosen(results) == "at-budget"  # the fastest, "over", is 0.6 pt worse: rejected
    _, tighter = _judge(setup, max_drop=0.4)
    assert not tighter["at-budget"].ok and _chosen(tighter) == "same"
    _, looser = _judge(setup, max_drop=0.6)
    assert _chosen(looser) == "over"


def test_without_data_the_gate_is_fidelity(setup):
    ref, results = _judge(setup, max_drop=0.5, with_data=False)
    assert ref.accuracy is None and results["over"].accuracy == {}
    # the first 40 texts are predicted alike by every fake: identical logits pass the fidelity budget
    assert all(r.ok for r in results.values())
    assert results["over"].reason == "within budget"


def test_a_variant_that_fails_to_build_comes_back_with_its_error(setup):
    src, enc, data, fakes = setup

    class Broken(FakeBuilder):
        def build(self, v):
            raise RuntimeError("no such runtime")

    ctx = JudgeContext("classify", Budget(), 1, src, enc, list(data.texts[:40]),
                       enc.encode(["refund?"]).feeds, data, open=lambda v, vdir: fakes[v.name])
    _, ref = judge_reference(ctx, FakeBuilder())
    j = judge(Variant("same", "onnxruntime", "int8", ("export",)), ctx, ref, Broken())
    assert j.runtime is None and j.dir is None and not j.result.ok
    assert j.result.error == "RuntimeError: no such runtime" and j.result.reason == "build or run failed"
    with pytest.raises(RuntimeError, match="no such runtime"):  # the reference failing ends the run
        judge_reference(ctx, Broken())


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


# ---- the serve mix: shapes a server forms, new to every variant -----------------------------------

STALL_S = 0.3  # what the stalling runtime sleeps on a shape it has not run: a per-shape compile


class StallsOnNewShapes:
    """Wraps a runtime: sleeps on the first call at each (B, T), and answers a batch it has already
    run from memory, so it is the fastest variant wherever shapes repeat (the measured ones)."""

    def __init__(self, rt):
        self.rt, self.name, self.input_names, self.output_name = rt, rt.name, rt.input_names, rt.output_name
        self.shapes: set[tuple[int, int]] = set()
        self.memo: dict[bytes, dict[str, np.ndarray]] = {}

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shape = batch["input_ids"].shape
        if shape not in self.shapes:
            self.shapes.add(shape)
            time.sleep(STALL_S)
        key = b"".join(np.ascontiguousarray(batch[n]).tobytes() for n in ("input_ids", "attention_mask")) + bytes(shape)
        if key not in self.memo:
            self.memo[key] = self.rt.run(batch)
        return self.memo[key]


class Steady:
    name, input_names, output_name = "steady", ("input_ids", "attention_mask"), "embedding"

    def __init__(self, seconds_per_row: float = 0.0):
        self.seconds_per_row = seconds_per_row

    def run(self, batch):
        time.sleep(self.seconds_per_row * len(batch["input_ids"]))
        return {"embedding": np.zeros((len(batch["input_ids"]), 4), np.float32)}


def test_serve_mix_shapes_follow_the_texts_and_are_seeded():
    cfg = MeasureConfig()
    measured = (Shape(1, 16), Shape(1, 128), Shape(8, 128))
    counts = [9] * 80 + [20] * 15 + [60] * 5  # tokens per text: buckets 16, 32 and 64
    shapes = serve_mix_shapes(cfg, counts, 128, exclude=measured)
    assert shapes == serve_mix_shapes(cfg, counts, 128, exclude=measured)  # a fixed sequence
    assert len(set(shapes)) == cfg.serve_mix and not set(shapes) & set(measured)
    assert {s.seq for s in shapes} <= {16, 32, 64} and sum(s.seq == 16 for s in shapes) >= cfg.serve_mix // 2
    assert all(1 <= s.batch <= cfg.serve_max_batch and s.batch * s.seq <= cfg.serve_max_tokens for s in shapes)
    batches = sorted(s.batch for s in shapes)
    assert batches[0] <= 4 and batches[-1] >= 16  # from a few rows to full batches
    assert serve_mix_shapes(replace(cfg, serve_mix=0), counts, 128) == []
    assert {s.seq for s in serve_mix_shapes(cfg, [300] * 10, 40)} == {40}  # the bucket stops at the max length


def test_select_breaks_near_ties_on_the_serve_mix():
    cands = [Candidate("fused", 10.0, True, serve_rows_per_s=190.0),
             Candidate("int8-attention", 10.3, True, serve_rows_per_s=230.0),  # 3% slower at the target
             Candidate("int8-pc", 5.0, False, "cosine min 0.96 < 0.99", serve_rows_per_s=300.0),
             Candidate("slow", 12.0, True, serve_rows_per_s=400.0)]          # 20% slower: no tie
    assert select(cands).name == "int8-attention"
    assert select(cands, near_tie=0.0).name == "fused"
    assert select([Candidate("a", 4.0, True), Candidate("b", 4.1, True)]).name == "a"  # unmeasured: the faster


def test_serve_gate_rejects_a_runtime_that_stalls_on_new_shapes():
    cfg = MeasureConfig()
    shapes = [Shape(1, 16), Shape(3, 32), Shape(7, 16), Shape(2, 48)]
    inputs = {s: {"input_ids": np.ones((s.batch, s.seq), np.int64),
                  "attention_mask": np.ones((s.batch, s.seq), np.int64)} for s in shapes}
    stalls = StallsOnNewShapes(Steady())
    stalls.name = "stalls"
    mix = serve_mix({"steady": Steady(), "stalls": stalls, "slow": Steady(0.01)}, inputs, cfg)
    assert [s["shape"] for s in mix["stalls"]["stalls"]] and len(mix["stalls"]["stalls"]) == len(shapes)
    assert mix["stalls"]["worst_ms"] >= 1e3 * STALL_S and not mix["steady"]["stalls"] and not mix["slow"]["stalls"]
    why = serve_gate(mix, cfg.serve_floor, cfg.stall_share)
    assert set(why) == {"stalls", "slow"}
    assert why["stalls"].startswith(f"serve mix: stalls on {len(shapes)} of {len(shapes)} new shapes")
    assert "the floor is 0.5x" in why["slow"]
    # one slow first call among many shapes is noise, not a stall
    one = dict(mix["steady"], stalls=mix["stalls"]["stalls"][:1])
    assert serve_gate({"steady": one}, cfg.serve_floor, cfg.stall_share) == {}


def _optimize_with_a_stalling_variant(tmp_path, quick_measure, monkeypatch, serve_mix_shapes_n: int):
    import millis.optimize.judge

    real_open = millis.optimize.judge.open_runtime

    def open_runtime(kind, model_dir, name, *args, **kwargs):
        rt = real_open(kind, model_dir, name, *args, **kwargs)
        return StallsOnNewShapes(rt) if name == "ort-fp32-fused" else rt

    monkeypatch.setattr(millis.optimize.judge, "open_runtime", open_runtime)
    cfg = OptimizeConfig(source="tiny:bert", task="embed", out=str(tmp_path / f"mix{serve_mix_shapes_n}"),
                         variants=("ort-fp32-fused", "ort-int8-dynamic"), target=Shape(1, 16),
                         measure=replace(quick_measure, serve_mix=serve_mix_shapes_n, threads=1))
    out = optimize(cfg)
    return json.loads((out / "report.json").read_text()), json.loads((out / "millis.json").read_text())


def test_optimize_never_chooses_a_variant_that_stalls(tmp_path, tiny_dirs, quick_measure, monkeypatch):
    # without the serve mix the stalling variant wins: it answers the measured shapes from memory
    report, _ = _optimize_with_a_stalling_variant(tmp_path, quick_measure, monkeypatch, 0)
    assert report["chosen"] == "ort-fp32-fused"
    report, meta = _optimize_with_a_stalling_variant(tmp_path, quick_measure, monkeypatch, 6)
    assert report["chosen"] != "ort-fp32-fused"
    rows = {r["name"]: r for r in report["variants"]}
    fused = rows["ort-fp32-fused"]
    assert not fused["ok"] and "within budget; rejected: serve mix: stalls on" in fused["reason"]
    assert len(fused["serve_mix"]["stalls"]) == 6 and fused["serve_mix"]["worst_ms"] >= 1e3 * STALL_S
    chosen = rows[report["chosen"]]
    assert chosen["ok"] and not chosen["serve_mix"]["stalls"]
    assert meta["measured"]["serve_mix"]["rows_per_s"] == chosen["serve_mix"]["rows_per_s"]


def test_speedups_are_paired_by_round_and_a_busy_machine_is_flagged():
    """A ratio comes from interleaved rounds (a slow round slows both sides of its pair); the measurement
    warns when other processes took the CPUs, the hypervisor stole time, or rounds disagree."""
    from millis.common import machine_load
    from millis.optimize.measure import paired_ratio, stats

    ref, fast = [10.0, 20.0, 10.0], [2.0, 4.0, 2.0]  # round 2 twice as slow for both: still 5x every round
    assert paired_ratio(ref, fast) == (5.0, 5.0, 5.0)
    assert paired_ratio([], fast) is None
    s = stats([1.0, 1.0, 2.0], 1, [1.0, 1.5])
    assert s["round_p50_ms"] == [1.0, 1.5] and s["spread"] == 0.5
    quiet = {"wall": 0.0, "busy": 0.0, "steal": 0.0, "total": 0.0, "own": 0.0}
    busy = {"wall": 1.0, "busy": 2.0 * len(machine_load.masked_cpus()), "steal": 0.2, "total": 2.0, "own": 0.1}
    got = machine_load.check(quiet, busy, {"a b1xs16": 0.1, "b b1xs16": 0.6})
    assert got["other_share"] > 0.9 and got["steal_share"] == 0.1 and got["max_spread"] == 0.6
    assert len(got["warnings"]) == 3 and "b b1xs16" in got["warnings"][2]
    calm = machine_load.check(quiet, {**quiet, "wall": 1.0, "total": 2.0, "busy": 0.1, "own": 0.1}, {"a": 0.05})
    assert calm["warnings"] == []
    assert isinstance(machine_load.snapshot()["busy"], float)


def test_a_benchmarks_own_workers_are_not_other_processes():
    """A worker process that times on the measurement's behalf (bench/cpu_encoders.py's peers) counts as its own
    CPU time when its pid is given, and as another process's when not."""
    import subprocess
    import sys

    from millis.common import machine_load

    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.4: pass\ntime.sleep(30)"])
    try:
        before, bare = machine_load.snapshot([child.pid]), machine_load.snapshot()
        deadline = time.monotonic() + 20
        while machine_load.process_cpu(child.pid) < 0.4 and time.monotonic() < deadline:
            time.sleep(0.05)
        after, bare_after = machine_load.snapshot([child.pid]), machine_load.snapshot()
        assert machine_load.own_used(before, after) >= 0.3  # the worker's busy loop
        assert machine_load.own_used(bare, bare_after) < 0.3  # this process alone idled meanwhile
    finally:
        child.kill()
        child.wait()
    assert machine_load.process_cpu(child.pid) == 0.0  # gone: nothing to read


def test_a_slow_cell_still_gets_three_calls_a_round():
    """A variant over its time cap (max_seconds_per_cell) is cut to fewer calls, but to three a round: its round
    medians, which the interleaved ratios are built from, were one call each after the first round."""
    from millis.optimize.measure import measure

    class Slow:
        name, input_names, output_name = "slow", ("input_ids",), "out"
        calls = 0

        def run(self, feeds):
            Slow.calls += 1
            time.sleep(0.004)
            return {"out": np.zeros((1, 1), np.float32)}

    cfg = MeasureConfig(shapes=(Shape(1, 16),), warmup=0, iters=40, rounds=4, max_seconds_per_cell=0.02)
    measure({"slow": Slow()}, {Shape(1, 16): {"input_ids": np.zeros((1, 16), np.int64)}}, cfg)
    assert Slow.calls == 4 * 3  # the cap cuts each round to 3 calls, no fewer
    for iters, want in ((9, 9), (5, 5), (10, 10)):  # --iters over 5 rounds: the remainder in the first rounds
        Slow.calls = 0
        stats = measure({"slow": Slow()}, {Shape(1, 16): {"input_ids": np.zeros((1, 16), np.int64)}},
                        MeasureConfig(shapes=(Shape(1, 16),), warmup=0, iters=iters, rounds=5))
        assert Slow.calls == want == stats["slow"]["b1xs16"]["n"], (iters, Slow.calls)


class NaNRuntime(FakeRuntime):
    """`base`'s logits, NaN on the rows of `texts` (an fp16 overflow, say)."""

    def __init__(self, base: FakeRuntime, enc: TextEncoder, texts: list[str]):
        self.__dict__.update(base.__dict__)
        self.nan_ids = {tuple(r) for r in enc.token_ids(texts)[0]}

    def run(self, batch):
        out = super().run(batch)["logits"]
        for i, (row, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"])):
            if tuple(row[mask == 1].tolist()) in self.nan_ids:
                out[i] = np.nan
        return {"logits": out}


def test_nan_or_inf_outputs_never_pass_a_gate(setup):
    """NaN compares false, so `cos_min < budget` and `dlogit > budget` let a NaN variant through, and argmax of a
    NaN row is 0: a variant with NaN rows counted as within budget. Now any such row fails it, with or without
    labels, whether the NaN is on the fidelity texts or only on the selection data; the figures stay numbers."""
    from millis.optimize.fidelity import compare, within

    src, enc, data, fakes = setup
    ref = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    for task in ("embed", "classify"):
        for bad in (np.nan, np.inf):
            out = ref.copy()
            out[2, 3] = bad
            fid = compare(task, ref, out)
            assert fid["nonfinite_rows"] == 1 and all(np.isfinite(v) for v in fid.values()), fid
            assert within(task, fid, Budget(max_logit_diff=1e9, min_cosine=-1.0, min_top1_agreement=0.0)) == \
                (False, "1 output rows hold NaN or Inf")
            json.dumps(fid, allow_nan=False)  # millis.json stays JSON
    for where in (data.texts[3:4], data.texts[500:501]):  # a fidelity text; a selection row only
        for with_data in (True, False):
            ctx = JudgeContext("classify", Budget(max_drop=5.0, max_logit_diff=1e9, min_top1_agreement=0.0), 1, src,
                               enc, list(data.texts[:40]), enc.encode(["refund?"]).feeds, data if with_data else None,
                               open=lambda v, vdir: NaNRuntime(fakes["same"], enc, list(where))
                               if v.name == "nan" else fakes[v.name])
            _, reference = judge_reference(ctx, FakeBuilder())
            r = judge(Variant("nan", "onnxruntime", "int8", ("export",)), ctx, reference, FakeBuilder()).result
            if where[0] == data.texts[500] and not with_data:
                assert r.ok  # never ran on that text: nothing to see
            else:
                assert not r.ok and "NaN" in r.reason, (where, with_data, r.reason)
    ctx = JudgeContext("classify", Budget(), 1, src, enc, list(data.texts[:40]), enc.encode(["refund?"]).feeds, data,
                       open=lambda v, vdir: NaNRuntime(fakes[REFERENCE], enc, [data.texts[7]]))
    with pytest.raises(MillisError, match="reference itself gives NaN"):
        judge_reference(ctx, FakeBuilder())


def test_an_embedding_of_another_length_fails_the_gate():
    """The cosine alone passed a variant that dropped, doubled or rescaled its normalisation."""
    from millis.optimize.fidelity import compare, within

    ref = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32)
    assert within("embed", compare("embed", ref, ref * 1.02), Budget()) == (True, "within budget")
    ok, why = within("embed", compare("embed", ref, ref * 2.0), Budget())
    assert not ok and "lengths off by up to 100.0%" in why
    unit = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    assert not within("embed", compare("embed", ref, unit), Budget())[0]  # normalised where the model is not


def test_a_reranker_is_judged_by_its_ranking():
    """A one-logit cross-encoder's argmax over its one label always agrees: the rerank gate reads the documents'
    order by query instead (groups of RERANK_DOCS rows), by the score /v1/rerank returns."""
    from millis.optimize.fidelity import compare, within
    from millis.optimize.judge import RERANK_DOCS

    rng = np.random.default_rng(3)
    ref = rng.normal(size=(4 * RERANK_DOCS, 1)) * 3
    fid = compare("classify", ref, ref + 0.01, RERANK_DOCS)
    assert fid["top1_agreement"] == fid["order_agreement"] == 1.0 and within("classify", fid, Budget())[0]
    swapped = ref.copy()
    g = ref[:RERANK_DOCS, 0]
    best, second = np.argsort(-g)[:2]
    swapped[[best, second]] = swapped[[second, best]]  # the first query's two best documents change places
    fid = compare("classify", ref, swapped, RERANK_DOCS)
    assert fid["top1_agreement"] == 0.75 and fid["order_agreement"] < 1.0
    ok, why = within("classify", fid, Budget(max_logit_diff=1e9))
    assert not ok and "top-1 agreement 0.750" in why
    assert compare("classify", ref, swapped)["top1_agreement"] == 1.0  # per row, one label: blind to the swap
    tie = np.array([[5.0], [4.99], [-1.0], [-2.0], [-3.0]] * 4)  # sigmoids 0.99331 / 0.99325: within RANK_TIE
    near = tie.copy()
    near[[0, 1]] = near[[1, 0]]
    assert compare("classify", tie, near, RERANK_DOCS)["top1_agreement"] == 1.0  # a tie swapped keeps the ranking
    two = np.concatenate([np.zeros_like(ref), ref], 1)  # a two-label head: the last label's probability ranks
    assert compare("classify", two, two[::-1].copy(), RERANK_DOCS)["order_agreement"] < 1.0
    # every query's top document kept, the others reversed: the order gate refuses it (top-1 alone passed it)
    apart = np.array([[4.0], [2.0], [1.0], [0.0], [-1.0]] * 4)
    tail = apart.copy()
    for q in range(4):
        tail[q * RERANK_DOCS + 1:(q + 1) * RERANK_DOCS] = apart[q * RERANK_DOCS + 1:(q + 1) * RERANK_DOCS][::-1]
    fid = compare("classify", apart, tail, RERANK_DOCS)
    assert fid["top1_agreement"] == 1.0 and fid["order_agreement"] == 0.4, fid
    ok, why = within("classify", fid, Budget(max_logit_diff=1e9))
    assert not ok and why == "order agreement 0.400 < 0.95", why
    assert within("classify", fid, Budget(max_logit_diff=1e9, min_order_agreement=0.4))[0]
    assert "order_agreement" not in compare("classify", apart, tail)  # a classifier's rows: no order gate


def test_the_fidelity_gate_reads_short_forms_of_its_texts():
    """A word or two of every eighth fidelity text (no text twice, none already there): the short queries where
    row-scaled int7 loses most are judged too."""
    from millis.optimize.judge import SHORT_EVERY, short_forms

    texts = ["where is my card", "hi", "card", "where is", *["filler text here"] * (SHORT_EVERY - 4), "lost card now"]
    assert short_forms(texts) == ["where", "lost", "lost card"]  # "where is" is a text already; "hi" has no form
    assert short_forms([]) == []


def test_the_first_variant_of_a_runtime_is_opened_once_untimed(setup, monkeypatch):
    """Its imports and one-off setup were its cold start and its RSS (torch-fp32: 1.8 s and 140 MB of transformers'
    code, 0.02 s and 0.5 MB when opened again): each runtime kind is opened once before any of its variants is
    timed."""
    import millis.optimize.judge as judge_module

    src, enc, data, fakes = setup
    monkeypatch.setattr(judge_module, "WARMED", set())
    opened = []

    def opener(v, vdir):
        opened.append(v.name)
        return fakes[v.name]
    ctx = JudgeContext("classify", Budget(max_drop=1.0), 1, src, enc, list(data.texts[:40]),
                       enc.encode(["refund?"]).feeds, data, open=opener)
    _, ref = judge_reference(ctx, FakeBuilder())
    for n in ("same", "over"):
        judge(Variant(n, "onnxruntime", "int8", ("export",)), ctx, ref, FakeBuilder())
    assert opened == [REFERENCE, REFERENCE, "same", "same", "over"], opened  # torch once more; onnxruntime once more


def test_when_the_serve_mix_rejects_every_variant_the_error_says_so():
    """The reference always meets the fidelity budget: the error blamed --min-cosine / --max-logit-diff."""
    stalls = "serve mix: stalls on 2 of 3 new shapes (b4xs64: first call 900 ms, then 2.0 ms)"
    with pytest.raises(MillisError, match=r"^every variant was rejected on the serve mix .*: torch-fp32: serve mix"):
        select([Candidate(REFERENCE, 10.0, False, stalls), Candidate("ort-int8", 5.0, False, stalls)])
    with pytest.raises(MillisError, match="no variant meets the fidelity budget"):
        select([Candidate(REFERENCE, 10.0, False, "nan outputs"), Candidate("ort-int8", 5.0, False, stalls)])
