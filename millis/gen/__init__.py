"""Real-time text generation: compact Llama-family and GPT-2 models, a static KV cache, on-device
sampling and a continuous-batching engine (see `millis.gen.engine` for the engine's API).

    from millis.gen import EngineConfig, GenerateConfig, generate, open_engine
    res = generate(GenerateConfig(model="../shared/models/stories260K", prompt="Once upon a time"))
    eng = open_engine("../shared/models/stories260K", EngineConfig(max_batch=8))
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Callable

from millis.common.errors import MillisError
from millis.gen.config import EngineConfig, GenerateConfig, SamplingParams

__all__ = ["generate", "open_engine", "Engine", "EngineConfig", "GenerateConfig", "SamplingParams",
           "StepOutput", "GenerateResult"]


def __getattr__(name: str):
    """Engine and StepOutput on first use: the engine imports torch (~1 s), which importing millis.gen.config
    (the server's OpenAPI limits, the encoder server's) must not."""
    if name in ("Engine", "StepOutput"):
        from millis.gen import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'millis.gen' has no attribute {name!r}")


@dataclass(frozen=True)
class GenerateResult:
    text: str              # the generated text (the prompt not included)
    token_ids: list[int]   # the generated ids
    prompt_ids: list[int]
    finished: str          # "stop" or "length"
    load_s: float          # reading the checkpoint and allocating the cache
    prefill_ms: float      # the steps up to the first token: the prompt's forward passes (in chunks) and the token
    decode_ms_per_token: float  # mean of the later steps (0 when there is one token only)


def open_engine(model: str, engine: EngineConfig = EngineConfig(), seed: int = 0) -> Engine:
    """Load `model` (HF dir or llama2.c checkpoint) with the engine's static resources."""
    import torch

    from millis.gen.load import load

    if engine.threads:
        torch.set_num_threads(engine.threads)
    loaded = load(model, engine)
    loaded.source_path = model
    if engine.speculate and loaded.kv is None:  # drafts are verified in the native kernels' paged KV
        raise MillisError(f"speculate (and draft_model) need the native kernels' paged KV, and this model loaded as "
                          f"a torch model ({type(loaded.model).__name__}, dtype {engine.dtype}, quant "
                          f"{engine.quant}): use dtype fp32 on the CPU, or leave speculate at 0 (drafts were "
                          f"silently off)")
    if loaded.kv is not None:  # native kernels (own thread pool): torch keeps only the step's small ops, and
        torch.set_num_threads(1)  # its OpenMP workers would spin on the cores the kernels use (1.5x per token)
    drafter = None
    if engine.draft_model:  # its own paged KV, slot for slot with the target's
        from dataclasses import replace

        from millis.gen.draft_model import DraftModel

        drafter = DraftModel(load(engine.draft_model, replace(engine, draft_model="", prefix_cache=False)), loaded,
                             engine.prefill_tokens)
    decode = prefill = None
    if engine.device == "cuda":  # decode replayed from one CUDA graph per batch bucket, a lone prompt's
        from millis.gen import cuda_prefill  # prefill from one per token bucket
        from millis.gen.cuda_graph import GraphedDecode

        decode = GraphedDecode(loaded.model, engine.max_batch, loaded.max_seq)
        if cuda_prefill.wanted():
            prefill = cuda_prefill.open_prefill(loaded.model, loaded.max_seq, engine.prefill_tokens)
    elif loaded.kv is not None and hasattr(loaded.model, "decode_rows"):  # native: flat lists, no Batch
        decode = loaded.model.decode_rows
    from millis.gen.engine import Engine

    return Engine(loaded, max_prefills_per_step=engine.max_prefills_per_step, seed=seed, decode=decode,
                  speculate=engine.speculate, drafter=drafter, prefill=prefill, prefill_tokens=engine.prefill_tokens)


def chat_prompt(eng: Engine, text: str) -> list[int]:
    """`text` as one user message through the model's chat template (the GGUF's, else the HF dir's), as ids."""
    from millis.gen.chat_template import chat_template_of, encode_rendered, render_chat

    template, special = eng.chat_template, dict(eng.special_tokens or {})
    if template is None and eng.source_path:
        template, special = chat_template_of(eng.source_path)
    if template is None or eng.tok is None:
        raise MillisError("--chat: this model has no chat template (or no tokenizer)")
    rendered = render_chat(template, [{"role": "user", "content": text}], special)
    return encode_rendered(eng.tok, rendered)


def generate(cfg: GenerateConfig, on_text: Callable[[str], None] | None = None) -> GenerateResult:
    """Run one prompt to completion; `on_text` receives each piece of text as it is produced."""
    params = cfg.sampling()  # validate the request before the (slower) load
    t0 = time.perf_counter()
    # --seed -1 (random): the engine's stream seeded anew per run, as the server's (a fixed 0 repeated each run)
    eng = open_engine(cfg.model, cfg.engine(), seed=secrets.randbits(62))
    load_s = time.perf_counter() - t0
    rid = eng.add(chat_prompt(eng, cfg.prompt) if cfg.chat else cfg.prompt, params)
    prompt_ids = list(eng.requests[rid].prompt)
    eng.prefill_tokens = max(eng.prefill_tokens, len(prompt_ids))  # the one request, none to stall: a whole prefill
    text, ids, times, finished, first = [], [], [], None, 0
    while finished is None:
        t = time.perf_counter()
        outs = eng.step()  # none while the prompt is part-way in (EngineConfig.prefill_tokens a step)
        times.append(time.perf_counter() - t)
        if not outs:
            continue
        (out,) = outs
        first = first or len(times)  # the steps up to the first token: the prompt's prefill
        text.append(out.text)
        ids += out.token_ids
        finished = out.finished
        if on_text and out.text:
            on_text(out.text)
    decode = times[first:]
    return GenerateResult("".join(text), ids, prompt_ids, finished, load_s, 1e3 * sum(times[:first]),
                          1e3 * sum(decode) / len(decode) if decode else 0.0)
