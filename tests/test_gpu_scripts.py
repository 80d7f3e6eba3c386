"""The device run's scripts (bench/gpu_run.sh) on the CPU: their `--device cpu` smoke runs go through the same
code as on a GPU (model loading, the decode and HTTP loops, the tables, the JSON they write) with torch on the
CPU in place of CUDA. Device minutes are few; a script that breaks on the CPU would break there too, and the run
would lose its part."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / name), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, (name, r.stdout[-3000:], r.stderr[-3000:])
    return r


def test_weight_only_script_smoke_run(tmp_path):
    run_script("gpu_weight_only.py", "--device", "cpu", "--new-tokens", "4", "--out", str(tmp_path))
    res = json.loads((tmp_path / "gpu_weight_only_cpu-smoke-run.json").read_text())
    rows = {r["format"]: r for r in res["decode"]}
    assert {"bf16", "int8", "int4"} <= set(rows)
    for fmt in ("bf16", "int8", "int4"):
        assert rows[fmt]["b1_ms_per_token"] > 0 and rows[fmt]["b8_tokens_per_s"] > 0, rows[fmt]
    assert rows["int4"]["weight_bytes"] < rows["int8"]["weight_bytes"]  # the packed formats really are smaller


def test_decode_script_smoke_run_agrees_with_the_cpu_reference(tmp_path, smollm2):
    run_script("gpu_decode.py", "--gguf", smollm2, "--device", "cpu", "--dtype", "fp32", "--new-tokens", "4",
               "--greedy-tokens", "8", "--out", str(tmp_path))
    res = json.loads((tmp_path / "gpu_decode_cpu-smoke-run.json").read_text())
    agree = res["greedy_agreement"]
    assert agree["leading_equal"] == agree["of"], agree  # the torch path's greedy tokens are the reference's
    assert res["b1_ms_per_token"] > 0 and res["ttft_512_ms"] > 0
    http = res["http"]
    assert http["sigterm_exit"] == 0 and http["chunks"] > 1, http  # streamed, then drained on SIGTERM


def test_serve_script_smoke_run(tmp_path):
    """bench/gpu_serve.py: the in-process model, `millis serve` at concurrency 1, 4, 16 and its SIGTERM exit (a
    2-layer BERT on the CPU, with BERT's vocabulary: MiniLM's tokenizer)."""
    import pytest

    from millis.common.errors import MillisError
    from millis.common.samples import sample_texts
    from millis.encoder.source import builtin_minilm_dir

    try:
        minilm = builtin_minilm_dir()
    except MillisError as e:
        pytest.skip(str(e))
    tok = tmp_path / "tok"  # the tokenizer's files alone, as bench/gpu_prepare.sh carries them
    tok.mkdir()
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (minilm / f).is_file():
            (tok / f).write_bytes((minilm / f).read_bytes())
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(sample_texts()[:300]) + "\n")
    run_script("gpu_serve.py", "--tokenizer", str(tok), "--texts", str(texts), "--device", "cpu", "--duration", "1", "--calls", "200",
               "--out", str(tmp_path))
    res = json.loads((tmp_path / "gpu_serve_cpu-smoke-run.json").read_text())
    assert res["sigterm_exit"] == 0 and res["in_process"]["p50_ms"] > 0
    assert [r["load"] for r in res["rows"]] == ["c1", "c4", "c16"]
    assert all(r["errors"] == 0 and r["timeouts"] == 0 and r["ok"] > 0 for r in res["rows"]), res["rows"]


def _bench_module(name: str):
    import importlib

    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    return importlib.import_module(name)


def test_layer_ab_records_each_engines_choice_and_is_invalid_when_both_ran_five(monkeypatch):
    """bench/gpu_decode.py's per-layer A/B: each engine decides at load whether it runs one kernel a layer (from its
    own timing), so each entry records what it ran, and an A/B whose per_layer engine chose five is marked invalid
    (it measured five kernels against five)."""
    import types

    import millis.gen as gen

    gd = _bench_module("gpu_decode")

    class FakeEngine:  # what alternated reads of an engine: add / has_work / step, and decode's choice
        def __init__(self, per_layer: bool):
            self.decode = types.SimpleNamespace(per_layer=per_layer,
                                                layer_us={"per_layer": 10.0, "five_kernels": 9.0 if not per_layer
                                                          else 11.0})
            self.left = 0

        def add(self, prompt, params):
            self.left = params.max_tokens

        @property
        def has_work(self):
            return self.left > 0

        def step(self):
            self.left -= 1

    def opened(per_layer_engine_chooses: bool):
        def open_engine(path, cfg):  # the second engine is opened with the A/B switch set: five kernels a layer
            return FakeEngine(per_layer_engine_chooses and "MILLIS_NO_DECODE_LAYER" not in os.environ)
        return open_engine

    a = types.SimpleNamespace(gguf="x.gguf", dtype="bf16", device="cuda", new_tokens=4)
    monkeypatch.setattr(gen, "open_engine", opened(True))
    ab = gd.alternated(a, [1, 2, 3], "MILLIS_NO_DECODE_LAYER", ("per_layer", "five_kernels"), rounds=2)
    assert "MILLIS_NO_DECODE_LAYER" not in os.environ
    assert ab["per_layer"]["per_layer"] and ab["per_layer"]["per_layer_after"] and not ab["five_kernels"]["per_layer"]
    assert ab["per_layer"]["layer_us"] == {"per_layer": 10.0, "five_kernels": 11.0}
    assert len(ab["per_layer"]["rounds"]) == 2 and ab["five_kernels"]["b1_ms_per_token"] >= 0
    assert gd.layer_ab_validity(ab) == {"valid": True, "invalid_because": None}

    monkeypatch.setattr(gen, "open_engine", opened(False))  # the per_layer engine's own timing chose five
    ab = gd.alternated(a, [1, 2, 3], "MILLIS_NO_DECODE_LAYER", ("per_layer", "five_kernels"), rounds=2)
    v = gd.layer_ab_validity(ab)
    assert not ab["per_layer"]["per_layer"] and not v["valid"] and "chose five" in v["invalid_because"]
    assert not gd.layer_ab_validity({"error": "RuntimeError: x"})["valid"]


def test_tuned_config_keys_name_the_dtype():
    """An fp32 engine opened after a bf16 one does not reuse the bf16 engine's tuned (and residency-checked)
    configs: both caches' keys name the dtype."""
    import torch

    from millis.gpu import decode_gemv, decode_layer

    assert (decode_gemv.tune_key("plain", torch.bfloat16, 576, 576, True, False)
            != decode_gemv.tune_key("plain", torch.float32, 576, 576, True, False))
    assert (decode_layer.tune_key("plain", torch.bfloat16, 576, 1536, 960)
            != decode_layer.tune_key("plain", torch.float32, 576, 1536, 960))
    assert "float32" in decode_layer.tune_key("int8", torch.float32, 576, 1536, 960)


