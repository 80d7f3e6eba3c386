"""Typed, frozen configuration for generation: the model's shape, the engine, one request, the CLI.

`LlamaConfig` / `GPT2Config` are what a checkpoint's loader reads (HF config.json or the llama2.c
header); they rebuild the exact model. `EngineConfig` sizes the static KV cache and picks the
precision; `SamplingParams` is per request; `GenerateConfig` is `millis generate`'s flags.
"""
from __future__ import annotations

from dataclasses import dataclass

from millis.common.config import check_at_least
from millis.common.config import flag as _f
from millis.common.dtypes import WEIGHT_ONLY_FORMATS
from millis.common.errors import MillisError

LLAMA_TYPES = ("llama", "mistral", "qwen2")  # HF model_type values read as millis.gen.models.llama.Llama
MODEL_TYPES = LLAMA_TYPES + ("gpt2",)       # every HF model_type millis.gen loads
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("fp32", "bf16")  # the engine's precisions (torch dtypes: millis.common.dtypes); no fp16 decode
# cpu: int8 = Q8_0 weights x int16 activations (native kernels), int8-torch = torch dynamic quantization;
# cuda: the GPU_QUANTS, weight-only (millis.gpu.weight_only) against bf16 activations
QUANTS = ("none", "int8", "int8-torch", "int4", "fp8")
GPU_QUANTS = WEIGHT_ONLY_FORMATS
# Bounds of a request's sampling fields, checked by SamplingParams and named in the server's 422s
MAX_TEMPERATURE = 100.0
GREEDY_BELOW = 1e-5                       # a temperature under this samples greedily (logits / t would overflow)
MIN_PENALTY, MAX_PENALTY = 0.01, 100.0    # repetition penalty
MAX_OUTPUT_PENALTY = 2.0                  # presence / frequency penalty in [-2, 2] (OpenAI's range)
MAX_LOGIT_BIAS = 100.0                    # a logit_bias value in [-100, 100] (OpenAI's range)
MAX_BIASED_TOKENS = 300                   # logit_bias entries per request
MAX_LOGPROBS = 20                         # top alternatives a request may ask for per token
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed takes
# Prompt tokens one step prefills, all requests together (EngineConfig.prefill_tokens_per_step = 0). CPU: three
# 1,500-token prompts joining a running stream (SmolLM2-135M Q4_1, 1 thread, a 2-core box) stalled it 7.2 s in
# one step unchunked; at 128 / 256 / 512 tokens a step its longest step took 0.30 / 0.54 / 1.04 s and the three
# prefills 7.7 / 7.5 / 7.3 s (the C calls' throughput levels off from ~256 tokens): 256 keeps the stall near
# half a second for ~4% of prefill time. CUDA: cuda_prefill.LARGEST, so a prompt up to the largest graph
# bucket still prefills whole from one replay (not timed on a GPU yet).
PREFILL_TOKENS = {"cpu": 256, "cuda": 2048}


@dataclass(frozen=True)
class ModelConfig:
    """What every decoder family shares."""

    vocab_size: int            # rows of the token embedding and of the output head
    dim: int                   # hidden size (d_model)
    n_layers: int              # transformer blocks
    n_heads: int               # query heads
    n_kv_heads: int            # key/value heads; < n_heads is grouped-query attention
    max_seq: int               # most positions the model was trained for (RoPE table / wpe rows)
    tie_head: bool = True      # output head shares the token embedding's weight
    bos_id: int | None = None  # prepended by the tokenizer (llama2.c, Llama); None for GPT-2
    eos_id: int | None = None  # generation stops here
    stop_ids: tuple[int, ...] = ()  # and at these: an EOS list's others, end-of-turn tokens (HF generate, llama.cpp)

    @property
    def end_ids(self) -> frozenset[int]:
        """Every token id that ends a request's generation (unless ignore_eos)."""
        return frozenset(self.stop_ids) | ({self.eos_id} if self.eos_id is not None else set())

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise MillisError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")


