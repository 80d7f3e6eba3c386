"""`millis.load(path)`: an optimized artifact with predict / embed over raw texts."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from millis.artifact import store as artifact
from millis.artifact.meta import ModelMeta, SourceMeta, VariantRecipe
from millis.common.config import to_dict
from millis.common.errors import MillisError
from millis.runtimes import Runtime, open_runtime
from millis.runtimes.base import gives_token_states, no_token_states, shares_scales_across_rows
from millis.common.numeric import label_scores
from millis.encoder.source import built_pooling, takes_segments
from millis.encoder.text import TextEncoder, bucket_length, check_texts, prompt_texts

MAX_BATCH = 32  # rows per runtime call when a caller passes many texts at once


@dataclass
class Result:
    outputs: np.ndarray        # (N, D): logits or embeddings, in input order
    truncated: list[bool]      # per text: cut to the model's max length
    tokens: list[int]          # per text: tokens used


def run_texts(runtime: Runtime, encoder: TextEncoder, texts: list[str], max_batch: int = MAX_BATCH) -> Result:
    """Texts -> outputs in input order: rows sorted by length, cut into batches of `max_batch`,
    each padded to its bucket (`bucket_length`: a static-shape runtime sees few shapes)."""
    ids, cut = encoder.token_ids(check_texts(texts))
    return run_rows(runtime, encoder, ids, cut, max_batch)


def run_pairs(runtime: Runtime, encoder: TextEncoder, pairs: list[tuple[str, str]],
              max_batch: int = MAX_BATCH) -> Result:
    """(query, document) pairs -> outputs in input order, each encoded as a cross-encoder reads it (as
    /v1/rerank does: `TextEncoder.pair_ids`)."""
    ids: list[list[int]] = []
    cut: list[bool] = []
    for q, d in pairs:
        r, c = encoder.pair_ids(q, [d])
        ids += r
        cut += c
    return run_rows(runtime, encoder, ids, cut, max_batch)


def run_rows(runtime: Runtime, encoder: TextEncoder, ids: list[list[int]], cut: list[bool],
             max_batch: int = MAX_BATCH) -> Result:
    """Token rows -> outputs in input order (run_texts's batching). On a runtime that shares its activation
    scales across a call's rows (`shares_scales_across_rows`: ORT's dynamic int8), a row's output depends on
    the rows and the padding it is run with: `Model.run` and the server run such a runtime one row a call."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    outs: list[np.ndarray] = [None] * len(ids)  # type: ignore[list-item]
    for start in range(0, len(order), max_batch):
        idx = order[start:start + max_batch]
        t = bucket_length(max(len(ids[i]) for i in idx), encoder.max_length)
        y = runtime.run(encoder.pack([ids[i] for i in idx], t))[runtime.output_name]
        for row, i in enumerate(idx):
            outs[i] = y[row]
    return Result(np.stack(outs).astype(np.float32), cut, [len(r) for r in ids])