def test_run_scripts_parse():
    for script in ("gpu_run.sh", "gpu_prepare.sh"):
        r = subprocess.run(["bash", "-n", str(ROOT / "bench" / script)], capture_output=True, text=True)
        assert r.returncode == 0, (script, r.stderr)


def _stage2(tmp_path: Path, warm: bool) -> str:
    """bench/gpu_run.sh stage 2 in an empty directory (a fresh machine), or with stage 1's part-aa and Llama-1B
    weights there (a warm one), python3 a stub that logs its arguments: the stage's own log, which parts ran."""
    import hashlib

    work, out, bin_ = tmp_path / "work", tmp_path / "out", tmp_path / "bin"
    for d in (work / "bench", out, bin_):
        d.mkdir(parents=True)
    (bin_ / "python3").write_text("#!/bin/sh\necho \"stub python3 $*\"\n")
    (bin_ / "python3").chmod(0o755)
    carry = work / "bench" / ".gpu_carry"
    (carry / "tok").mkdir(parents=True)
    (carry / "smollm2.gguf.part-ab").write_bytes(b"second half")
    (carry / "tok" / "smollm2.gguf.sha256").write_text(hashlib.sha256(b"first half|second half").hexdigest() + "\n")
    if warm:
        (carry / "smollm2.gguf.part-aa").write_bytes(b"first half|")
        (work / "bench" / ".cache" / "llama-1b-random").mkdir(parents=True)
        (work / "bench" / ".cache" / "llama-1b-random" / "config.json").write_text("{}")
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_run.sh"), "2", "600"], cwd=work, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "OUT": str(out),
                                                    "PATH": f"{bin_}:{os.environ['PATH']}"})
    assert r.returncode == 0, r.stderr
    assert (out / "env_stage2.json").is_file() and not (out / "env.json").exists()
    return (out / "gpu_run_stage2.log").read_text()


def test_run_stage_2_on_a_fresh_machine_skips_smollm2_and_builds_the_weights(tmp_path):
    log = _stage2(tmp_path, warm=False)
    assert "smollm2: skipped, stage 1's part-aa is not on this machine" in log and "gpu_decode.py" not in log
    assert "llama1b-weights: not on this machine" in log and "decoder_dir('llama-1b')" in log
    assert "llama1b-compile: skipped, no Llama-1B weights" in log  # the stub built none
    assert "gpu_encoders.py" in log and "gpu_serve.py" in log  # the rest ran


def test_run_stage_2_on_a_warm_machine_joins_smollm2_and_compiles(tmp_path):
    log = _stage2(tmp_path, warm=True)
    assert "gpu_decode.py --gguf bench/.gpu_carry/smollm2.gguf" in log and "skipped" not in log
    assert "hf:static-compile" in log and "decoder_dir" not in log
