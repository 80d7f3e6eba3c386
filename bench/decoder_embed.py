"""Decoder embedders: Qwen3-Embedding-0.6B's shape on millis's native decoder step against ONNX Runtime, OpenVINO
and torch eager (what Optimum's ORTModelForFeatureExtraction, optimum-intel's OVModelForFeatureExtraction and
sentence-transformers run).

    .venv/bin/python bench/decoder_embed.py [--rounds 3] [--iters 5] [--variants a,b,...] [--out bench/results/x.json]

The model: Qwen3-Embedding-0.6B's config.json (Qwen3, 28 layers x 1024, 16 query heads over 8 KV heads of 128, FFN
3072, 151,669 ids, tied; RMS-normed q / k heads), random weights (seed 0, stored in bf16 as the real checkpoint), laid
out as its sentence-transformers folder (Transformer + last-token Pooling + Normalize) with MiniLM's tokenizer (its
[SEP] stands where Qwen3's <|endoftext|> closes each text). Its timings are real; its weights meaningless: the
fidelity of int8 on random weights is not a trained model's. `millis optimize` builds every variant (the exported
graphs hold the pooling; over 2 GB, their weights in model.onnx.data) and measures them interleaved in rounds at
b1xs16, b1xs128 and b8xs128; the ratio to torch eager fp32 is the median of per-round ratios. Fidelity: optimize's
gate judges every variant on Banking77 train.csv's first 256 texts (`cos_min_gate`; NNCF calibrates on the next
256); the chosen one is then held to torch fp32 on test.csv's first 128 texts, which selection never read. Writes a table and JSON (`rows`: variant,
shape, p50_ms, x_eager and its round range, spread, cos_min_gate, chosen; `versus`: each native variant / each
peer runtime's variant, the median [range] of per-round ratios; `chosen_held_out`; `meta`: the machine and ISA, the
load while measuring).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from checkouts import write_result  # noqa: E402
from splade import arguments, chosen_fidelity, eager_rows, held_out_texts, print_rows, random_folder  # noqa: E402

from millis.common import hardware  # noqa: E402
from millis.common.config import Shape  # noqa: E402
from millis.optimize.config import MeasureConfig, OptimizeConfig  # noqa: E402

VARIANTS = ("torch-fp32", "ort-fp32-fused", "ort-int8-dynamic-pc", "ov-fp32", "ov-bf16", "ov-int8", "native-fp32",
            "native-int8", "native-int8-a16", "native-int8-row")
SHAPES = (Shape(1, 16), Shape(1, 128), Shape(8, 128))
QWEN3_EMBEDDING_06B = dict(attention_bias=False, bos_token_id=151643, eos_token_id=151643, head_dim=128,
                           hidden_size=1024, intermediate_size=3072, max_position_embeddings=32768,
                           max_window_layers=28, num_attention_heads=16, num_hidden_layers=28, num_key_value_heads=8,
                           rms_norm_eps=1e-6, rope_theta=1000000, sliding_window=None, tie_word_embeddings=True,
                           use_sliding_window=False, vocab_size=151669)


def qwen3_dir(cache: Path) -> Path:
    """Qwen3-Embedding-0.6B's shape as a random-weight sentence-transformers folder (built once)."""
    def fill(tmp: Path) -> None:
        import torch
        from transformers import Qwen3Config, Qwen3Model

        from millis.encoder.tiny import save_mean_modules

        Qwen3Model(Qwen3Config(**QWEN3_EMBEDDING_06B)).to(torch.bfloat16).eval().save_pretrained(tmp)
        save_mean_modules(tmp, "lasttoken", QWEN3_EMBEDDING_06B["hidden_size"])
        (tmp / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512}))

    return random_folder(cache / "qwen3-embedding-0.6b-random", fill)


def versus(rep: dict, names: list[str]) -> list[dict]:
    """Each native variant against each other runtime's, per shape: the median and range of the per-round ratios
    of their p50s (millis / peer; the rounds interleave the variants)."""
    import numpy as np

    by = {v["name"]: v for v in rep["variants"]}
    out = []
    for m in (n for n in names if by[n]["runtime"] == "native"):
        for peer in (n for n in names if by[n]["runtime"] not in ("native", "torch")):
            for s in SHAPES:
                a, b = by[m]["latency"][s.name]["round_p50_ms"], by[peer]["latency"][s.name]["round_p50_ms"]
                r = [x / y for x, y in zip(a, b)]
                out.append({"millis": m, "peer": peer, "shape": s.name, "ratio": float(np.median(r)),
                            "range": [min(r), max(r)]})
    return out


def main() -> int:
    from millis.optimize.pipeline import optimize

    a, variants = arguments(3, 5, VARIANTS, "decoder_embed.json")
    folder = qwen3_dir(HERE / ".cache")
    out = HERE / ".cache" / "artifacts" / "qwen3-embedding-0.6b"
    t0 = time.perf_counter()
    if not a.reuse:
        shutil.rmtree(out, ignore_errors=True)
        train = held_out_texts("train.csv", 512)
        gate = HERE / ".cache" / "decoder_gate_texts.txt"  # optimize's fidelity gate: Banking77 train.csv texts
        gate.write_text("\n".join(train[:256]) + "\n")
        calibration = HERE / ".cache" / "decoder_calibration_texts.txt"  # NNCF's: the next 256, never judged
        calibration.write_text("\n".join(train[256:]) + "\n")
        optimize(OptimizeConfig(source=str(folder), task="embed", out=str(out), target=Shape(1, 128),
                                variants=variants, sample_texts=str(gate), calibration_texts=str(calibration),
                                measure=MeasureConfig(shapes=SHAPES, warmup=2, iters=a.iters, rounds=a.rounds)),
                 progress=lambda m: print(f"  [optimize] {m}", flush=True))
    seconds = None if a.reuse else time.perf_counter() - t0
    rep = json.loads((out / "report.json").read_text())
    held = chosen_fidelity(folder, out, held_out_texts("test.csv", 128))
    rows = eager_rows(rep, SHAPES)
    print_rows(rows)
    pairs = versus(rep, [v["name"] for v in rep["variants"] if v.get("latency")])
    for p in pairs:
        print(f"{p['millis']} / {p['peer']} {p['shape']}: {p['ratio']:.3f} [{p['range'][0]:.3f}-{p['range'][1]:.3f}]")
    print(f"chosen {rep['chosen']}: on {held['texts']} Banking77 test texts cosine min {held['cos_min']:.5f} / mean "
          f"{held['cos_mean']:.5f} to torch fp32")
    res = {"meta": {"command": "python bench/decoder_embed.py " + " ".join(sys.argv[1:]),
                    "date": time.strftime("%Y-%m-%d"), "reused": a.reuse, "hardware": hardware.describe(),
                    "load": rep["measured"].get("load"), "optimize_s": seconds,
                    "model": "Qwen3-Embedding-0.6B shape, random weights, last-token pooling, normalized"},
           "chosen": rep["chosen"], "chosen_held_out": {k: held[k] for k in ("texts", "cos_min", "cos_mean")},
           "rows": rows, "versus": pairs}
    write_result(a.out, res, indent=2)  # strict JSON (a NaN listed, not lost)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
