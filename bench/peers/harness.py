"""Talks to peer runner processes (main venv; imported by bench/cpu_encoders.py).

Peer(system, model_dir) starts `<that system's venv python> bench/peers/runner.py ...` and waits
for it to prepare its model. Every request has a timeout; a peer that errors at startup, dies or
hangs is killed and marked failed (peer.error holds the reason) -- it never hangs the benchmark.
Arrays: ids / mask are int b x s (numpy or nested lists); embeddings come back float32 b x hidden.
"""
import csv, json, os, queue, random, subprocess, sys, threading, time
import numpy as np

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(BENCH)
VENVS = os.path.join(BENCH, ".venvs")
RUNNER = os.path.join(BENCH, "peers", "runner.py")
DEFAULT_WORK = os.path.join(BENCH, ".cache", "peers")
MAIN_PY = os.path.join(REPO, ".venv", "bin", "python")
# system -> venv under bench/.venvs (None: the main venv)
SYSTEM_VENV = {"torch_eager": None, "millis": None, "optimum_o3_int8": "optimum",
               "openvino_default": "openvino", "openvino_nncf_int8": "openvino", "ct2_int8": "ct2",
               "fastembed": "fastembed"}
PEER_SYSTEMS = ("torch_eager", "optimum_o3_int8", "openvino_default", "openvino_nncf_int8", "ct2_int8",
                "fastembed")


class PeerError(RuntimeError):
    pass


def peer_python(system, venv="?"):
    """(python path, None) or (None, reason the venv is unusable). `venv`: its name under bench/.venvs,
    None for the main venv; by default SYSTEM_VENV's entry for `system`."""
    venv = SYSTEM_VENV.get(system, "?") if venv == "?" else venv
    if venv == "?":
        return None, f"unknown system {system!r}"
    if venv is None:
        return (MAIN_PY if os.path.exists(MAIN_PY) else sys.executable), None
    d = os.path.join(VENVS, venv)
    fail = os.path.join(d, ".millis-fail")
    if os.path.exists(fail):
        return None, f"venv {venv} setup failed: " + open(fail).read().strip()
    if not os.path.exists(os.path.join(d, ".millis-ok")):
        return None, f"venv {venv} not set up (run: bash bench/peers/setup.sh {venv})"
    return os.path.join(d, "bin", "python"), None


class Peer:
    def __init__(self, system, model_dir, work_dir=DEFAULT_WORK, threads=2, name=None,
                 start_timeout=1800.0, timeout=600.0, log_dir=None, runner=RUNNER, args=(), venv="?"):
        """`runner`, `args`, `venv`: another runner script (bench/peers/gen_runner.py), its extra
        command-line arguments and its venv (None: the main one; default: SYSTEM_VENV[system])."""
        self.system, self.name = system, name or system
        self.runner, self.args, self.venv = runner, list(args), venv
        self.model_dir, self.work_dir, self.threads = model_dir, work_dir, threads
        self.timeout = timeout          # default per-request limit, seconds
        self.error = None               # set once the peer failed or was skipped; then it is dead
        self.proc = None
        self.log_path = os.path.join(log_dir or os.path.join(work_dir, "logs"), f"{self.name}.log")
        self.prep_s = None
        self._start(start_timeout)

    @property
    def alive(self):
        return self.error is None

    def _start(self, start_timeout):
        py, why = peer_python(self.system, self.venv)
        if why:
            self.error = why
            return
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # main venv: make the repo's millis importable
        if (SYSTEM_VENV.get(self.system) if self.venv == "?" else self.venv) is None:
            env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        self._log = open(self.log_path, "a")
        self._log.write(f"\n=== {time.ctime()} start {self.system} on {self.model_dir}\n")
        self._log.flush()
        cmd = [py, self.runner, "--system", self.system, "--model-dir", str(self.model_dir),
               "--work-dir", str(self.work_dir), "--threads", str(self.threads)] + self.args
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, cwd=REPO, env=env, bufsize=1)
        self._lines = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            ready = self._read(start_timeout, starting=True)
            self.prep_s = ready.get("prep_s")
        except PeerError:
            pass  # self.error already set and the process killed

    def _pump(self):  # stdout lines -> queue; None at EOF
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _fail(self, reason):
        if self.error is None:
            tail = ""
            try:
                self._log.flush()
                with open(self.log_path) as f:
                    tail = " | log tail: " + " / ".join(l.strip() for l in f.readlines()[-4:])
            except OSError:
                pass
            self.error = reason + tail
        self.close(kill=True)
        raise PeerError(f"{self.name}: {self.error}")

    def _read(self, timeout, starting=False):
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self._fail(f"timed out after {timeout:.0f}s")
        if line is None:
            self._fail(f"runner exited (rc={self.proc.poll()})")
        try:
            reply = json.loads(line)
        except ValueError:
            self._fail(f"bad reply line: {line[:200]!r}")
        if not reply.get("ok"):
            if starting:  # prepare failed: the runner exits
                self._fail(str(reply.get("error")))
            raise PeerError(f"{self.name}: {reply.get('error')}")  # request error; peer lives on
        return reply

    def request(self, obj, timeout=None):
        if self.error is not None:
            raise PeerError(f"{self.name}: {self.error}")
        try:
            self.proc.stdin.write(json.dumps(obj) + "\n")
            self.proc.stdin.flush()
        except OSError as e:
            self._fail(f"runner stdin closed: {e}")
        return self._read(timeout or self.timeout)

    @staticmethod
    def _rows(a):
        return np.asarray(a, dtype=np.int64).tolist()

    def time(self, ids, mask, n, warmup=0, timeout=None):
        """n timed inference calls on exactly ids/mask (b x s) after `warmup` untimed ones -> list of n ms."""
        return self.request({"cmd": "time", "input_ids": self._rows(ids), "attention_mask": self._rows(mask),
                             "n": int(n), "warmup": int(warmup)}, timeout)["ms"]

    def embed(self, ids, mask, timeout=None):
        """mean-pooled, L2-normalised sentence embeddings -> float32 array b x hidden."""
        r = self.request({"cmd": "embed", "input_ids": self._rows(ids),
                          "attention_mask": self._rows(mask)}, timeout)
        return np.asarray(r["emb"], dtype=np.float32)

    def info(self, timeout=60):
        """{"system","precision","versions":{pkg: version},"prep_s","threads","work_dir","extra"}"""
        return self.request({"cmd": "info"}, timeout)

    def close(self, kill=False):
        p, self.proc = self.proc, None
        if p is None:
            return
        if kill and p.poll() is None:
            p.kill()
            p.wait()
        if p.poll() is None:
            try:
                p.stdin.write('{"cmd":"quit"}\n')
                p.stdin.flush()
                p.wait(timeout=10)
            except Exception:
                p.kill()
                p.wait()
        if self.error is None:
            self.error = "closed"
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start_peers(systems, model_dir, **kw):
    """Start each system one after another -> (live peers list, {name: reason} for skipped/failed)."""
    live, skipped = [], {}
    for s in systems:
        p = Peer(s, model_dir, **kw)
        (live.append(p) if p.alive else skipped.__setitem__(p.name, p.error))
    return live, skipped


