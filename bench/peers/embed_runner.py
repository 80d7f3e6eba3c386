"""One decoder embedder (millis's native step on a folder, or llama.cpp on a GGUF of the same weights) in its own
process, speaking JSON lines on stdin/stdout (bench/decoder_llamacpp.py starts it through harness.Peer).

    .venv/bin/python bench/peers/embed_runner.py --system millis --model-dir FOLDER --precision int8-row ...
    bench/.venvs/llamacpp/bin/python bench/peers/embed_runner.py --system llamacpp --model-dir FILE.gguf ...

Both sit behind one call, `prepare(rows)()`: token-id rows (each a text, already tokenized: both systems get the same
ids) -> each row's last token's final-norm state, L2-normalized (last-token pooling). millis: NativeDecoder on the
rows as its runtime gets them (right-padded ids and mask); llama.cpp: llama_decode over one llama_batch of every row
(a sequence id each), pooling LAST, llama_get_embeddings_seq per row (what llama-cpp-python's Llama.embed and
llama-embedding do, without their tokenizer). Requests (replies {"ok":true,...}):
  {"cmd":"embed","rows":[[ids]..],"n":R}   -> ms [R] of R calls, vectors [[..]..] of the last
  {"cmd":"info"}; {"cmd":"quit"}
"""
import ctypes, sys

import numpy as np

from protocol import arg_parser, registry, serve, threads_from_argv, timed_ms, versions  # bench/peers/

SYSTEMS, system = registry()
MAX_TOKENS, MAX_ROWS = 2048, 64  # a call's most tokens and rows (millis.gen.embedder's GROUP_TOKENS and SLOTS)


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


@system("millis")
class Millis:
    def __init__(self, a):
        from pathlib import Path

        from millis.encoder.source import Pooling
        from millis.gen.embedder import NativeDecoder

        self.a = a
        self.m = NativeDecoder(Path(a.model_dir), a.precision, a.threads, Pooling("last-token", True))

    def prepare(self, rows):
        """rows -> the timed call (its inputs built outside it): right-padded ids and mask, as the runtime's"""
        n = max(map(len, rows))
        ids, mask = np.zeros((len(rows), n), np.int64), np.zeros((len(rows), n), np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        return lambda: self.m(ids, mask)

    def info(self):
        return {"versions": versions("numpy", "torch"), "isa": self.m.model.isa, "precision": self.a.precision,
                "threads": self.a.threads}


@system("llamacpp")
class LlamaCpp:
    def __init__(self, a):
        import llama_cpp as L

        self.L, self.a = L, a
        self._cb = L.llama_log_callback(lambda level, text, user: None)  # quiet; referenced for the process's life
        L.llama_log_set(self._cb, ctypes.c_void_p(0))
        from llamacpp_model import open_model  # bench/peers/

        self.model = open_model(L, a.model_dir)
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max = MAX_TOKENS, MAX_ROWS
        cp.n_batch = cp.n_ubatch = MAX_TOKENS
        cp.n_threads = cp.n_threads_batch = a.threads
        cp.embeddings = True
        cp.pooling_type = L.LLAMA_POOLING_TYPE_LAST
        cp.kv_unified = True  # the rows share the cache (n_ctx is not split per sequence)
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.mem = L.llama_get_memory(self.ctx)
        self.dim = L.llama_model_n_embd(self.model)
        self.batch = L.llama_batch_init(MAX_TOKENS, 0, 1)

    def prepare(self, rows):
        """rows -> the timed call: the batch filled once outside it (llama_decode does not change it); in it the
        cache cleared, the decode, each row's pooled state read and normalized"""
        b, L = self.batch, self.L
        n = sum(map(len, rows))
        if n > MAX_TOKENS or len(rows) > MAX_ROWS:
            raise RuntimeError(f"llama.cpp runner: at most {MAX_TOKENS} tokens and {MAX_ROWS} rows a call")
        k = 0
        for s, r in enumerate(rows):
            for p, t in enumerate(r):
                b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = int(t), p, 1, int(p == len(r) - 1)
                b.seq_id[k][0] = s
                k += 1
        b.n_tokens = n

        def run():
            L.llama_memory_clear(self.mem, True)
            rc = L.llama_decode(self.ctx, b)
            if rc:
                raise RuntimeError(f"llama_decode returned {rc}")
            out = np.empty((len(rows), self.dim), np.float32)
            for s in range(len(rows)):
                out[s] = np.ctypeslib.as_array(L.llama_get_embeddings_seq(self.ctx, s), shape=(self.dim,))
            return unit(out)
        return run

    def info(self):
        return {"versions": versions("numpy", "llama_cpp_python", "gguf"),
                "system_info": self.L.llama_print_system_info().decode(), "threads": self.a.threads}


def handle(s, req, prep_s):
    if req["cmd"] == "embed":
        run = s.prepare([list(map(int, r)) for r in req["rows"]])
        vectors = run()  # untimed: the first call of a shape
        ms = timed_ms(run, int(req.get("n", 1)))
        return {"ok": True, "ms": ms, "vectors": np.asarray(vectors, np.float64).round(6).tolist()}
    if req["cmd"] == "info":
        return {"ok": True, **s.info(), "prep_s": prep_s}
    raise ValueError(f"unknown command {req['cmd']!r}")


def main() -> int:
    threads_from_argv()
    ap = arg_parser(SYSTEMS)
    ap.add_argument("--precision", default="int8-row", help="millis: a native decoder precision")
    a = ap.parse_args()
    return serve(lambda: SYSTEMS[a.system](a), handle, f"{a.system} {a.model_dir}")


if __name__ == "__main__":
    sys.exit(main())
