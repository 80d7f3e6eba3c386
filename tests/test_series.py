"""millis.serve.series against prometheus_client's own metrics: the same observations give the same exposition
text (names, types, help, labels, `le` bounds, cumulative counts, sums), and counts stay exact under threads."""
from __future__ import annotations

import threading

import numpy as np
import prometheus_client as pc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from millis.serve import series
from millis.serve.metrics import BATCH_BUCKETS, LATENCY_BUCKETS


def both(kind: str, *args, **kw):
    """(prometheus_client's metric, ours), each in its own registry, built with the same arguments."""
    ref_reg, our_reg = CollectorRegistry(auto_describe=True), CollectorRegistry(auto_describe=True)
    ref = getattr(pc, kind)(*args, registry=ref_reg, **kw)
    ours = getattr(series, kind)(*args, registry=our_reg, **kw)
    return (ref, ref_reg), (ours, our_reg)


def text(reg) -> str:
    return generate_latest(reg).decode()


@pytest.mark.parametrize("buckets", [LATENCY_BUCKETS, BATCH_BUCKETS])
def test_histograms_expose_what_prometheus_client_does(buckets):
    pc.disable_created_metrics()
    (ref, rr), (ours, orr) = both("Histogram", "h_seconds", "a histogram", ["route"], buckets=buckets)
    (ref1, rr1), (ours1, orr1) = both("Histogram", "u_seconds", "unlabelled", buckets=buckets)
    rng = np.random.default_rng(0)
    values = list(rng.exponential(buckets[len(buckets) // 2], 500)) + list(buckets) + [0.0, buckets[-1] * 10]
    for i, v in enumerate(values):  # the bounds themselves too: `le` holds them
        route = ("/a", "/b", 'q"uote')[i % 3]
        ref.labels(route).observe(v)
        ours.labels(route).observe(v)
        ref1.observe(v)
        ours1.observe(v)
    assert text(orr) == text(rr)
    assert text(orr1) == text(rr1)


def test_counters_and_gauges_expose_what_prometheus_client_does():
    pc.disable_created_metrics()
    (rc, rcr), (oc, ocr) = both("Counter", "c", "a counter", ["route", "status"])
    (rg, rgr), (og, ogr) = both("Gauge", "g", "a gauge")
    (ri, rir), (oi, oir) = both("Gauge", "info", "labelled gauge", ["model", "task"])
    for m in (rc, oc):
        m.labels("/v1/classify", "200").inc()
        m.labels("/v1/classify", "200").inc(2.5)
        m.labels("/x", 404).inc()  # a non-string label value becomes its text
    for m in (rg, og):
        m.inc(3)
        m.dec()
        m.set(7)
        m.inc()
    for m in (ri, oi):
        m.labels("mini", "embed").set(1)
    assert text(ocr) == text(rcr)
    assert text(ogr) == text(rgr)
    assert text(oir) == text(rir)
    fresh = CollectorRegistry()
    series.Gauge("z", "unlabelled: exported from the start", registry=fresh)
    assert "z 0.0" in text(fresh)


def test_odd_inputs_expose_what_prometheus_client_does():
    """Label values that are not strings (1, True and 1.0 are three series), labels by name, bounds written as
    Go floats (1e+06), an explicit +Inf bound, NaN observations (summed, in no bucket, not counted)."""
    pc.disable_created_metrics()
    (rc, rcr), (oc, ocr) = both("Counter", "c", "odd labels", ["k"])
    for v in (1, True, 1.0, "1", None, ("a", 1)):
        rc.labels(v).inc()
        oc.labels(v).inc()
    rc.labels(k="named").inc(2)
    oc.labels(k="named").inc(2)
    assert text(ocr) == text(rcr)
    bounds = (2.5e-7, 0.5, 1e6, float("inf"))
    (rh, rhr), (oh, ohr) = both("Histogram", "h", "odd bounds", buckets=bounds)
    for v in (0.1, 1e6, 3e6, float("nan"), 1e-9):
        rh.observe(v)
        oh.observe(v)
    assert text(ohr) == text(rhr)


def test_misuse_raises():
    reg = CollectorRegistry(auto_describe=True)  # as Metrics's: it reads each collector's names
    c = series.Counter("c", "x", ["a"], registry=reg)
    with pytest.raises(ValueError):
        c.labels("1", "2")          # wrong label count
    with pytest.raises(ValueError):
        c.inc()                     # labelled: needs .labels(...)
    with pytest.raises(ValueError):
        series.Counter("d", "x", registry=reg).inc(-1)  # a counter only goes up
    with pytest.raises(ValueError):
        c.labels("x").inc(-1)       # a labelled one too
    with pytest.raises(ValueError):
        c.labels(b="x")             # an unknown label name
    with pytest.raises(ValueError):
        series.Histogram("h", "x", registry=reg)  # no buckets
    with pytest.raises(ValueError):
        series.Histogram("h", "x", buckets=(2, 1), registry=reg)  # out of order
    with pytest.raises(ValueError):
        series.Counter("c", "again", registry=reg)  # the registry refuses a duplicate name


def test_counts_stay_exact_under_threads():
    reg = CollectorRegistry()
    h = series.Histogram("h", "x", ["k"], buckets=(1, 2, 3), registry=reg)
    c = series.Counter("c", "x", registry=reg)
    n, threads = 20000, 4

    def work(t: int) -> None:
        for i in range(n):
            h.labels(str(i % 2)).observe(i % 4)
            c.inc()

    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert c.one.v == n * threads
    assert sum(h.labels("0").counts) + sum(h.labels("1").counts) == n * threads
    q = n * threads // 4
    assert h.labels("0").counts == [q, q, 0, 0]  # 0 -> le 1, 2 -> le 2
    assert h.labels("1").counts == [q, 0, q, 0]  # 1 -> le 1 (a bound holds itself), 3 -> le 3