def run_round_robin(peers, shapes, inputs, n_per_round, rounds, warmup=5, rewarm=1, timeout=None, seed=0,
                    pause=0.005, done=None):
    """Interleave systems so machine drift hits all alike.

    Round r: for each shape (b, s), the live peers in a seeded random order drawn for that round (a cyclic
    rotation would make each system always follow the same one), a `pause` before each turn (the previous
    system's spinning threads park, as millis.optimize.measure does), then `n_per_round` timed calls
    (after `warmup` untimed calls in round 0, `rewarm` in later rounds).
    inputs: {(b, s): (ids, mask)}. Returns {(peer.name, (b, s)): [ms, ...]} with
    n_per_round * rounds samples each; a peer that fails mid-run keeps its samples so far,
    gets peer.error set, and is left out of later calls. `done` (a dict): {peer.name: rounds it completed
    at every shape}, filled as it goes.
    """
    rng = random.Random(seed)
    samples = {(p.name, tuple(sh)): [] for p in peers for sh in shapes}
    done = {} if done is None else done
    done.update({p.name: 0 for p in peers})
    for r in range(rounds):
        order = list(peers)
        rng.shuffle(order)
        for sh in shapes:
            ids, mask = inputs[tuple(sh)]
            for p in order:
                if not p.alive:
                    continue
                time.sleep(pause)
                try:
                    samples[(p.name, tuple(sh))] += p.time(ids, mask, n_per_round,
                                                           warmup if r == 0 else rewarm, timeout)
                except PeerError as e:
                    print(f"[harness] {e}", file=sys.stderr)
                    if p.alive:  # a request error on a live peer: count it as failed too
                        p.error = str(e)
                        p.close()
        for p in peers:
            if p.alive:
                done[p.name] = r + 1
    return samples


# ---- data -----------------------------------------------------------------------------------
def data_root():
    return os.environ.get("MILLIS_DATA") or os.path.join(os.path.dirname(REPO), "shared", "data")


def banking77_spread(n, split="test"):
    """n texts spread over the file (it is sorted by category), the same ones for every caller."""
    every = banking77_texts(split)
    return every[::max(1, len(every) // n)][:n]


# one- to four-word queries: where one activation scale per token loses most (mean pooling over three tokens, two
# of them [CLS] and [SEP]; docs/encoders.md, "a fourteenth session")
SHORT_QUERIES = ["ok", "hi", "yes", "no", "thanks", "help", "card", "ok thanks", "where is my card", "hello there"]


def short_texts(split="test"):
    """SHORT_QUERIES, then the split's Banking77 texts of at most three words (11 in test.csv)."""
    return SHORT_QUERIES + [t for t in banking77_texts(split) if len(t.split()) <= 3]


def banking77_texts(split="test", limit=None):
    with open(os.path.join(data_root(), "banking77", f"{split}.csv"), newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    return texts[:limit] if limit else texts


def texts_for_shape(tokenizer, texts, b, s):
    """(ids, mask), each int64 b x s, mask all ones: every row is [CLS] + real text tokens
    (consecutive texts concatenated until s-2 tokens are filled, then truncated) + [SEP],
    so the shape really is s tokens with no padding. Rows continue through the text list."""
    toks = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    toks = [t for t in toks if t]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    ids, pos = np.zeros((b, s), dtype=np.int64), 0
    for i in range(b):
        body = []
        while len(body) < s - 2:
            body += toks[pos % len(toks)]
            pos += 1
        ids[i] = ([cls] + body[: max(s - 2, 0)] + [sep])[:s] if s >= 2 else [cls][:s]
    return ids, np.ones((b, s), dtype=np.int64)


def tokenize(tokenizer, texts, max_length=256):
    """Ordinary padded batch (for embedding checks) -> (ids, mask), int64 b x longest."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def row_cosines(a, b):
    """cosine of each row of a with the same row of b -> float array (b,)."""
    from millis.common.numeric import row_cosines as cosines  # the main venv has millis

    return cosines(np.asarray(a, np.float64), np.asarray(b, np.float64))
