"""Peer systems for runner.py, one class each, registered by name in SYSTEMS.

A system class: prepare() builds/loads its model (heavy imports happen here, since each system
lives in its own venv); feed(ids, mask) turns b x s int rows into its native inputs (untimed);
run(feed) is the single timed inference call; hidden(out) -> numpy last hidden state b x s x H
(or, when outputs_embedding is True, the already pooled+normalised embedding b x H).
self.work is a folder unique to (model dir content hash); cached() builds into it once.
"""
import json, os, sys, time

SYSTEMS = {}  # name -> class; a class has prepare(), feed(ids, mask), run(feed), hidden(out)


def system(name):
    def deco(cls):
        SYSTEMS[name] = cls
        cls.name = name
        return cls
    return deco


def log(*a):
    print("[runner]", *a, file=sys.stderr, flush=True)


def data_root():
    env = os.environ.get("MILLIS_DATA")
    if env:
        return env
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(os.path.dirname(repo), "shared", "data")


def banking77(split, limit):
    import csv
    with open(os.path.join(data_root(), "banking77", f"{split}.csv"), newline="") as f:
        return [r["text"] for r, _ in zip(csv.DictReader(f), range(limit))]


def pooling_mode(model_dir):
    """"cls" when the model dir's sentence-transformers pooling takes the [CLS] token, else "mean" (MiniLM's)."""
    path = os.path.join(model_dir, "1_Pooling", "config.json")
    if os.path.exists(path):
        with open(path) as f:
            if json.load(f).get("pooling_mode_cls_token"):
                return "cls"
    return "mean"


class Base:
    precision = "fp32"
    pkgs = ()
    outputs_embedding = False  # True: hidden() already returns the pooled+normalised embedding

    def __init__(self, model_dir, work_dir, threads):
        self.model_dir, self.threads = model_dir, threads
        self.work = work_dir  # set per model hash by main()

    def cached(self, sub, build):
        """Run build(path) once into work/sub; a 'done' marker makes reruns skip it."""
        path = os.path.join(self.work, sub)
        if not os.path.exists(os.path.join(path, "done")):
            t0 = time.perf_counter()
            os.makedirs(path, exist_ok=True)
            build(path)
            with open(os.path.join(path, "done"), "w") as f:
                json.dump({"build_s": time.perf_counter() - t0}, f)
            log(f"built {sub} in {time.perf_counter() - t0:.1f}s")
        return path

    def extra_info(self):
        return {}


@system("torch_eager")
class TorchEager(Base):
    pkgs = ("torch", "transformers")

    def prepare(self):
        import torch
        from transformers import AutoModel
        torch.set_num_threads(self.threads)
        self.torch = torch
        self.model = AutoModel.from_pretrained(self.model_dir).float().eval()

    def feed(self, ids, mask):
        t = self.torch
        ids = t.as_tensor(ids, dtype=t.long)
        return dict(input_ids=ids, attention_mask=t.as_tensor(mask, dtype=t.long),
                    token_type_ids=t.zeros_like(ids))

    def run(self, feed):
        with self.torch.inference_mode():
            return self.model(**feed).last_hidden_state  # b x s x hidden

    def hidden(self, out):
        return out.float().numpy()


