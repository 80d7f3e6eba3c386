"""SPLADE sparse embeddings: millis's native masked-LM head against ONNX Runtime, OpenVINO and torch eager.

    .venv/bin/python bench/splade.py [--rounds 5] [--iters 30] [--variants a,b,...] [--out bench/results/splade.json]

The model: BERT-base's shape as a SPLADE encoder (BertForMaskedLM, BertConfig defaults: 12 x 768, 30,522 ids; random
weights, seed 0, the vocabulary bias at -2 so a text's vectors are sparse as a trained SPLADE's), laid out as
sentence-transformers' SparseEncoder (MLMTransformer + SpladePooling) with MiniLM's tokenizer (BERT's 30,522 ids).
Its timings are real; its weights meaningless. `millis optimize` builds every variant (the exported ONNX / OpenVINO
graphs hold the masked LM and the pooling: what Optimum's ORTModelForMaskedLM or fastembed's SPLADE run, plus
pooling inside the graph; native: millis's C encoder and its head, millis.encoder.splade) and measures them
interleaved in rounds at b1xs16, b1xs128 and b8xs128; the ratio to torch eager fp32 is the median of per-round
ratios. Fidelity: optimize's gate judges every variant on Banking77 train.csv's first 512 texts (`cos_min_gate`);
the chosen one is then held to torch fp32 on test.csv's first 256 texts, which selection never read. Writes a table
and JSON (`rows`: variant, shape, p50_ms, x_eager and its round range, spread, cos_min_gate, chosen;
`chosen_held_out`; `meta`: the machine and ISA, the load while measuring).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from peers.models import TOKENIZER_FILES, minilm_dir  # noqa: E402

from millis.common import hardware  # noqa: E402
from millis.common.config import Shape  # noqa: E402
from millis.optimize.config import MeasureConfig, OptimizeConfig  # noqa: E402

VARIANTS = ("torch-fp32", "ort-fp32-fused", "ort-int8-dynamic", "ov-fp32", "ov-bf16", "native-fp32",
            "native-int8-row-att8", "native-int7-row-att8")
SHAPES = (Shape(1, 16), Shape(1, 128), Shape(8, 128))
VOCAB_BIAS = -2.0


def random_folder(out: Path, fill) -> Path:
    """`out`, built once: `fill(tmp)` writes a random-weight model (torch seeded 0) and its sentence-transformers
    modules into tmp, MiniLM's tokenizer is copied beside them, and tmp becomes `out`."""
    if (out / "model.safetensors").is_file():
        return out
    import torch

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.manual_seed(0)
    fill(tmp)
    for f in TOKENIZER_FILES:
        if f not in ("modules.json", "sentence_bert_config.json") and (Path(minilm_dir()) / f).is_file():
            shutil.copy2(Path(minilm_dir()) / f, tmp / f)
    tmp.rename(out)
    return out


def splade_dir(cache: Path) -> Path:
    """BERT-base's shape as a random-weight SPLADE folder (built once)."""
    def fill(tmp: Path) -> None:
        import torch
        from transformers import BertConfig, BertForMaskedLM

        from millis.encoder.tiny import save_splade_modules

        model = BertForMaskedLM(BertConfig()).eval()
        with torch.no_grad():
            model.get_output_embeddings().bias.fill_(VOCAB_BIAS)
        model.save_pretrained(tmp)
        save_splade_modules(tmp)

    return random_folder(cache / "splade-bert-base-random", fill)


def held_out_texts(name: str, n: int) -> list[str]:
    """The first n texts of Banking77's `name` (train.csv: what optimize's fidelity gate judges; test.csv: reported)."""
    root = Path(os.environ.get("MILLIS_DATA") or HERE.parent.parent / "shared" / "data")
    with open(root / "banking77" / name, newline="") as f:
        return [r["text"] for r, _ in zip(csv.DictReader(f), range(n))]


def chosen_fidelity(folder: Path, artifact: Path, texts: list[str]) -> dict:
    """The chosen variant's vectors against torch fp32's (millis.encoder.tasks' SPLADE module on HF's masked LM) on
    texts selection never read: cosine min / mean, and each side's nonzero weights per text."""
    import numpy as np
    import torch

    from millis.artifact.model import open_model
    from millis.encoder.source import resolve
    from millis.encoder.tasks import load_task_model

    model = open_model(artifact)
    got = model.embed(texts)
    src = resolve(str(folder))
    ref_model = load_task_model(src, "embed")
    enc = model.encoder
    ref = []
    with torch.no_grad():
        for i in range(0, len(texts), 32):
            f = enc.encode(texts[i:i + 32]).feeds
            ref.append(ref_model(*(torch.from_numpy(f[n]) for n in src.input_names)).numpy())
    ref = np.concatenate(ref)
    cos = (got * ref).sum(1) / np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1), 1e-30)
    return {"texts": len(texts), "cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
            "nonzero_mean": float((got > 0).sum(1).mean()), "ref_nonzero_mean": float((ref > 0).sum(1).mean())}