@dataclass(frozen=True)
class LlamaConfig(ModelConfig):
    """Llama / Mistral / Qwen2: pre-RMSNorm, RoPE (rotate_half layout), GQA, SwiGLU."""

    hidden_dim: int = 0                 # SwiGLU inner size (intermediate_size)
    norm_eps: float = 1e-5              # RMSNorm epsilon
    rope_theta: float = 10000.0         # RoPE base
    rope_type: str = "default"          # default | linear | llama3 (HF rope_parameters.rope_type)
    rope_factor: float = 1.0            # linear / llama3 scaling factor
    rope_low_freq_factor: float = 1.0   # llama3: wavelengths above orig/low are divided by factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below orig/high are kept
    rope_original_max_seq: int = 8192   # llama3: the context the base model was trained at
    qkv_bias: bool = False              # Qwen2 has biases on q, k and v projections
    sliding_window: int = 0             # Mistral / Qwen2: attend to the last N positions only; 0 = all
    head_dim_override: int = 0          # config.json `head_dim` when it is not dim // n_heads

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.dim // self.n_heads

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rope_type not in ROPE_TYPES:
            raise MillisError(f"unsupported RoPE scaling {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}")


@dataclass(frozen=True)
class GPT2Config(ModelConfig):
    """GPT-2: learned positions, pre-LayerNorm, fused qkv with biases, GELU (tanh) MLP of 4x dim."""

    norm_eps: float = 1e-5  # LayerNorm epsilon