@system("optimum_o3_int8")
class OptimumO3Int8(Base):
    precision = "int8 dynamic (u8 activations, s8 weights, per-tensor), ORT O3 graph"
    pkgs = ("optimum-onnx", "optimum", "onnxruntime", "onnx", "transformers", "torch")

    def prepare(self):
        import onnxruntime as ort
        path = self.cached("optimum_o3_int8", self._build)
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        self.sess = ort.InferenceSession(os.path.join(path, "model_optimized_quantized.onnx"), so,
                                         providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.sess.get_inputs()}

    def _build(self, path):
        # Optimum's documented flow: export -> ORTOptimizer(O3) -> ORTQuantizer(dynamic int8)
        from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTOptimizer, ORTQuantizer
        from optimum.onnxruntime.configuration import AutoOptimizationConfig, AutoQuantizationConfig
        exported = ORTModelForFeatureExtraction.from_pretrained(self.model_dir, export=True)
        ORTOptimizer.from_pretrained(exported).optimize(
            save_dir=path, optimization_config=AutoOptimizationConfig.O3())
        qconfig = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)
        # Known Optimum bug (sentence-transformers#2598, optimum PR #1959): after O3 the graph has
        # com.microsoft fused ops whose outputs ONNX shape inference cannot type, so the ORT
        # quantizer raises "Unable to find data type for weight_name=...". ORT's own remedy is
        # extra_options DefaultTensorType=FLOAT, which ORTQuantizer does not expose: inject it.
        import onnx
        import optimum.onnxruntime.quantization as oq
        base = oq.ONNXQuantizer

        class Quantizer(base):
            def __init__(self, *a, extra_options=None, **kw):
                extra = dict(extra_options or {}, DefaultTensorType=onnx.TensorProto.FLOAT)
                super().__init__(*a, extra_options=extra, **kw)
        oq.ONNXQuantizer = Quantizer
        try:
            ORTQuantizer.from_pretrained(path, file_name="model_optimized.onnx").quantize(
                save_dir=path, quantization_config=qconfig)
        finally:
            oq.ONNXQuantizer = base

    def feed(self, ids, mask):
        import numpy as np
        ids = np.asarray(ids, dtype=np.int64)
        f = dict(input_ids=ids, attention_mask=np.asarray(mask, dtype=np.int64),
                 token_type_ids=np.zeros_like(ids))
        return {k: v for k, v in f.items() if k in self.inputs}

    def run(self, feed):
        return self.sess.run(["last_hidden_state"], feed)[0]

    def hidden(self, out):
        return out


def ov_str(v):
    return v.get_type_name() if hasattr(v, "get_type_name") else str(v)


@system("openvino_default")
class OpenVINODefault(Base):
    pkgs = ("openvino", "nncf", "transformers", "torch")

    def _fp32_xml(self):
        # ov.convert_model straight from the HF torch model (dynamic shapes), saved with fp32
        # weights (compress_to_fp16=False) so "default" precision is what the CPU plugin picks.
        def build(path):
            import openvino as ov, torch
            from transformers import AutoModel
            model = AutoModel.from_pretrained(self.model_dir).float().eval()
            ex = torch.ones(1, 8, dtype=torch.long)
            ovm = ov.convert_model(model, example_input=dict(
                input_ids=ex, attention_mask=ex, token_type_ids=torch.zeros_like(ex)))
            ov.save_model(ovm, os.path.join(path, "model.xml"), compress_to_fp16=False)
        return os.path.join(self.cached("openvino_fp32", build), "model.xml")

    def model_xml(self):
        return self._fp32_xml()

    def prepare(self):
        import openvino as ov
        self.core = ov.Core()
        model = self.core.read_model(self.model_xml())
        self.input_names = [i.get_any_name() for i in model.inputs]
        self.compiled = self.core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": self.threads})
        self.req = self.compiled.create_infer_request()
        self.precision = ov_str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))  # e.g. f32 / bf16
        if self.name != "openvino_default":
            self.precision = "int8 (NNCF PTQ) + " + self.precision

    def extra_info(self):
        return {k: ov_str(self.compiled.get_property(k)) for k in
                ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "INFERENCE_NUM_THREADS",
                 "NUM_STREAMS")}

    def feed(self, ids, mask):
        import numpy as np
        ids = np.asarray(ids, dtype=np.int64)
        f = dict(input_ids=ids, attention_mask=np.asarray(mask, dtype=np.int64),
                 token_type_ids=np.zeros_like(ids))
        return {k: f[k] for k in self.input_names}

    def run(self, feed):
        self.req.infer(feed)
        return self.req.get_output_tensor(0).data  # last_hidden_state, b x s x hidden (view)

    def hidden(self, out):
        return out.copy()