def arguments(rounds: int, iters: int, variants: tuple[str, ...], out: str) -> tuple[argparse.Namespace, tuple]:
    """The flags of a bench that runs `millis optimize` (this one, bench/decoder_embed.py) and its variants."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--variants", default=",".join(variants))
    ap.add_argument("--out", default=str(HERE / "results" / out))
    ap.add_argument("--reuse", action="store_true", help="read the last run's artifact (its report.json) again: "
                                                          "the table and JSON without building or measuring")
    a = ap.parse_args()
    names = tuple(v for v in a.variants.split(",") if v)
    if "torch-fp32" not in names:
        raise SystemExit("--variants needs torch-fp32: the ratios are to it")
    return a, names


def eager_rows(rep: dict, shapes) -> list[dict]:
    """A row per measured variant and shape of optimize's report: p50, the median [range] of its per-round ratios to
    torch eager fp32, the rounds' spread, the gate's cosine, whether it was chosen."""
    import numpy as np

    rows = []
    eager = {v["name"]: v for v in rep["variants"]}["torch-fp32"]["latency"]
    for v in rep["variants"]:  # those asked for, and the recovery recipes optimize added for a missed budget
        for s in shapes if v.get("latency") else ():
            lat = v["latency"].get(s.name)
            if not lat:
                continue
            ratios = [b / x for x, b in zip(lat["round_p50_ms"], eager[s.name]["round_p50_ms"])]
            rows.append({"variant": v["name"], "shape": s.name, "p50_ms": lat["p50_ms"],
                         "x_eager": float(np.median(ratios)), "x_eager_range": [min(ratios), max(ratios)],
                         "spread": lat["spread"], "cos_min_gate": v["fidelity"].get("cos_min"),
                         "within_budget": v["ok"], "chosen": v["name"] == rep["chosen"]})
    return rows


def main() -> int:
    from millis.optimize.pipeline import optimize

    a, variants = arguments(5, 30, VARIANTS, "splade.json")
    folder = splade_dir(HERE / ".cache")
    out = HERE / ".cache" / "artifacts" / "splade-bert-base"
    t0 = time.perf_counter()
    if not a.reuse:
        shutil.rmtree(out, ignore_errors=True)
        gate = HERE / ".cache" / "splade_gate_texts.txt"  # optimize's fidelity gate: Banking77 train.csv texts
        gate.write_text("\n".join(held_out_texts("train.csv", 512)) + "\n")
        optimize(OptimizeConfig(source=str(folder), task="embed", out=str(out), target=Shape(1, 128),
                                variants=variants, sample_texts=str(gate),
                                measure=MeasureConfig(shapes=SHAPES, warmup=5, iters=a.iters, rounds=a.rounds)),
                 progress=lambda m: print(f"  [optimize] {m}", flush=True))
    seconds = None if a.reuse else time.perf_counter() - t0
    rep = json.loads((out / "report.json").read_text())
    held = chosen_fidelity(folder, out, held_out_texts("test.csv", 256))
    rows = eager_rows(rep, SHAPES)
    print_rows(rows)
    print(f"chosen {rep['chosen']}: on {held['texts']} Banking77 test texts cosine min {held['cos_min']:.5f} / mean "
          f"{held['cos_mean']:.5f} to torch fp32; {held['nonzero_mean']:.0f} nonzero weights a text (fp32: "
          f"{held['ref_nonzero_mean']:.0f})")
    res = {"meta": {"command": "python bench/splade.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
                    "reused": a.reuse,
                    "hardware": hardware.describe(), "load": rep["measured"].get("load"), "optimize_s": seconds,
                    "model": "BERT-base shape, random weights, SPLADE pooling"},
           "chosen": rep["chosen"], "chosen_held_out": held, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {a.out}")
    return 0


def print_rows(rows: list[dict]) -> None:
    print(f"{'variant':24s} {'shape':8s} {'p50 ms':>9s} {'x eager':>8s}  {'range':>13s}  cos_min(gate)")
    for r in rows:
        lo, hi = r["x_eager_range"]
        print(f"{r['variant']:24s} {r['shape']:8s} {r['p50_ms']:9.2f} {r['x_eager']:8.2f}  [{lo:5.2f}-{hi:5.2f}]  "
              f"{r['cos_min_gate']}{'  (chosen)' if r['chosen'] else ''}")


if __name__ == "__main__":
    raise SystemExit(main())
