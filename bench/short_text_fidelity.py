"""Fidelity of the native precisions on very short texts (one to three words: "ok", "thanks", "ok thanks"), beside
the shipped sample texts: cosine of each text's embedding against the torch fp32 reference (the embedded MiniLM),
per precision. Short texts are where per-row int7 loses most (mean pooling over three tokens, two of them [CLS]
and [SEP], averages little of the rounding away); the encoder bench's fidelity texts (banking77) hold few.

    PYTHONPATH=. .venv/bin/python bench/short_text_fidelity.py [--out bench/results/short_text_fidelity_<cpu>.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "bench" / "peers"))

from checkouts import write_result  # noqa: E402
from harness import SHORT_QUERIES  # noqa: E402
from native_precisions import ATT8  # noqa: E402  (a precision with it: the int8 attention)
from millis.artifact.model import open_model, run_texts  # noqa: E402
from millis.common.hardware import describe  # noqa: E402
from millis.common.numeric import row_cosines  # noqa: E402
from millis.common.samples import sample_texts  # noqa: E402
from millis.encoder.source import resolve  # noqa: E402
from millis.encoder.text import TextEncoder  # noqa: E402
from millis.runtimes.registry import open_runtime  # noqa: E402

SHORT = SHORT_QUERIES
PRECISIONS = ("int8", "int7", "int7-a7", "int7-row", "int7-row-a8", "int8-row", "int7-row" + ATT8, "int8-row" + ATT8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    src = resolve("builtin:minilm")
    ref = open_model("builtin:minilm", threads=2)
    enc = TextEncoder(src.path, src.input_names, 256)
    sets = {"short": SHORT, "shipped": sample_texts()}
    refs = {k: ref.run(v).outputs for k, v in sets.items()}
    rows = []
    for prec in PRECISIONS:
        rt = open_runtime("native", src.path, f"native-{prec}", src.input_names, "embedding",
                          {"task": "embed", "pooling": {"mode": "mean", "normalize": True},
                           "precision": prec.removesuffix(ATT8), "attention": "int8" if prec.endswith(ATT8) else "auto"},
                          2)
        row = {"precision": prec, "kernels": getattr(rt.model, "isa", None)}
        for k, texts in sets.items():
            cos = row_cosines(refs[k], run_texts(rt, enc, texts).outputs)
            row[f"{k}_cos_min"] = round(float(cos.min()), 5)
            row[f"{k}_worst_text"] = texts[int(cos.argmin())]
            if k == "short":
                row["short_cos"] = {t: round(float(c), 4) for t, c in zip(texts, cos)}
        rows.append(row)
    print(f"{'precision':<12} {'short cos min':>14} {'worst':>12} {'shipped cos min':>16} {'worst':>12}")
    for r in rows:
        print(f"{r['precision']:<12} {r['short_cos_min']:>14.5f} {r['short_worst_text']!r:>12} "
              f"{r['shipped_cos_min']:>16.5f} {r['shipped_worst_text'][:12]!r:>12}")
    if a.out:
        write_result(a.out, {"bench": "short_text_fidelity", "model": "builtin:minilm", "machine": describe(),
                             "rows": rows})


if __name__ == "__main__":
    main()
