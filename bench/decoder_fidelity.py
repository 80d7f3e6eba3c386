"""Decoder embedders' native precisions on a real trained decoder: how far int8 (Q8_0 x int8 per 32) and int8-row (int8
per row x int8 per token, smoothed, the ends' residual rows) take each text's last-token vector from fp32.

    .venv/bin/python bench/decoder_fidelity.py [--select 200] [--report 400] [--out bench/results/x.json]

No trained decoder embedder is on this machine, so the model is SmolLM2-135M-Instruct (the default chat model: a
Llama trained on real text, with the outlier channels and attention-sink tokens such models have), its GGUF's Q4_1
weights dequantized to fp32 as the reference, each text's last token's final-norm state (last-token pooling,
normalized) as the vector. The smoothing's strength (alpha) and which tokens get a residual row (llm_ends: none /
first / returned / both) are compared on Banking77 train.csv texts (every 40th; `select`), and the choice is reported
on test.csv's first texts (`report`, never read by the choice), beside int8. Writes a table and JSON (`select`:
every setting's cosine min / mean; `report`: int8, int8-row unsmoothed without ends, and the chosen setting).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

from checkouts import write_result  # noqa: E402
from gguf_files import smollm2_path  # noqa: E402
from splade import held_out_texts  # noqa: E402

ALPHAS = (0.4, 0.5, 0.6)
ENDS = {0: "none", 1: "first", 2: "returned", 3: "first+returned"}


class Runner:
    """SmolLM2's weights in fp32 (GGUF names), run by the C decoder step without a head."""

    def __init__(self):
        from millis.gen.gguf import dequantize, read_gguf
        from millis.gen.load import Weight
        from millis.gen.models.native_llama import KERNEL_SOURCES
        from millis.kernels.native import build, native_isa

        self.g = read_gguf(smollm2_path())
        self.tensors = {}
        for n, x in self.g.tensors.items():
            a = np.asarray(x.data, np.float32) if x.qtype == "F32" else dequantize(x).numpy()
            self.tensors[n] = Weight("F32", tuple(a.shape), np.ascontiguousarray(a))
        self.lib = build("llama_step", KERNEL_SOURCES, native_isa())

    def vectors(self, tensors: dict, texts: list[str]) -> np.ndarray:
        from millis.gen.models.native_llama import NativeLlama, kv_bytes_per_token

        c = self.g.config
        m = NativeLlama(c, tensors, self.g.rope_neox, 1, 512, kv_bytes_per_token(c) * 544, 2, head=False)
        out = []
        for t in texts:
            ids = np.asarray(self.g.tokenizer.encode(t)[:512], np.int32)
            n = len(ids)
            s = m.forward_flat(ids, np.arange(n, dtype=np.int32), np.zeros(n, np.int32), np.array([n - 1], np.int32))
            m.kv.release(0)
            out.append(s[0] / np.linalg.norm(s[0]))
        return np.array(out)


def cosines(a: np.ndarray, b: np.ndarray) -> dict:
    """Each row's cosine (unit rows): the lowest, the second lowest, the mean, how many below 0.995."""
    c = np.sort((a * b).sum(1))
    return {"cos_min": float(c[0]), "cos_second": float(c[1]), "cos_mean": float(c.mean()),
            "below_0.995": int((c < 0.995).sum())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--select", type=int, default=200, help="Banking77 train.csv texts the choice reads (every 40th)")
    ap.add_argument("--report", type=int, default=400, help="Banking77 test.csv texts reported on")
    ap.add_argument("--out", default=str(HERE / "results" / "decoder_fidelity.json"))
    a = ap.parse_args()
    from millis.common import hardware
    from millis.gen import decoder_smooth, embedder

    r = Runner()
    c = r.g.config
    select = held_out_texts("train.csv", 40 * a.select)[::40]
    report = held_out_texts("test.csv", a.report)
    amax = decoder_smooth.input_amax(r.tensors, c, r.g.rope_neox)
    rows = []
    ref = r.vectors(r.tensors, select)
    for alpha in ALPHAS:
        embedder.ROW_ALPHA = alpha
        t = embedder.precision_tensors(r.tensors, "int8-row", c, amax, r.g.rope_neox)
        for mode, ends in ENDS.items():
            r.lib.llm_ends(mode)
            rows.append({"alpha": alpha, "ends": ends, **cosines(r.vectors(t, select), ref)})
            print(f"select alpha {alpha} ends {ends:15s} min {rows[-1]['cos_min']:.5f} mean {rows[-1]['cos_mean']:.5f}",
                  flush=True)
    best = max(rows, key=lambda x: (x["cos_min"], x["cos_mean"]))
    ref = r.vectors(r.tensors, report)
    out = {"int8": cosines(r.vectors(embedder.precision_tensors(r.tensors, "int8"), report), ref)}
    plain = decoder_smooth.smoothed
    decoder_smooth.smoothed = lambda t, amax, c, alpha: t  # unsmoothed
    r.lib.llm_ends(0)
    unsmoothed = embedder.precision_tensors(r.tensors, "int8-row", c, amax, r.g.rope_neox)
    out["int8-row unsmoothed, no ends"] = cosines(r.vectors(unsmoothed, report), ref)
    decoder_smooth.smoothed = plain
    embedder.ROW_ALPHA = best["alpha"]
    r.lib.llm_ends([k for k, v in ENDS.items() if v == best["ends"]][0])
    name = f"int8-row alpha {best['alpha']} ends {best['ends']}"
    chosen = embedder.precision_tensors(r.tensors, "int8-row", c, amax, r.g.rope_neox)
    out[name] = cosines(r.vectors(chosen, report), ref)
    r.lib.llm_ends(3)
    print(f"\nreport on {len(report)} Banking77 test texts (cosine to fp32):")
    for k, v in out.items():
        print(f"  {k:40s} min {v['cos_min']:.5f} second {v['cos_second']:.5f} mean {v['cos_mean']:.5f} "
              f"below 0.995: {v['below_0.995']}")
    res = {"meta": {"command": "python bench/decoder_fidelity.py " + " ".join(sys.argv[1:]),
                    "date": time.strftime("%Y-%m-%d"), "hardware": hardware.describe(),
                    "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized = fp32 reference), last-token, normalized",
                    "select_texts": len(select), "report_texts": len(report)},
           "select": rows, "chosen": {"alpha": best["alpha"], "ends": best["ends"]}, "report": out}
    write_result(a.out, res, indent=2)  # strict JSON (a NaN listed, not lost)
    return 0


if __name__ == "__main__":
    sys.exit(main())
