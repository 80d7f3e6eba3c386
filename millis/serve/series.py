"""Counters, gauges and histograms for the request path, at a microsecond or less an observation.

prometheus_client's own metrics cost a request of the encoder server ~25 us in 8 observations (Python
layers per call: label lookup, a check per call, a lock per bucket, a Python loop over the buckets; Zen 4
VM, an ASGI loop with a no-op runtime: 222 -> 195 us a request without them). These keep plain lists under
one lock per metric and are read by the same registry as prometheus_client's (a custom collector: the
exposition, /metrics and `registry.collect()` see the same families, names and types).

Labelled metrics: `.labels(*values)` (or by name) returns the child of that label set, keyed by the values'
text as prometheus_client keys it (created on first use; the same object after), whose `inc` / `set` /
`observe` update it. An unlabelled metric takes them itself.
"""
from __future__ import annotations

import threading
from bisect import bisect_left
from typing import Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString  # how prometheus_client writes a bucket's `le`


def label_text(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(str(v) for v in values)


class Series:
    """What the three kinds share: a name, help, label names, children per label set, one lock."""

    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = (), registry: CollectorRegistry | None = None):
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self.lock = threading.Lock()
        self.children: dict[tuple[str, ...], object] = {}
        self.one = None if self.labelnames else self.labels()  # an unlabelled metric's child: exported from the start
        if registry is not None:
            registry.register(self)

    def labels(self, *values, **by_name):
        """The child of this label set (values in labelnames' order, or by name), created on first use."""
        if by_name:
            if values or set(by_name) != set(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values or by_name}")
            values = tuple(by_name[n] for n in self.labelnames)
        try:
            child = self.children.get(values)  # the caller's strings: the key itself
        except TypeError:  # an unhashable value: found by its text below
            child = None
        if child is not None:
            return child
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        key = label_text(values)
        with self.lock:
            child = self.children.get(key)
            if child is None:
                child = self.children[key] = self.child()
        return child

    def own(self):
        """The unlabelled metric's one child."""
        if self.one is None:
            raise ValueError(f"{self.name} is labelled by {self.labelnames}: use .labels(...)")
        return self.one

    def samples(self) -> list[tuple[tuple[str, ...], object]]:
        """(label values, child) per label set, a copy taken under the lock (children may be added meanwhile)."""
        with self.lock:
            return list(self.children.items())

    def child(self):
        raise NotImplementedError


class Value:
    """A gauge's value."""

    __slots__ = ("v", "lock")

    def __init__(self, lock: threading.Lock):
        self.v, self.lock = 0.0, lock

    def inc(self, amount: float = 1.0) -> None:
        with self.lock:
            self.v += amount

    def dec(self, amount: float = 1.0) -> None:
        with self.lock:
            self.v -= amount

    def set(self, value: float) -> None:
        with self.lock:
            self.v = float(value)


class Total(Value):
    """A counter's value: it only goes up."""

    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        with self.lock:
            self.v += amount


class Scalar(Series):
    """A counter or a gauge: one number per label set, exposed as `family`."""

    family: type = GaugeMetricFamily
    value: type = Value

    def child(self) -> Value:
        return self.value(self.lock)

    def inc(self, amount: float = 1.0) -> None:
        self.own().inc(amount)

    def collect(self) -> list[Metric]:
        fam = self.family(self.name, self.doc, labels=self.labelnames)
        for values, c in self.samples():
            fam.add_metric(values, c.v)
        return [fam]


class Counter(Scalar):
    family, value = CounterMetricFamily, Total


class Gauge(Scalar):
    def dec(self, amount: float = 1.0) -> None:
        self.own().dec(amount)

    def set(self, value: float) -> None:
        self.own().set(value)


class Buckets:
    """One histogram's counts: counts[i] observations in (bounds[i - 1], bounds[i]] (Prometheus's `le`),
    the last past every bound (+Inf)."""

    __slots__ = ("bounds", "counts", "sum", "lock")

    def __init__(self, bounds: list[float], lock: threading.Lock):
        self.bounds, self.lock = bounds, lock
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        if amount != amount:  # NaN: in no bucket and not counted, only summed (as prometheus_client)
            with self.lock:
                self.sum += amount
            return
        i = bisect_left(self.bounds, amount)  # the first bound >= amount
        with self.lock:
            self.counts[i] += 1
            self.sum += amount


class Histogram(Series):
    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = (), buckets: Sequence[float] = (),
                 registry: CollectorRegistry | None = None):
        self.bounds = [float(b) for b in buckets if float(b) != float("inf")]  # +Inf: the last count
        if not self.bounds or self.bounds != sorted(self.bounds):
            raise ValueError(f"{name}: give the histogram's buckets, in increasing order")
        self.le = [*map(floatToGoString, self.bounds), "+Inf"]  # each count's `le`, as prometheus_client writes it
        super().__init__(name, doc, labelnames, registry)

    def child(self) -> Buckets:
        return Buckets(self.bounds, self.lock)

    def observe(self, amount: float) -> None:
        self.own().observe(amount)

    def collect(self) -> list[Metric]:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, h in self.samples():
            with self.lock:
                counts, total = list(h.counts), h.sum
            cum, rows = 0, []
            for bound, n in zip(self.le, counts):
                cum += n
                rows.append((bound, cum))
            fam.add_metric(values, rows, total)
        return [fam]

