"""One peer system in its own process, speaking JSON lines on stdin/stdout.

    <venv python> bench/peers/runner.py --system NAME --model-dir DIR --work-dir DIR --threads 2

Startup: prepare the model (convert / quantize into work-dir, cached under a hash
of the model dir), then print one line {"ok":true,"ready":true,...} (or
{"ok":false,"error":...} and exit 1). Then one request per line, one reply per line:
  {"cmd":"time","input_ids":[[..]],"attention_mask":[[..]],"n":N,"warmup":W} -> {"ok":true,"ms":[N floats]}
  {"cmd":"embed","input_ids":..,"attention_mask":..}  -> {"ok":true,"emb":[[..]]}
      (b x hidden, pooled as the model dir's 1_Pooling says (mean or [CLS]), L2-normalised)
  {"cmd":"info"} -> {"ok":true,"system","precision","versions","prep_s",...};  {"cmd":"quit"}
Errors -> {"ok":false,"error":"..."} and the runner keeps serving. Logs go to stderr only.
Only the stdlib is imported at top level (systems.py holds the systems): each system imports its own
libraries, since every system runs in its own venv.
"""
import hashlib, os, sys

from protocol import arg_parser, serve, threads_from_argv, timed_ms, versions  # bench/peers/ is the script's own folder
from systems import SYSTEMS, pooling_mode


def dir_hash(model_dir):
    """sha256 over every file's relative path and content: a changed model re-prepares."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(model_dir):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(os.path.relpath(p, model_dir).encode() + b"\0")
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def pool_normalise(h, mask, mode="mean"):
    """sentence-transformers' head: the masked mean over tokens (all-MiniLM-L6-v2) or the [CLS] token's row
    (mode "cls", bge), then L2 normalise."""
    import numpy as np
    h = np.asarray(h, dtype=np.float32)
    if mode == "cls":
        e = h[:, 0]
    else:
        m = np.asarray(mask, dtype=np.float32)[:, : h.shape[1], None]
        e = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def handle(sysobj, req, prep_s):
    cmd = req.get("cmd")
    if cmd == "time":
        feed = sysobj.feed(req["input_ids"], req["attention_mask"])
        for _ in range(int(req.get("warmup", 0))):
            sysobj.run(feed)
        return {"ok": True, "ms": timed_ms(lambda: sysobj.run(feed), int(req["n"]))}
    if cmd == "embed":
        out = sysobj.hidden(sysobj.run(sysobj.feed(req["input_ids"], req["attention_mask"])))
        emb = out if sysobj.outputs_embedding else pool_normalise(out, req["attention_mask"], sysobj.pooling)
        return {"ok": True, "emb": emb.tolist()}
    if cmd == "info":
        return {"ok": True, "system": sysobj.name, "precision": sysobj.precision,
                "versions": versions("numpy", *sysobj.pkgs), "prep_s": prep_s, "threads": sysobj.threads,
                "work_dir": sysobj.work, "extra": sysobj.extra_info()}
    return {"ok": False, "error": f"unknown cmd {cmd!r}"}


def main():
    a = arg_parser(SYSTEMS).parse_args()

    def make():
        sysobj = SYSTEMS[a.system](a.model_dir, a.work_dir, a.threads)
        sysobj.work = os.path.join(a.work_dir, dir_hash(a.model_dir))
        sysobj.pooling = pooling_mode(a.model_dir)
        sysobj.prepare()
        return sysobj
    return serve(make, handle, a.system)


if __name__ == "__main__":
    threads_from_argv()
    sys.exit(main())
