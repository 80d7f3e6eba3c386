"""Decoder embedders against llama.cpp on the same weights: Qwen3-Embedding-0.6B's shape (bench/decoder_embed.py's
random folder) on millis's native step (native-int8-row, native-int8) and on llama.cpp (the folder written as a qwen3
GGUF, quantized to Q8_0 by llama.cpp's own quantizer: what a user of Qwen3-Embedding's Q8_0 GGUF runs, pooling LAST).

    bash bench/peers/setup.sh llamacpp            # once: llama-cpp-python's venv (llama.cpp built for this CPU)
    .venv/bin/python bench/decoder_llamacpp.py [--rounds 5] [--iters 5] [--out bench/results/x.json]

Every system runs in its own process (bench/peers/embed_runner.py) on 2 threads and gets the same token ids (seeded
random ids, no tokenizer on either side): b1xs16, b1xs128, b8xs128, each call every row's last-token vector,
normalized. Rounds alternate the systems in a seeded random order; a cell's figure per round is the median of its
iters; ratios are millis / llama.cpp per round, their median and range reported. Fidelity: each system's vectors
against millis native-fp32's (the fp32 weights) at b8xs128; llama.cpp's also shows the GGUF was written right (its
Q8_0 against fp32 as millis's int8 is). Writes a table and JSON (`rows`, `versus`, `meta`: machine, ISA, llama.cpp's
system info).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))
import gguf_files  # noqa: E402
from checkouts import write_result  # noqa: E402
import harness  # noqa: E402
from decoder_embed import QWEN3_EMBEDDING_06B, qwen3_dir  # noqa: E402

RUNNER = str(HERE / "peers" / "embed_runner.py")
SHAPES = ((1, 16), (1, 128), (8, 128))
SYSTEMS = (("millis native-int8-row", "millis", "int8-row"), ("millis native-int8", "millis", "int8"),
           ("llama.cpp Q8_0", "llamacpp", None))


def write_qwen3_gguf(folder: Path, dst: Path) -> None:
    """The folder's weights as an F32 qwen3 GGUF (llama.cpp's names and keys; RoPE on halves, as HF's; pooling LAST;
    a placeholder tokenizer of the model's vocabulary size: the bench sends token ids)."""
    from gguf import GGUFValueType as V

    from millis.gen.embedder import decoder_config, decoder_tensors

    raw = json.loads((folder / "config.json").read_text())
    c, q = decoder_config(raw), QWEN3_EMBEDDING_06B
    t = decoder_tensors(folder, c, "qwen3")
    a = "qwen3."
    kv = [("general.name", "random Qwen3-Embedding-0.6B shape", V.STRING, None), ("general.file_type", 0, V.UINT32, None)]
    kv += [(a + k, v, V.UINT32, None) for k, v in (
        ("context_length", q["max_position_embeddings"]), ("embedding_length", q["hidden_size"]),
        ("block_count", q["num_hidden_layers"]), ("feed_forward_length", q["intermediate_size"]),
        ("attention.head_count", q["num_attention_heads"]), ("attention.head_count_kv", q["num_key_value_heads"]),
        ("attention.key_length", q["head_dim"]), ("attention.value_length", q["head_dim"]), ("pooling_type", 3))]
    kv += [(a + "rope.freq_base", float(q["rope_theta"]), V.FLOAT32, None),
           (a + "attention.layer_norm_rms_epsilon", q["rms_norm_eps"], V.FLOAT32, None)]
    kv += gguf_files.bpe_tokenizer_kv(q["vocab_size"])
    gguf_files.stream_write(dst, "qwen3", kv, [(n, w.shape, lambda w=w: w.data) for n, w in t.items()])