class Model:
    """A loaded artifact (or a source model run as the torch fp32 reference). `meta` is its typed
    millis.json: an ArtifactMeta for an artifact, the ModelMeta core for a source model.
    Thread-compatible: one call at a time per runtime (the server's worker)."""

    def __init__(self, path: Path, meta: ModelMeta, runtime: Runtime, encoder: TextEncoder):
        self.path, self.meta, self.runtime, self.encoder = path, meta, runtime, encoder
        self.task: str = meta.task
        self.id2label: dict[int, str] = dict(meta.id2label)
        self.problem_type: str = meta.source.problem_type
        self.max_length: int = meta.max_length

    @property
    def variant(self) -> str:
        return self.meta.variant.name

    @cached_property
    def vocab_size(self) -> int:
        """Token ids this model takes are 0..vocab_size-1: its tokenizer's, capped by the runtime's embedding
        table where the runtime knows it (`Runtime.vocab_size`)."""
        table = getattr(self.runtime, "vocab_size", 0)
        return min(self.encoder.vocab_size, table) if table else self.encoder.vocab_size

    def run(self, texts: list[str], max_batch: int = MAX_BATCH) -> Result:
        """Tokenize, batch rows of similar length together, run, restore input order. A runtime whose rows share
        their activation scales runs one row a call, as the server runs it: each text's result is its own."""
        one = shares_scales_across_rows(self.runtime)
        return run_texts(self.runtime, self.encoder, texts, 1 if one else max_batch)

    def embed(self, texts: list[str], prompt_name: str | None = None) -> np.ndarray:
        """(N, H) sentence embeddings (pooled and normalised as the model declares); `prompt_name`: one of the model's
        sentence-transformers prompts before each text (Qwen3-Embedding's "query")."""
        if self.task != "embed":
            raise MillisError(f"this artifact is a {self.task} model; use predict()")
        texts = texts if prompt_name is None else prompt_texts(check_texts(texts), self.encoder.prompts, prompt_name)
        return self.run(texts).outputs

    def token_embeddings(self, texts: list[str]) -> list[np.ndarray]:
        """Per text, (tokens, H) float32: every token's last hidden state (special tokens too), before pooling: what
        the server's /embed_all answers, batched as `run` batches (a runtime whose rows share their activation
        scales, ONNX Runtime's dynamic int8: one row a call, padded to its bucket, as the server runs it)."""
        if self.task != "embed":
            raise MillisError(f"this artifact is a {self.task} model; token embeddings come from an embedder")
        if not gives_token_states(self.runtime):
            raise MillisError(no_token_states(self.meta.variant.runtime))
        ids, _ = self.encoder.token_ids(check_texts(texts))
        out: list[np.ndarray] = [None] * len(ids)  # type: ignore[list-item]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        step = 1 if shares_scales_across_rows(self.runtime) else MAX_BATCH
        for start in range(0, len(order), step):
            idx = order[start:start + step]
            t = bucket_length(max(len(ids[i]) for i in idx), self.encoder.max_length)
            states = self.runtime.token_states(self.encoder.pack([ids[i] for i in idx], t))  # (B, T, H)
            for i, h in zip(idx, states):
                out[i] = h[:len(ids[i])]
        return out

    def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        """Per text: label, score, probabilities per label, logits and whether it was truncated."""
        if self.task != "classify":
            raise MillisError(f"this artifact is an {self.task} model; use embed()")
        res = self.run(texts)
        probs = label_scores(res.outputs, self.problem_type)  # a softmax over one logit was always 1
        out = []
        for i, p in enumerate(probs):
            k = int(p.argmax())
            out.append({"label": self.id2label.get(k, str(k)), "score": float(p[k]),
                        "probs": {self.id2label.get(j, str(j)): float(v) for j, v in enumerate(p)},
                        "logits": res.outputs[i].tolist(), "truncated": res.truncated[i]})
        return out


def gpu_buckets(max_batch: int, max_length: int, max_batch_tokens: int = 0) -> list[str]:
    """CUDA-graph shapes for a server: batch 1, 2, 4 .. max_batch x seq 16, 32, 64 .. max_length, less the
    ones no batch reaches under the batcher's token budget (rows x padded length <= max_batch_tokens; 0:
    no budget). The batcher pads T to a multiple of BUCKET and the runtime pads (B, T) up to the next
    captured shape, so (b, t) is needed when its smallest batch, (previous b + 1) x (previous t + BUCKET),
    fits the budget."""
    from millis.encoder.text import BUCKET

    def pow2(lo: int, hi: int) -> list[int]:
        out = [lo]
        while out[-1] < hi:
            out.append(min(out[-1] * 2, hi))
        return out
    bs, ts = pow2(1, max_batch), pow2(BUCKET, max_length)
    least = {(b, t): (bs[i - 1] + 1 if i else 1) * ((ts[j - 1] if j else 0) + BUCKET)  # its smallest batch's tokens
             for i, b in enumerate(bs) for j, t in enumerate(ts)}
    return [f"b{b}xs{t}" for (b, t), n in least.items() if not max_batch_tokens or n <= max_batch_tokens]