@dataclass(frozen=True)
class EngineConfig:
    """The engine's static resources, fixed at load (gpt-fast style: nothing grows while serving)."""

    max_batch: int = 8        # slots: requests decoded together; a KV cache row each
    max_seq: int = 0          # positions per slot (prompt + generated); 0 = the model's max_seq, within kv_memory_mb
    dtype: str = "fp32"       # fp32 | bf16 weights and activations (fp32 measured faster on AVX2 CPUs)
    quant: str = "none"       # none | int8 (int8 weights, int16 activations, a scale per 32 each) | int8-torch
    threads: int = 0          # torch intra-op threads; 0 = leave torch's default
    device: str = "cpu"       # cpu | cuda
    max_prefills_per_step: int = 4  # new requests admitted per step (they prefill within the step's budget)
    prefill_tokens_per_step: int = 0  # prompt tokens a step prefills: bounds running rows' stall; 0 = PREFILL_TOKENS
    kv_memory_mb: int = 0     # KV cache memory (native: the paged pool; torch: caps max_seq); 0 = load.kv_budget_bytes
    prefix_cache: bool = True  # native models: prompts share the cached KV blocks of their common prefix
    speculate: int = 0        # native models, greedy requests: draft tokens verified per step; 0 = off
    draft_model: str = ""     # a smaller GGUF of the same vocabulary drafts them ("" = prompt lookup)

    @property
    def prefill_tokens(self) -> int:
        return self.prefill_tokens_per_step or PREFILL_TOKENS[self.device]

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_seq < 0 or self.max_prefills_per_step < 1 or \
                min(self.kv_memory_mb, self.speculate, self.prefill_tokens_per_step) < 0:
            raise MillisError("max_batch and max_prefills_per_step must be >= 1; max_seq, kv_memory_mb, speculate, "
                              "prefill_tokens_per_step >= 0")
        if self.dtype not in DTYPES:
            raise MillisError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.quant not in QUANTS:
            raise MillisError(f"quant must be one of {', '.join(QUANTS)}, got {self.quant!r}")
        if self.device not in ("cpu", "cuda"):
            raise MillisError(f"device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and self.quant != "none":
            if self.quant not in GPU_QUANTS or self.dtype != "bf16":
                raise MillisError(f"on cuda, quant is weight-only ({', '.join(GPU_QUANTS)}) with dtype bf16 "
                                  f"activations: got quant {self.quant}, dtype {self.dtype}")
        elif self.quant in set(GPU_QUANTS) - {"int8"}:  # int8 is also the CPU kernels' format
            raise MillisError(f"quant {self.quant} is a GPU weight-only format: it needs device cuda")
        elif self.quant != "none" and self.dtype != "fp32":
            raise MillisError(f"quant {self.quant} is a CPU kernel with fp32 activations: it needs dtype fp32 on cpu")
        if self.draft_model and not self.speculate:
            raise MillisError("a draft model needs speculate >= 1: the draft tokens it proposes per step")
        if self.speculate and self.device == "cuda":  # the GPU's torch model has no paged KV to verify drafts in
            raise MillisError("speculate (and draft_model) run on the CPU's native kernels: not with device cuda")


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops (HF `generate` semantics)."""

    max_tokens: int = 64               # most new tokens (the slot's free positions cap it too)
    temperature: float = 0.0           # 0 (or below GREEDY_BELOW) = greedy
    top_k: int = 0                     # keep the k most likely tokens; 0 = all
    top_p: float = 1.0                 # keep the smallest set with this much probability; 1 = all
    repetition_penalty: float = 1.0    # > 1 discourages tokens already in prompt or output
    presence_penalty: float = 0.0      # OpenAI's: off a token's logit once it is in the output
    frequency_penalty: float = 0.0     # OpenAI's: off a token's logit per time it is in the output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), ids distinct
    seed: int | None = None            # same seed, same tokens (whatever else is in the batch)
    stop: tuple[str, ...] = ()         # the text is cut before the first of these, and the request ends
    ignore_eos: bool = False           # keep going past the model's EOS token
    logprobs: int = -1                 # >= 0: each token's log-probability and this many top alternatives
    grammar: str = ""                  # constrained output: a grammar of millis.gen.grammar ("" = none)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise MillisError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (0 <= self.temperature <= MAX_TEMPERATURE and self.top_k >= 0 and 0 < self.top_p <= 1
                and MIN_PENALTY <= self.repetition_penalty <= MAX_PENALTY):
            raise MillisError(f"need 0 <= temperature <= {MAX_TEMPERATURE:g}, top_k >= 0, 0 < top_p <= 1 and "
                              f"{MIN_PENALTY:g} <= repetition_penalty <= {MAX_PENALTY:g}")
        if not (abs(self.presence_penalty) <= MAX_OUTPUT_PENALTY and abs(self.frequency_penalty) <= MAX_OUTPUT_PENALTY):
            raise MillisError(f"presence_penalty and frequency_penalty must be in [-{MAX_OUTPUT_PENALTY:g}, "
                              f"{MAX_OUTPUT_PENALTY:g}], got {self.presence_penalty} and {self.frequency_penalty}")
        ids = [t for t, _ in self.logit_bias]
        if len(ids) > MAX_BIASED_TOKENS or len(set(ids)) < len(ids) or min(ids, default=0) < 0 or \
                not all(abs(b) <= MAX_LOGIT_BIAS for _, b in self.logit_bias):
            raise MillisError(f"logit_bias takes at most {MAX_BIASED_TOKENS} distinct token ids >= 0, each with a "
                              f"bias in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise MillisError(f"seed must fit 64 bits, got {self.seed}")
        if any(not s for s in self.stop):
            raise MillisError("stop strings must not be empty")
        if not -1 <= self.logprobs <= MAX_LOGPROBS:
            raise MillisError(f"logprobs must be in 0..{MAX_LOGPROBS} (or -1: off), got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def counts_output(self) -> bool:
        """Whether its logits depend on how often each token is in its output (presence / frequency)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def plain(self) -> bool:
        """Whether its token comes from the model's own logits: no penalty, no bias."""
        return self.repetition_penalty == 1.0 and not self.counts_output and not self.logit_bias


@dataclass(frozen=True)
class GenerateConfig:
    """`millis generate`: one prompt through the engine. Every field is a flag (and MILLIS_* variable)."""

    model: str = _f(help="a GGUF file, builtin:smollm2, a HF directory (config.json + model.safetensors) or a "
                        "llama2.c .bin / directory holding one")
    prompt: str = _f("", "the text to continue")
    max_tokens: int = _f(64, "most new tokens")
    temperature: float = _f(0.0, "sampling temperature; 0 = greedy")
    top_k: int = _f(0, "sample from the k most likely tokens; 0 = all")
    top_p: float = _f(1.0, "sample from the smallest set holding this probability; 1 = all")
    repetition_penalty: float = _f(1.0, "> 1 discourages tokens already seen (HF semantics)")
    presence_penalty: float = _f(0.0, "-2..2, off a token's logit once it is in the output (OpenAI semantics)")
    frequency_penalty: float = _f(0.0, "-2..2, off a token's logit per time it is in the output (OpenAI semantics)")
    seed: int = _f(-1, "sampling seed; -1 = random")
    stop: str = _f("", "stop strings, comma-separated (\\n for a newline); the text ends before the first")
    stream: bool = _f(False, "print tokens as they come")
    chat: bool = _f(False, "send the prompt as a user message through the model's chat template")
    dtype: str = _f("fp32", "fp32 or bf16", choices=DTYPES)
    quant: str = _f("none", "none; on cpu with dtype fp32: int8 (int8 weights with a scale per 32 against int16 "
                            "activations, millis's kernels; Llama-family and float GGUF models) or int8-torch (torch "
                            "dynamic quantization); on cuda with dtype bf16: int8, int4 or fp8 weight-only",
                    choices=QUANTS)
    device: str = _f("cpu", "cpu, or cuda (the torch model through CUDA graphs)", choices=("cpu", "cuda"))
    max_seq: int = _f(0, "KV cache positions; 0 = the model's maximum (torch models: within --kv-memory-mb)")
    kv_memory_mb: int = _f(0, "KV cache memory in MiB; 0 = min(512, a quarter of free memory), on a GPU half of "
                              "its free memory")
    threads: int = _f(0, "torch intra-op threads (GGUF: the kernels' threads); 0 = all usable cores")
    speculate: int = _f(0, "GGUF models, greedy: draft tokens verified per step (the same text, faster when the "
                           "drafts are right: prompt lookup, or --draft-model); 0 = off")
    draft_model: str = _f("", "GGUF models: a smaller GGUF model of the same vocabulary that drafts the tokens "
                              "(with --speculate N); default: prompt lookup")

    def __post_init__(self) -> None:
        # one message per flag, before any load: SamplingParams' combined check (and torch.set_num_threads(-1)'s
        # RuntimeError) name no flag
        if not self.model:
            raise MillisError("the model is empty: name a GGUF file, builtin:smollm2, a HF directory or a llama2.c model")
        check_at_least(self, 1, "max_tokens")
        check_at_least(self, 0, "top_k", "max_seq", "kv_memory_mb", "threads", "speculate")
        check_at_least(self, -1, "seed")
        if self.seed > SEED_MAX:
            raise MillisError(f"--seed must fit 64 bits (at most {SEED_MAX}), got {self.seed}")
        for name, lo, hi in (("temperature", 0.0, MAX_TEMPERATURE), ("top_p", 0.0, 1.0),
                             ("repetition_penalty", MIN_PENALTY, MAX_PENALTY),
                             ("presence_penalty", -MAX_OUTPUT_PENALTY, MAX_OUTPUT_PENALTY),
                             ("frequency_penalty", -MAX_OUTPUT_PENALTY, MAX_OUTPUT_PENALTY)):
            v = getattr(self, name)
            if not lo <= v <= hi or (name == "top_p" and v == 0):
                span = f"({lo:g}, {hi:g}]" if name == "top_p" else f"[{lo:g}, {hi:g}]"
                raise MillisError(f"--{name.replace('_', '-')} must be in {span}, got {v:g}")

    def sampling(self) -> SamplingParams:
        stops = tuple(s.replace("\\n", "\n") for s in self.stop.split(",") if s)
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, repetition_penalty=self.repetition_penalty,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              seed=None if self.seed < 0 else self.seed, stop=stops)

    def engine(self) -> EngineConfig:
        return EngineConfig(max_batch=1, max_seq=self.max_seq, dtype=self.dtype, quant=self.quant,
                            threads=self.threads, device=self.device, kv_memory_mb=self.kv_memory_mb,
                            speculate=self.speculate, draft_model=self.draft_model)


def eos_ids(*values) -> tuple[int | None, tuple[int, ...]]:
    """(eos_id, stop_ids) from eos_token_id values as HF writes them (an id or a list, in config.json and
    generation_config.json; HF generate stops at any of them): the first id, then the others."""
    ids = [int(v) for x in values for v in (x if isinstance(x, list) else [x]) if isinstance(v, int)]
    ids = list(dict.fromkeys(ids))
    return (ids[0], tuple(ids[1:])) if ids else (None, ())