def q8_gguf(folder: Path, threads: int) -> Path:
    """The Q8_0 GGUF of the folder (built once, through an F32 one)."""
    cache = gguf_files.CACHE
    cache.mkdir(parents=True, exist_ok=True)
    recipe = {"from": str(folder), "shape": QWEN3_EMBEDDING_06B}
    f32 = gguf_files.build_file(cache / "qwen3-embedding-0.6b-random-f32.gguf", {**recipe, "type": "F32"},
                                lambda tmp: write_qwen3_gguf(folder, tmp))
    q8 = gguf_files.build_file(cache / "qwen3-embedding-0.6b-random-q8_0.gguf", {**recipe, "type": "Q8_0"},
                               lambda tmp: gguf_files.quantize(f32, tmp, "q8_0", threads))
    return q8


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pause", type=float, default=0.5, help="seconds between systems (spinning threads go quiet)")
    ap.add_argument("--out", default=str(HERE / "results" / "decoder_llamacpp.json"))
    a = ap.parse_args()
    from millis.common import hardware

    folder = qwen3_dir(HERE / ".cache")
    gguf = q8_gguf(folder, a.threads)
    rng = np.random.default_rng(0)
    cells = {f"b{b}xs{s}": [rng.integers(1000, 30000, s).tolist() for _ in range(b)] for b, s in SHAPES}
    work = str(gguf_files.CACHE / "runs")
    peers = []
    for label, system, precision in SYSTEMS + (("millis native-fp32", "millis", "fp32"),):
        p = harness.Peer(system, str(gguf if system == "llamacpp" else folder), work_dir=work, threads=a.threads,
                         name=label.replace(" ", "_"), runner=RUNNER, start_timeout=900,
                         venv=None if system == "millis" else "llamacpp",
                         args=["--precision", precision] if precision else [])
        p.label = label
        print(f"  {label}: " + (f"ready in {p.prep_s:.1f} s" if p.alive else f"SKIPPED: {p.error}"), flush=True)
        if not p.alive:
            raise SystemExit(f"{label} did not start: {p.error}")
        peers.append(p)
    ref = peers.pop()  # fp32: vectors only, untimed
    want = np.asarray(ref.request({"cmd": "embed", "rows": cells["b8xs128"], "n": 1}, timeout=1800)["vectors"])
    ref.close()
    timed: dict[str, dict[str, list[float]]] = {p.label: {c: [] for c in cells} for p in peers}
    cos = {}
    shuffle = random.Random(0)
    for r in range(a.rounds):
        t0 = time.perf_counter()
        for cell, rows in cells.items():
            order = list(peers)
            shuffle.shuffle(order)
            for p in order:
                time.sleep(a.pause)
                rep = p.request({"cmd": "embed", "rows": rows, "n": a.iters}, timeout=1800)
                timed[p.label][cell].append(statistics.median(rep["ms"]))
                if cell == "b8xs128" and p.label not in cos:
                    cos[p.label] = float((np.asarray(rep["vectors"]) * want).sum(1).min())
        print(f"  round {r + 1}/{a.rounds}: {time.perf_counter() - t0:.0f} s", flush=True)
    info = {p.label: p.request({"cmd": "info"}) for p in peers}
    for p in peers:
        p.close()
    rows, versus = [], []
    peer = "llama.cpp Q8_0"
    for label in timed:
        for cell in cells:
            rows.append({"system": label, "shape": cell, "p50_ms": statistics.median(timed[label][cell]),
                         "round_ms": timed[label][cell], "cos_min_vs_fp32": cos[label]})
            if label != peer:
                rr = [x / y for x, y in zip(timed[label][cell], timed[peer][cell])]
                versus.append({"millis": label, "peer": peer, "shape": cell, "ratio": statistics.median(rr),
                               "range": [min(rr), max(rr)]})
    print(f"\n{'system':26s} {'shape':9s} {'p50 ms':>9s}  cos min vs fp32")
    for x in rows:
        print(f"{x['system']:26s} {x['shape']:9s} {x['p50_ms']:9.2f}  {x['cos_min_vs_fp32']:.5f}")
    for v in versus:
        print(f"{v['millis']} / {v['peer']} {v['shape']}: {v['ratio']:.3f} [{v['range'][0]:.3f}-{v['range'][1]:.3f}]")
    res = {"meta": {"command": "python bench/decoder_llamacpp.py " + " ".join(sys.argv[1:]),
                    "date": time.strftime("%Y-%m-%d %H:%M"), "hardware": hardware.describe(), "gguf": str(gguf.name),
                    "model": "Qwen3-Embedding-0.6B shape, random weights (bench/decoder_embed.py), last-token, "
                             "normalized", "settings": vars(a) | {"out": None},
                    "systems": {k: {f: v.get(f) for f in ("versions", "isa", "precision", "system_info", "threads")}
                                for k, v in info.items()}},
           "rows": rows, "versus": versus}
    write_result(a.out, res, indent=2)  # strict JSON (a NaN listed, not lost)
    return 0


if __name__ == "__main__":
    sys.exit(main())
