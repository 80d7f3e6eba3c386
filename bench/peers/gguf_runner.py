"""One GGUF decoder (millis or llama.cpp) on one file, in its own process, speaking JSON lines on
stdin/stdout (bench/generation_gguf.py starts it through harness.Peer).

    .venv/bin/python bench/peers/gguf_runner.py --system millis --model-dir FILE.gguf --work-dir DIR --threads 2
    bench/.venvs/llamacpp/bin/python bench/peers/gguf_runner.py --system llamacpp --model-dir FILE.gguf ...

Both systems sit behind one call, `forward(ids, pos, seqs, rows)`: one step over a flat batch of tokens
(each at its position in its sequence) returning the logits of the batch rows `rows` (len(rows), vocab).
millis: NativeLlama.forward_flat; llama.cpp: llama_decode on a llama_batch (the low-level binding, so
neither side pays for a high-level wrapper). Every measurement below is the same code over that call.
Requests (one per line; replies {"ok":true,...}):
  {"cmd":"warm"}                                    one of each below, small, untimed
  {"cmd":"decode","prompt":[ids],"steps":N}         -> ms [N] per greedy batch-1 step, tokens [N]
  {"cmd":"prefill","ids":[ids],"n":R}               -> ms [R]: a fresh sequence each, logits of the last row
  {"cmd":"batch","prompts":[[ids] x B],"steps":N}   -> ms [N] per step of B sequences (one token each)
  {"cmd":"ppl","ids":[ids],"windows":[[b,e,f]..]}   -> nll (sum), tokens, argmax [..], s
  {"cmd":"greedy","prompts":[[ids]..],"n":N}        -> tokens [[N ids]..]
  {"cmd":"info"}; {"cmd":"quit"}
Only the stdlib and numpy are imported at top level: the llama.cpp runner lives in its own venv.
"""
import ctypes, math, os, re, sys, time

import numpy as np

from protocol import arg_parser, registry, serve, threads_from_argv, timed_ms, versions  # bench/peers/ is the script's own folder

CHUNK = 512  # most tokens per forward call (millis's NativeLlama.CHUNK; llama.cpp's n_batch here)
SYSTEMS, system = registry()


@system("millis")
class Millis:
    def __init__(self, a):
        from millis.gen import EngineConfig, open_engine

        self.a = a
        self.eng = open_engine(a.model_dir, EngineConfig(max_batch=a.max_batch, max_seq=a.max_seq, threads=a.threads,
                                                         quant=a.quant))
        self.m = self.eng.model
        self.vocab = self.m.config.vocab_size

    def begin(self, seq, n_pos):
        if not self.m.kv.reserve(seq, n_pos):
            raise RuntimeError(f"millis: the KV pool cannot hold {n_pos} positions in slot {seq}")

    def end(self, seq):
        self.m.kv.release(seq)

    def forward(self, ids, pos, seqs, rows):
        return self.m.forward_flat(*(np.asarray(x, np.int32) for x in (ids, pos, seqs, rows)))

    def ppl(self, ids, wins):
        from millis.gen.perplexity import score_ids, windows

        if [list(w) for w in windows(len(ids), self.a.context, self.a.stride)] != [list(w) for w in wins]:
            raise RuntimeError("millis's windows() differs from the windows sent")
        t0 = time.perf_counter()
        p = score_ids(self.eng, ids, self.a.context, self.a.stride)
        return p.nll * p.tokens, p.tokens, p.argmax, time.perf_counter() - t0

    def info(self):
        from millis.common.hardware import describe

        c = self.m.config
        return {"versions": versions("numpy", "torch", "gguf"), "isa": self.m.isa, "threads": self.m.threads,
                "quant": self.a.quant, "kv": f"fp32 paged, {self.m.kv.n_blocks} blocks of {self.m.kv.block_size}",
                "config": {"dim": c.dim, "layers": c.n_layers, "heads": c.n_heads, "kv_heads": c.n_kv_heads,
                           "hidden": c.hidden_dim, "vocab": c.vocab_size}, "machine": describe()}


KEEP_LOG = re.compile(r"Flash Attention|flash_attn +=|n_ctx_seq +=|kv_unified|K \(f|REPACK|model buffer size|"
                      r"compute buffer size")
REPACK = re.compile(r"repack tensor \S+ with (\S+)")


