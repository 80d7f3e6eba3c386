"""Smoke test of the peer systems (main venv):  .venv/bin/python bench/peers/smoke.py

For each system: start its runner, print info, time b1 x s16 (n=20 after 5 warmup), and compare
its embeddings of 64 Banking77 test texts (ordinary padded batch) with torch_eager's by cosine.
A system that cannot start or run is printed as SKIPPED with the reason.
"""
import argparse, os, statistics, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness, models  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--systems", default=",".join(harness.PEER_SYSTEMS))
    ap.add_argument("--model", choices=("minilm", "bert-base"), default="minilm")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-n", type=int, default=20)
    a = ap.parse_args()
    from transformers import AutoTokenizer

    model_dir = models.minilm_dir() if a.model == "minilm" else models.bert_base_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = harness.banking77_texts("test")
    ids16, mask16 = harness.texts_for_shape(tok, texts, 1, 16)   # 1 x 16, full mask
    e_ids, e_mask = harness.tokenize(tok, texts[:64])             # 64 x longest, padded
    print(f"model {model_dir}\nembed batch {e_ids.shape}, timing shape {ids16.shape}\n")

    rows, ref = [], None
    for system in a.systems.split(","):
        t0 = time.perf_counter()
        peer = harness.Peer(system, model_dir, threads=a.threads)
        if not peer.alive:
            rows.append((system, "SKIPPED", peer.error))
            print(f"[{system}] SKIPPED: {peer.error}\n", flush=True)
            continue
        try:
            info = peer.info()
            ms = peer.time(ids16, mask16, a.n, warmup=5)
            emb = peer.embed(e_ids, e_mask)
            if system == "torch_eager":
                ref = emb
            cos = harness.row_cosines(emb, ref) if ref is not None else None
            start_s = time.perf_counter() - t0
            print(f"[{system}] precision={info['precision']} prep_s={info['prep_s']:.1f} "
                  f"versions={info['versions']} extra={info['extra']}", flush=True)
            print(f"    ms: {' '.join(f'{x:.2f}' for x in ms)}\n", flush=True)
            rows.append((system, "ok", dict(
                precision=info["precision"], prep_s=info["prep_s"], start_s=start_s,
                median=statistics.median(ms), p10=sorted(ms)[len(ms) // 10], mean=statistics.mean(ms),
                cos_min=None if cos is None else float(cos.min()),
                cos_mean=None if cos is None else float(cos.mean()), dim=emb.shape[1])))
        except harness.PeerError as e:
            rows.append((system, "FAILED", str(e)))
            print(f"[{system}] FAILED: {e}\n", flush=True)
        finally:
            peer.close()

    print(f"{'system':20} {'precision':34} {'prep_s':>7} {'med ms':>7} {'p10 ms':>7} "
          f"{'mean ms':>7} {'cos min':>8} {'cos mean':>8}")
    for system, status, r in rows:
        if status != "ok":
            print(f"{system:20} {status}: {r}")
            continue
        c = (lambda v: "   n/a" if v is None else f"{v:.5f}")
        print(f"{system:20} {r['precision'][:34]:34} {r['prep_s']:7.1f} {r['median']:7.2f} {r['p10']:7.2f} "
              f"{r['mean']:7.2f} {c(r['cos_min']):>8} {c(r['cos_mean']):>8}")
    return 0 if all(s == "ok" for _, s, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