@system("openvino_nncf_int8")
class OpenVINONNCFInt8(OpenVINODefault):
    def model_xml(self):
        fp32 = self._fp32_xml()

        def build(path):
            # NNCF PTQ per OpenVINO's BERT guidance: TRANSFORMER model type, MIXED preset
            # (symmetric weights, asymmetric activations: recommended for GELU-style activations).
            import nncf, numpy as np, openvino as ov
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(self.model_dir)
            texts = banking77("train", 300)
            names = [i.get_any_name() for i in ov.Core().read_model(fp32).inputs]

            def transform(text):  # one calibration item: batch 1, its own length
                enc = tok(text, truncation=True, max_length=256, return_tensors="np")
                f = {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}
                f.setdefault("token_type_ids", np.zeros_like(f["input_ids"]))
                return {k: f[k] for k in names}
            q = nncf.quantize(ov.Core().read_model(fp32), nncf.Dataset(texts, transform),
                              model_type=nncf.ModelType.TRANSFORMER,
                              preset=nncf.QuantizationPreset.MIXED, subset_size=len(texts))
            ov.save_model(q, os.path.join(path, "model.xml"), compress_to_fp16=False)
        return os.path.join(self.cached("openvino_nncf_int8", build), "model.xml")


@system("ct2_int8")
class CT2Int8(Base):
    precision = "int8"
    pkgs = ("ctranslate2", "transformers", "torch")

    def prepare(self):
        import ctranslate2
        def build(path):
            from ctranslate2.converters import TransformersConverter
            TransformersConverter(self.model_dir).convert(path, quantization="int8", force=True)
        path = self.cached("ct2_int8", build)
        self.ct2 = ctranslate2
        self.enc = ctranslate2.Encoder(path, device="cpu", compute_type="int8",
                                       intra_threads=self.threads, inter_threads=1)
        self.precision = f"int8 (compute_type={self.enc.compute_type})"

    def extra_info(self):
        return {"supported_compute_types": sorted(self.ct2.get_supported_compute_types("cpu"))}

    def feed(self, ids, mask):
        # CT2 takes ragged rows of ids: strip padding using the mask (it re-pads internally)
        rows = [[int(t) for t, m in zip(r, mr) if m] for r, mr in zip(ids, mask)]
        return rows, [[0] * len(r) for r in rows]

    def run(self, feed):
        return self.enc.forward_batch(feed[0], token_type_ids=feed[1])

    def hidden(self, out):
        import numpy as np
        return np.array(out.last_hidden_state)  # b x max_len x hidden