@system("llamacpp")
class LlamaCpp:
    def __init__(self, a):
        import llama_cpp as L

        self.L, self.a, self.log, self.repacked = L, a, [], {}

        def on_log(level, text, user):  # keep the lines that say what llama.cpp chose; drop the rest
            line = (text or b"").decode("utf-8", "replace").rstrip()
            if m := REPACK.search(line):  # one line per tensor: counted per layout instead
                self.repacked[m.group(1)] = self.repacked.get(m.group(1), 0) + 1
            elif KEEP_LOG.search(line) and "input tensor" not in line and len(self.log) < 40:
                self.log.append(line)
        self._cb = L.llama_log_callback(on_log)  # referenced for the process's life
        L.llama_log_set(self._cb, ctypes.c_void_p(0))
        from llamacpp_model import open_model  # bench/peers/

        self.model = open_model(L, a.model_dir)
        cp = L.llama_context_default_params()
        # n_seq_max sequences of max_seq positions each (llama.cpp splits n_ctx among them: kv_unified off)
        cp.n_ctx, cp.n_seq_max = a.max_seq * a.max_batch, a.max_batch
        cp.n_batch = cp.n_ubatch = CHUNK
        cp.n_threads = cp.n_threads_batch = a.threads
        cp.flash_attn_type = {"auto": -1, "off": 0, "on": 1}[a.flash_attn]
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.mem = L.llama_get_memory(self.ctx)
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(CHUNK, 0, 1)
        for i in range(CHUNK):
            self.batch.n_seq_id[i] = 1
            self.batch.seq_id[i][0] = 0
        self.seq_at = [0] * CHUNK  # seq id currently written at each batch index
        self.flags = np.zeros(CHUNK, np.int8)

    def begin(self, seq, n_pos):
        if n_pos > self.a.max_seq:
            raise RuntimeError(f"llama.cpp: {n_pos} positions exceed the {self.a.max_seq} per sequence")

    def end(self, seq):
        self.L.llama_memory_seq_rm(self.mem, seq, -1, -1)

    def forward(self, ids, pos, seqs, rows):
        b, n = self.batch, len(ids)
        if n > CHUNK:  # the batch was allocated for CHUNK tokens: more would be written past it
            raise RuntimeError(f"llama.cpp: {n} tokens in one call, its batch holds {CHUNK}")
        ids, pos = np.ascontiguousarray(ids, np.int32), np.ascontiguousarray(pos, np.int32)
        ctypes.memmove(b.token, ids.ctypes.data, 4 * n)
        ctypes.memmove(b.pos, pos.ctypes.data, 4 * n)
        for i, s in enumerate(seqs):
            if self.seq_at[i] != s:
                b.seq_id[i][0] = self.seq_at[i] = int(s)
        self.flags[:n] = 0
        self.flags[np.asarray(rows, np.int64)] = 1
        ctypes.memmove(b.logits, self.flags.ctypes.data, n)
        b.n_tokens = n
        rc = self.L.llama_decode(self.ctx, b)
        if rc:
            raise RuntimeError(f"llama_decode returned {rc}")
        # rows come back in batch order; the view is valid until the next decode
        return np.ctypeslib.as_array(self.L.llama_get_logits(self.ctx), shape=(len(rows), self.vocab))

    def ppl(self, ids, wins):
        nll, count, top = 0.0, 0, []
        t0 = time.perf_counter()
        for begin, end, first in wins:
            self.begin(0, end - begin)
            rows = np.arange(first - 1 - begin, end - 1 - begin)
            lg = self.forward(ids[begin:end], np.arange(end - begin), [0] * (end - begin), rows).astype(np.float64)
            self.end(0)
            mx = lg.max(1)
            lse = mx + np.log(np.exp(lg - mx[:, None]).sum(1))
            nll += float((lse - lg[np.arange(len(rows)), ids[first:end]]).sum())
            top += lg.argmax(1).tolist()
            count += end - first
        return nll, count, top, time.perf_counter() - t0

    def info(self):
        L = self.L
        return {"versions": versions("numpy", "llama_cpp_python", "gguf"),
                "system_info": L.llama_print_system_info().decode(), "threads": self.a.threads,
                "flash_attn": self.a.flash_attn, "log": self.log, "repacked_tensors": self.repacked}