def open_model(spec: str | Path, task: str = "", threads: int = 0, max_length: int = 0, device: str = "",
               max_batch: int = MAX_BATCH, max_batch_tokens: int = 0, pooling: str = "") -> Model:
    """An artifact (millis.json) through `load`; any other model (a local HF dir, e.g. one written by
    `millis train`, builtin:minilm, tiny:bert) as the torch fp32 reference, so both evaluate alike, pooled by
    `pooling` where its folder declares none (`with_pooling`; an artifact records its own).
    device="cuda" serves a source (BERT family) through the CUDA-graph runtime in fp16 instead."""
    p = Path(spec)
    if device not in ("", "cpu", "cuda"):
        raise MillisError(f"device must be cpu or cuda, got {device!r}")
    if artifact.is_artifact(p):
        model = load(p, threads=threads, device=device, max_batch=max_batch, max_batch_tokens=max_batch_tokens)
        if task and task != model.task:
            raise MillisError(f"{p} is a {model.task} artifact, not {task}")
        built_pooling(p, model.meta.source.pooling.mode, pooling)
        return model
    from millis.encoder.source import model_max_length, resolve, with_pooling
    from millis.encoder.tasks import OUTPUT_NAME

    src = with_pooling(resolve(str(spec)), pooling)
    task = task or ("classify" if src.has_classifier and not pooling else "embed")  # (a pooling: an embedder)
    if pooling and task != "embed":
        raise MillisError(f"--pooling is an embedder's; {spec} is served as a {task} model")
    max_len = model_max_length(src, max_length)
    options = {"task": task, "pooling": to_dict(src.pooling)}
    kind, name, precision = "torch", "torch-fp32", "fp32"
    if device == "cuda":
        kind, name, precision = "cuda", "cuda-fp16", "fp16"
        options.update(dtype="fp16", buckets=gpu_buckets(max_batch, max_len, max_batch_tokens))
    rt = open_runtime(kind, src.path, name, src.input_names, OUTPUT_NAME[task], options, threads)
    meta = ModelMeta(task, OUTPUT_NAME[task], tuple(src.input_names), max_len, dict(src.id2label),
                     SourceMeta.of(src), VariantRecipe(name, kind, precision, passes=(), options={}))
    enc = TextEncoder(src.path, src.input_names, max_len, segments=src.segments)
    return Model(src.path, meta, rt, enc)


def load(path: str | Path, threads: int = 0, verify: bool = True, device: str = "", max_batch: int = MAX_BATCH,
         max_batch_tokens: int = 0) -> Model:
    """Load an artifact written by `millis optimize`; verifies format version and file hashes. `device`
    ("cpu" / "cuda"; "" = the artifact's own) must match where its variant runs: a GPU artifact (optimize
    --device cuda) captures the shapes a server of `max_batch` rows and `max_batch_tokens` reaches."""
    path = Path(path)
    meta = artifact.read_meta(path, verify=verify)
    v = meta.variant
    if device == "cuda" and v.runtime != "cuda":
        raise MillisError(f"{path} is a CPU artifact ({v.name}); on a GPU serve the source model directory, or an "
                          f"artifact of `millis optimize --device cuda`, with --device cuda")
    if device == "cpu" and v.runtime == "cuda":
        raise MillisError(f"{path} is a GPU artifact ({v.name}): serve it with --device cuda")
    if not any(rel.startswith("tokenizer/") for rel in meta.files):  # every artifact optimize writes ships one
        raise MillisError(f"artifact {path} is corrupted: its millis.json lists no tokenizer files")
    model_dir = path / "hf" if v.runtime == "torch" else path
    options = dict(v.options, task=meta.task, pooling=to_dict(meta.source.pooling))
    if v.runtime == "cuda":
        options.setdefault("buckets", gpu_buckets(max_batch, meta.max_length, max_batch_tokens))
    rt = open_runtime(v.runtime, model_dir, v.name, meta.input_names, meta.output, options, threads)
    return Model(path, meta, rt, TextEncoder(path / "tokenizer", meta.input_names, meta.max_length, saved=True,
                                             segments=takes_segments(meta.source.model_type,
                                                                                     meta.source.segments)))