@system("fastembed")
class FastEmbed(Base):
    """Qdrant's fastembed (ONNX Runtime) as its users run a custom model, on the harness's token ids.

    Build (once, cached): optimum-onnx exports the local HF dir to model.onnx (library "transformers":
    last_hidden_state, not the sentence-transformers head), the tokenizer files beside it. Load: the
    documented custom-model route, TextEmbedding.add_custom_model(MEAN or CLS pooling, normalised) plus
    TextEmbedding(specific_model_path=<that dir>, threads=threads, local_files_only=True): fastembed
    builds the ORT session itself (its options: ORT_ENABLE_ALL, intra = inter = threads, CPU EP) and
    nothing is fetched from a hub. Inference skips fastembed's tokenizer so every system sees the same
    ids: run() does what its onnx_embed() does after tokenizing, through the model's own private
    methods _preprocess_onnx_input / _run_model / _post_process_onnx_output (no public API takes ids).
    Its pooling + L2 normalisation is inside run(), as in fastembed's embed(), hence outputs_embedding
    (the protocol's pooling: CLS where the model dir's 1_Pooling says so, else MEAN).
    """
    pkgs = ("fastembed", "onnxruntime", "optimum-onnx", "tokenizers")
    outputs_embedding = True
    FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json", "vocab.txt")

    def _export(self, path):
        import shutil
        from optimum.exporters.onnx import main_export
        main_export(self.model_dir, output=path, task="feature-extraction", library_name="transformers",
                    do_validation=False)  # the smoke test compares embeddings with torch_eager instead
        for f in self.FILES:  # what fastembed's load_tokenizer reads, if the export left any out
            if not os.path.exists(os.path.join(path, f)) and os.path.exists(os.path.join(self.model_dir, f)):
                shutil.copy(os.path.join(self.model_dir, f), path)

    def prepare(self):
        os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: nothing may come from a model hub
        path = self.cached("fastembed_onnx", self._export)
        import numpy as np
        from fastembed import TextEmbedding
        from fastembed.common.model_description import ModelSource, PoolingType
        from fastembed.common.onnx_model import OnnxOutputContext
        with open(os.path.join(self.model_dir, "config.json")) as f:
            dim = json.load(f)["hidden_size"]
        name = "millis-peer/" + os.path.basename(self.work)  # unique per model dir content
        pooling = PoolingType.CLS if pooling_mode(self.model_dir) == "cls" else PoolingType.MEAN
        TextEmbedding.add_custom_model(model=name, pooling=pooling, normalization=True,
                                       sources=ModelSource(hf=name), dim=dim, model_file="model.onnx")
        self.te = TextEmbedding(model_name=name, cache_dir=os.path.join(self.work, "fastembed_cache"),
                                threads=self.threads, providers=["CPUExecutionProvider"],
                                specific_model_path=path, local_files_only=True)
        self.m = self.te.model  # fastembed's CustomTextEmbedding
        self.np, self.ctx = np, OnnxOutputContext
        self.inputs = {i.name for i in self.m.model.get_inputs()}
        so = self.m.model.get_session_options()
        self.session = {"graph_optimization_level": str(so.graph_optimization_level),
                        "intra_op_num_threads": so.intra_op_num_threads,
                        "inter_op_num_threads": so.inter_op_num_threads,
                        "execution_mode": str(so.execution_mode), "providers": self.m.model.get_providers()}

    def extra_info(self):
        from importlib import metadata
        return {"fastembed": metadata.version("fastembed"), "onnxruntime": metadata.version("onnxruntime"),
                "class": type(self.m).__name__, **self.session}

    def feed(self, ids, mask):
        # the arrays fastembed's onnx_embed() builds from its encodings: int64, token types all 0
        np = self.np
        ids = np.asarray(ids, dtype=np.int64)
        f = {"input_ids": ids, "attention_mask": np.asarray(mask, dtype=np.int64),
             "token_type_ids": np.zeros_like(ids)}
        return self.m._preprocess_onnx_input({k: v for k, v in f.items() if k in self.inputs})

    def run(self, feed):
        out = self.m._run_model(onnx_input=feed, onnx_output_names=self.m.ONNX_OUTPUT_NAMES)  # b x s x H
        return self.m._post_process_onnx_output(self.ctx(model_output=out, attention_mask=feed["attention_mask"],
                                                         input_ids=feed["input_ids"]))  # b x H

    def hidden(self, out):
        return self.np.asarray(out, dtype=self.np.float32)  # b x hidden, mean-pooled + normalised


@system("millis")
class Millis(Base):
    pkgs = ("millis", "torch", "onnxruntime", "openvino")
    outputs_embedding = True

    def prepare(self):
        import millis
        self.art = millis.load(self.model_dir, threads=self.threads)  # threads=0 would take every CPU
        v = self.art.meta.variant
        self.precision = f"{v.name} ({v.runtime} {v.precision})"

    def extra_info(self):
        """The variant and what runs it: NativeBert's kernels (its build, +amx on tiles) and threads, or the
        library's session threads."""
        v, rt = self.art.meta.variant, self.art.runtime
        out = {"variant": v.name, "runtime": v.runtime, "precision": v.precision, "options": dict(v.options)}
        model = getattr(rt, "model", None)
        if v.runtime == "native" and model is not None:
            out.update(kernels=getattr(model, "kernels", None), threads=getattr(model, "threads", None),
                       attention={0: "fp32", 1: "bf16", 2: "int8"}.get(getattr(model, "attn", None)))  # ATTN_*
        session = getattr(rt, "session", None)
        if session is not None and hasattr(session, "get_session_options"):  # onnxruntime
            so = session.get_session_options()
            out.update(threads=so.intra_op_num_threads, inter_op_threads=so.inter_op_num_threads,
                       graph_optimization_level=str(so.graph_optimization_level))
        if v.runtime == "torch" and "torch" in sys.modules:
            out["threads"] = sys.modules["torch"].get_num_threads()
        return out

    def feed(self, ids, mask):
        import numpy as np
        ids = np.asarray(ids, dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.asarray(mask, dtype=np.int64),
                "token_type_ids": np.zeros_like(ids)}

    def run(self, feed):
        return self.art.runtime.run(feed)

    def hidden(self, out):
        import numpy as np
        return np.asarray(out["embedding"], dtype=np.float32)  # b x hidden, pooled+normalised
