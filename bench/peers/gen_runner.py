"""One text-generation system in its own process, speaking JSON lines on stdin/stdout
(bench/generation.py starts it through harness.Peer).

    <venv python> bench/peers/gen_runner.py --system NAME --precision P --model-dir DIR --work-dir DIR \
        --threads 2 --device cpu --max-batch 32 --max-seq 640

Systems (each imports its own libraries in prepare(), so each may live in its own venv):
  millis    millis.gen's engine (main venv); precision fp32 | int8 | bf16 (cuda: bf16 | fp32)
  hf        transformers `generate`, eager; precision fp32 | bf16, or static-compile (static cache, and
            `generate`'s own torch.compile of the decode forward: CUDA only, eager elsewhere)
  ct2       CTranslate2 `Generator.generate_batch` (ct2 venv); precision = compute_type (int8, float32, ...)
Startup: prepare, print {"ok":true,"ready":true,...}. Then per line:
  {"cmd":"gen","prompts":[[ids]..],"new_tokens":N,"n":R,"warmup":W}
      -> {"ok":true,"ms":[R wall-clock ms of one whole call: prefill + N greedy tokens per row],
          "tokens":[[the N ids of each row] of the last call]}
  {"cmd":"info"} -> {"ok":true,"system","precision","versions","prep_s",...};  {"cmd":"quit"}
Every system decodes greedily exactly N new tokens per row (EOS ignored) from equal-length prompts.
"""
import json, os, sys, time

from protocol import arg_parser, registry, serve, threads_from_argv, timed_ms, versions  # bench/peers/ is the script's own folder

SYSTEMS, system = registry()


def log(*a):
    print("[gen_runner]", *a, file=sys.stderr, flush=True)


class Base:
    pkgs = ()

    def __init__(self, a):
        self.a, self.precision, self.threads = a, a.precision, a.threads

    def sync(self):
        pass

    def extra_info(self):
        return {}


@system("millis")
class Millis(Base):
    pkgs = ("torch",)

    def prepare(self):
        import torch
        from millis.gen import EngineConfig, SamplingParams, open_engine
        from millis.gen.engine import run_all
        self.torch, self.SamplingParams, self.run_all = torch, SamplingParams, run_all
        variant = self.precision  # fp32 | int8 (native C step) | fp32-torch | int8-torch | bf16 (torch)
        if variant == "fp32-torch":
            os.environ["MILLIS_NO_KERNELS"] = "1"  # the torch model in fp32 (millis.gen.load.runs_native)
        dtype = "bf16" if variant == "bf16" else "fp32"
        quant = variant if variant in ("int8", "int8-torch") else "none"
        self.eng = open_engine(self.a.model_dir, EngineConfig(
            max_batch=self.a.max_batch, max_seq=self.a.max_seq, dtype=dtype, quant=quant, threads=self.threads,
            device=self.a.device, max_prefills_per_step=self.a.max_batch))

    def generate(self, prompts, n):
        return self.run_all(self.eng, prompts, self.SamplingParams(max_tokens=n, ignore_eos=True))

    def extra_info(self):
        m = self.eng.model
        return {"runtime": type(m).__name__, "isa": getattr(m, "isa", None)}


@system("hf")
class HF(Base):
    pkgs = ("torch", "transformers")

    def prepare(self):
        import torch
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(self.threads)
        self.torch, dev = torch, self.a.device
        dtype = torch.bfloat16 if self.precision == "bf16" or (dev == "cuda" and self.precision != "fp32") \
            else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(self.a.model_dir, dtype=dtype).to(dev).eval()
        self.kw = {}
        if self.precision == "static-compile":
            # HF's own recipe: a static cache, and `generate` compiles the decode forward itself (CUDA graphs,
            # "reduce-overhead") after initialising the cache outside the capture. Compiling `model.forward` by
            # hand instead lets the cache's lazy init run inside a captured graph, whose pool then overwrites
            # it (the H200 run: "accessing tensor output of CUDAGraphs that has been overwritten")
            from transformers import CompileConfig
            self.model.generation_config.cache_implementation = "static"
            self.model.generation_config.compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead")

    def sync(self):
        if self.a.device == "cuda":
            self.torch.cuda.synchronize()

    def generate(self, prompts, n):
        t = self.torch
        ids = t.tensor(prompts, device=self.a.device)
        with t.inference_mode():
            out = self.model.generate(ids, attention_mask=t.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=0, **self.kw)
        return out[:, ids.shape[1]:].tolist()


@system("ct2")
class CT2(Base):
    pkgs = ("ctranslate2", "transformers", "torch")

    def prepare(self):
        import ctranslate2
        from transformers import AutoTokenizer
        quant = {"float32": "float32"}.get(self.precision, self.precision)
        path = os.path.join(self.a.work_dir, f"ct2_{quant}")
        if not os.path.exists(os.path.join(path, "done")):
            from ctranslate2.converters import TransformersConverter
            t0 = time.perf_counter()
            TransformersConverter(self.a.model_dir).convert(path, quantization=quant, force=True)
            with open(os.path.join(path, "done"), "w") as f:
                json.dump({"convert_s": time.perf_counter() - t0}, f)
        self.ct2 = ctranslate2
        self.gen = ctranslate2.Generator(path, device=self.a.device, compute_type=self.precision,
                                         intra_threads=self.threads, inter_threads=1)
        tok = AutoTokenizer.from_pretrained(self.a.model_dir)
        self.vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
        self.precision = f"{self.precision} (compute_type={self.gen.compute_type})"

    def extra_info(self):
        return {"supported_compute_types": sorted(self.ct2.get_supported_compute_types(self.a.device))}

    def generate(self, prompts, n):
        toks = [[self.vocab[i] for i in p] for p in prompts]
        res = self.gen.generate_batch(toks, max_length=n, min_length=n, sampling_topk=1, beam_size=1,
                                      include_prompt_in_result=False)
        return [r.sequences_ids[0] for r in res]


def handle(s, req, prep_s):
    cmd = req.get("cmd")
    if cmd == "gen":
        prompts, n = req["prompts"], int(req["new_tokens"])
        for _ in range(int(req.get("warmup", 0))):
            s.generate(prompts, n)
        s.sync()
        last = []

        def call():  # one whole call, the device synced: its tokens kept for the reply
            last[:] = [s.generate(prompts, n)]
            s.sync()
        ms = timed_ms(call, int(req["n"]))
        return {"ok": True, "ms": ms, "tokens": last[0] if last else None}
    if cmd == "info":
        return {"ok": True, "system": s.a.system, "precision": s.precision, "versions": versions(*s.pkgs),
                "prep_s": prep_s, "threads": s.threads, "extra": s.extra_info()}
    return {"ok": False, "error": f"unknown cmd {cmd!r}"}


def main():
    ap = arg_parser(SYSTEMS)
    ap.add_argument("--precision", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-seq", type=int, default=640)
    a = ap.parse_args()

    def make():
        s = SYSTEMS[a.system](a)
        s.prepare()
        return s
    return serve(make, handle, f"{a.system} {a.precision}")


if __name__ == "__main__":
    threads_from_argv()
    sys.exit(main())