# ------------------------------------------------------------------------------------------ measurements
def prefill(s, seq, ids, extra=0):
    """ids as a fresh sequence `seq` (chunks of CHUNK) -> logits of the last token."""
    s.begin(seq, len(ids) + extra)
    for c0 in range(0, len(ids), CHUNK):
        c1 = min(len(ids), c0 + CHUNK)
        lg = s.forward(ids[c0:c1], np.arange(c0, c1), [seq] * (c1 - c0), [c1 - c0 - 1])
    return lg[0]


def decode(s, prompt, steps):
    n, ms, toks = len(prompt), [], []
    tok = int(np.argmax(prefill(s, 0, prompt, steps)))
    pc = time.perf_counter
    for i in range(steps):
        toks.append(tok)
        t0 = pc()
        lg = s.forward([tok], [n + i], [0], [0])
        ms.append((pc() - t0) * 1e3)
        tok = int(np.argmax(lg[0]))
    s.end(0)
    return ms, toks


def batch(s, prompts, steps):
    B, n = len(prompts), len(prompts[0])
    for q in range(B):
        s.begin(q, n + steps)
    flat = [t for p in prompts for t in p]
    lg = s.forward(flat, np.tile(np.arange(n), B), np.repeat(np.arange(B), n), np.arange(B) * n + n - 1)
    toks, ms, pc = lg.argmax(1), [], time.perf_counter
    for i in range(steps):
        t0 = pc()
        lg = s.forward(toks, np.full(B, n + i), np.arange(B), np.arange(B))
        ms.append((pc() - t0) * 1e3)
        toks = lg.argmax(1)
    for q in range(B):
        s.end(q)
    return ms


def prefill_ms(s, ids, reps):
    def once():
        prefill(s, 0, ids)
    out = []
    for _ in range(reps):  # a fresh sequence each time; clearing it is not timed
        out += timed_ms(once, 1)
        s.end(0)
    return out


def greedy(s, prompt, n):
    tok, out = int(np.argmax(prefill(s, 0, prompt, n))), []
    for i in range(n):
        out.append(tok)
        tok = int(np.argmax(s.forward([tok], [len(prompt) + i], [0], [0])[0]))
    s.end(0)
    return out


def handle(s, req, prep_s):
    cmd = req.get("cmd")
    if cmd == "warm":
        ids = list(range(10, 138))
        decode(s, ids[:16], 8), prefill_ms(s, ids, 1), batch(s, [ids[:16]] * min(8, s.a.max_batch), 4)
        return {"ok": True}
    if cmd == "decode":
        ms, toks = decode(s, req["prompt"], int(req["steps"]))
        return {"ok": True, "ms": ms, "tokens": toks}
    if cmd == "prefill":
        return {"ok": True, "ms": prefill_ms(s, req["ids"], int(req.get("n", 1)))}
    if cmd == "batch":
        return {"ok": True, "ms": batch(s, req["prompts"], int(req["steps"]))}
    if cmd == "ppl":
        nll, count, top, secs = s.ppl(list(req["ids"]), [tuple(w) for w in req["windows"]])
        return {"ok": True, "nll": nll, "tokens": count, "argmax": top, "s": secs,
                "perplexity": math.exp(nll / count)}
    if cmd == "greedy":
        return {"ok": True, "tokens": [greedy(s, p, int(req["n"])) for p in req["prompts"]]}
    if cmd == "info":
        return {"ok": True, "system": s.a.system, "file": s.a.model_dir, "prep_s": prep_s, "pid": os.getpid(),
                "vocab": s.vocab, **s.info()}
    return {"ok": False, "error": f"unknown cmd {cmd!r}"}


def main():
    ap = arg_parser(SYSTEMS)
    ap.add_argument("--quant", default="none", help="millis: none | int8 (its own Q8_0 of the float matrices)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-seq", type=int, default=1024)
    ap.add_argument("--context", type=int, default=512, help="perplexity window (millis checks its windows)")
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--flash-attn", default="auto", choices=("auto", "on", "off"), help="llama.cpp")
    a = ap.parse_args()
    if a.system == "llamacpp" and a.context > CHUNK:  # a perplexity window is one forward call
        ap.error(f"--context {a.context}: llama.cpp's batch holds {CHUNK} tokens a call (--context <= {CHUNK})")
    return serve(lambda: SYSTEMS[a.system](a), handle, f"{a.system} {os.path.basename(a.model_dir)}")


if __name__ == "__main__":
    threads_from_argv()
    sys.exit(main())
