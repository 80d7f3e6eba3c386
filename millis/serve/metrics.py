"""Prometheus metrics of one server: its own registry, so several apps (tests) never collide. The series are
millis.serve.series's (a request observes 8 of them: prometheus_client's own cost ~25 us of it), exposed by
prometheus_client's registry."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from millis.serve.live import STATUS, Live, status_class
from millis.serve.series import Counter, Gauge, Histogram

# seconds: sub-millisecond resolution at the low end, where an optimized encoder lives
LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
                   0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# a generation request (a stream of hundreds of tokens on a CPU) may take minutes: past 30 s, PromQL's
# histogram_quantile would read every one as 30 s
GEN_DURATION_BUCKETS = LATENCY_BUCKETS + (60.0, 120.0, 300.0, 600.0, 1800.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


disable_created_metrics()  # no *_created series: they double the scrape for nothing a dashboard uses


class Metrics:
    """The Prometheus series, and `live`: the same observations per second for /stats and /dashboard.
    Observe through the on_* methods so both see every observation."""

    def __init__(self, live: Live | None = None, duration_buckets: tuple = LATENCY_BUCKETS) -> None:
        self.live = live or Live()
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("millis_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        # by status class too: a 429 answered in 0.1 ms is not a latency of the served requests (select 2xx)
        self.duration = Histogram("millis_request_duration_seconds", "time in the server per request, by route "
                                  "and status class (2xx, 4xx, 429, 503, 5xx)", ["route", "status_class"],
                                  buckets=duration_buckets, registry=r)
        self.queue = Histogram("millis_queue_seconds", "per request: submit -> its first row enters a batch",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.tokenize = Histogram("millis_tokenize_seconds", "per request: tokenization time",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("millis_inference_seconds", "per request: runtime calls its rows were in",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("millis_batch_size", "rows per runtime call", buckets=BATCH_BUCKETS, registry=r)
        self.batch_tokens = Histogram("millis_batch_tokens", "tokens per runtime call, padding counted",
                                      buckets=tuple(16 * b for b in BATCH_BUCKETS), registry=r)
        self.batch_seconds = Histogram("millis_batch_seconds", "wall time of one runtime call",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("millis_queue_depth", "rows waiting for a batch", registry=r)
        self.inflight = Gauge("millis_inflight_requests", "requests admitted and not yet answered", registry=r)
        self.cold_start = Gauge("millis_cold_start_seconds", "model load + warm-up time", registry=r)
        self.ready = Gauge("millis_ready", "1 once the model is loaded and warmed", registry=r)
        self.info = Gauge("millis_model_info", "the served model", ["model", "variant", "runtime", "task"], registry=r)

    def on_request(self, route: str, status: int, seconds: float) -> None:
        """An answer (event loop)."""
        self.requests.labels(route, str(status)).inc()
        self.duration.labels(route, STATUS[status_class(status)]).observe(seconds)
        self.live.request(route, status, seconds)

    def on_admit(self) -> None:
        self.inflight.inc()
        self.live.inflight += 1

    def on_done(self) -> None:
        self.inflight.dec()
        self.live.inflight -= 1

    def on_stages(self, queue_s: float, tokenize_s: float, inference_s: float) -> None:
        """An encoder request's time per stage (event loop)."""
        self.queue.observe(queue_s)
        self.tokenize.observe(tokenize_s)
        self.inference.observe(inference_s)
        self.live.stages(queue_s, tokenize_s, inference_s)

    def on_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)
        self.live.queue_depth(depth)

    def on_batch(self, rows: int, tokens: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.batch_tokens.observe(tokens)
        self.batch_seconds.observe(seconds)
        self.live.batch(rows, tokens, seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


TOKENS_PER_S_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
FINISH = ("stop", "length", "cancelled", "timeout", "error")


class GenMetrics(Metrics):
    """A generation server's: the encoder set (a step is a "batch"), plus per-token latencies."""

    def __init__(self, live: Live | None = None) -> None:
        super().__init__(live or Live(generation=True), GEN_DURATION_BUCKETS)
        r = self.registry
        self.ttft = Histogram("millis_time_to_first_token_seconds", "per request: admitted -> first token sampled",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("millis_inter_token_latency_seconds", "per token after the first: time since the "
                             "request's previous token", buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_per_s = Histogram("millis_request_tokens_per_second", "per finished request: output tokens "
                                      "after the first / time from first to last", buckets=TOKENS_PER_S_BUCKETS,
                                      registry=r)
        self.prompt_tokens = Counter("millis_prompt_tokens", "prompt tokens admitted", registry=r)
        self.generated_tokens = Counter("millis_generated_tokens", "tokens generated", registry=r)
        self.finished = Counter("millis_generation_requests", "generation requests ended, by reason", ["reason"],
                                registry=r)
        self.running = Gauge("millis_running_requests", "requests holding a KV cache slot", registry=r)
        self.prefix_hit_tokens = Counter("millis_prefix_cache_hit_tokens", "admitted prompt tokens whose KV the "
                                         "prefix cache held (not prefilled again)", registry=r)
        self.prefix_hit_rate = Gauge("millis_prefix_cache_hit_ratio", "prefix cache hit tokens / admitted prompt "
                                     "tokens, since start (GGUF models)", registry=r)
        self.draft_accept = Gauge("millis_speculative_acceptance_ratio", "prompt-lookup draft tokens accepted / "
                                  "verified, since start (--speculate)", registry=r)
        self.preempted = Counter("millis_preempted_requests", "requests that gave their KV blocks back for older "
                                 "ones to decode and were prefilled again later (GGUF models)", registry=r)
        self.draft_failures = Counter("millis_draft_model_failures", "steps the draft model raised and the target "
                                      "decoded without drafts (--draft-model)", registry=r)
        self._seen = {"hits": 0, "preempted": 0, "draft_failures": 0}  # the engine's totals at the last scrape
        for reason in FINISH:
            self.finished.labels(reason)

    def on_step(self, eng, outputs: int, seconds: float) -> None:
        """After one engine step (engine thread): a step is a batch of `outputs` rows."""
        self.on_batch(outputs, outputs, seconds)  # the Prometheus gauges are read at scrape (observe_engine)
        self.live.engine(eng.max_batch - eng.free_slots, len(eng.waiting), eng.kv)

    def on_tokens(self, n: int) -> None:
        self.generated_tokens.inc(n)
        self.live.tokens(n)

    def on_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.live.ttft(seconds)

    def on_itl(self, seconds: float, tokens: int = 1) -> None:
        """`tokens` delivered together `seconds` after the request's previous ones (a speculative step accepts
        several): each counts once, at its share of the time, so the histogram stays per token."""
        for _ in range(tokens):
            self.itl.observe(seconds / tokens)
            self.live.itl(seconds / tokens)

    def observe_engine(self, eng) -> None:
        """The gauges read off the engine when /metrics is scraped."""
        self.running.set(eng.max_batch - eng.free_slots)
        self.queue_depth.set(len(eng.waiting))
        if eng.kv is not None:
            for name, counter, total in (("hits", self.prefix_hit_tokens, eng.kv.hit_tokens),
                                         ("preempted", self.preempted, eng.preempted)):
                counter.inc(max(total - self._seen[name], 0))
                self._seen[name] = max(total, self._seen[name])
            self.prefix_hit_rate.set(eng.kv.hit_rate)
        d = eng.draft_stats
        self.draft_accept.set(d.accepted / d.drafted if d.drafted else 0.0)
        if (failures := getattr(eng.drafter, "failures", 0)) > self._seen["draft_failures"]:
            self.draft_failures.inc(failures - self._seen["draft_failures"])
            self._seen["draft_failures"] = failures
