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
               "--out", str(tmp_path))
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
    run_script("gpu_serve.py", "--tokenizer", str(tok), "--texts", str(texts), "--device", "cpu", "--duration", "1",
               "--out", str(tmp_path))
    res = json.loads((tmp_path / "gpu_serve_cpu-smoke-run.json").read_text())
    assert res["sigterm_exit"] == 0 and res["in_process"]["p50_ms"] > 0
    assert [r["load"] for r in res["rows"]] == ["c1", "c4", "c16"]
    assert all(r["errors"] == 0 and r["timeouts"] == 0 and r["ok"] > 0 for r in res["rows"]), res["rows"]
