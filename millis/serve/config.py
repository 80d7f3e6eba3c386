"""`ServeConfig`: every knob of `millis serve`, each field's help is its flag's help text.

The CLI builds one flag per field (`--max-wait-ms`) and reads the same name from the environment
(`MILLIS_MAX_WAIT_MS`; booleans also MILLIS_NO_<NAME>), so a container sets the server up with env vars
alone.
"""
from __future__ import annotations

from dataclasses import dataclass

from millis.common.config import check_at_least
from millis.common.config import flag as _f
from millis.common.errors import MillisError
from millis.encoder.source import POOLING_CHOICES, check_pooling_mode
from millis.gen.config import DTYPES, QUANTS

TOO_LONG = ("truncate", "reject")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


# an encoder server warms its length buckets up to this many tokens (every bucket of a ModernBERT's 8,192 was 512
# calls, 185 s at hidden size 64): longer ones pay their first call when a request first needs them
WARM_MAX_TOKENS = 512


@dataclass(frozen=True)
class ServeConfig:
    artifact: str = _f("", "artifact directory written by `millis optimize` (or any source spec: served as torch "
                           "fp32), or a decoder for generation: a GGUF file, builtin:smollm2, a HF "
                           "llama/mistral/qwen2/gpt2 directory or a llama2.c checkpoint")
    host: str = _f("127.0.0.1", "address to listen on")
    port: int = _f(8000, "TCP port (0 = any free port, printed at start)")
    model_name: str = _f("", "name clients use in `model` (default: the artifact directory's name)")
    # One meaning each, for both servers: a row is a text (encoders) or a sequence being decoded (generation).
    max_batch: int = _f(32, "most rows in one model call (generation: sequences decoded together, each holding "
                            "a KV cache slot allocated at load)")
    max_batch_tokens: int = _f(4096, "most tokens in one runtime call, padding counted (rows x bucket length); a "
                                     "row whose bucket is longer runs alone, past it")
    max_wait_ms: float = _f(0.0, "wait up to this long for a batch to fill; 0 = run what is queued as soon as "
                                 "the runtime is free (batches still form while it is busy)")
    max_queue: int = _f(128, "rows waiting to start (not yet in a model call / not yet given a slot) past which a "
                             "request is answered 429 with Retry-After (one admitted below it may take the queue "
                             "past it by its own rows)")
    max_inputs: int = _f(64, "most texts in one request (more: 400, TEI's routes 422)")
    max_body_bytes: int = _f(1 << 20, "largest request body in bytes (larger: 413)")
    too_long: str = _f("truncate", "a text over the model's max length: truncate (reported per item) or reject (400)",
                       choices=TOO_LONG)
    request_timeout_s: float = _f(30.0, "a request given no output in this time (its answer, or a generation's "
                                        "first token) gets 503 and is dropped")
    head_timeout_s: float = _f(15.0, "a request's line and headers must all arrive within this many seconds of "
                                     "its first byte, or of the connection's start (408 and closed past it)")
    threads: int = _f(0, "runtime intra-op threads (0 = all cores)")
    device: str = _f("cpu", "cpu, or cuda: serve a source model (BERT family) in fp16 through CUDA graphs "
                            "captured for batch 1..max_batch x 16..max-length tokens")
    pooling: str = _f("", "an embedder served from its source folder: how it pools where the folder declares "
                          "nothing (no sentence-transformers modules.json: mean otherwise): mean, cls, max, last-token "
                          "or splade; TEI's --pooling (an artifact pools as `millis optimize --pooling` built it)",
                      choices=("",) + POOLING_CHOICES)
    warmup: bool = _f(True, f"run every length bucket (an encoder's up to {WARM_MAX_TOKENS} tokens) once before "
                            f"/ready turns ready")
    shutdown_timeout_s: float = _f(60.0, "on SIGTERM, longest wait for admitted requests before exiting anyway")
    log_level: str = _f("warning", "uvicorn log level", choices=LOG_LEVELS)
    chat_template: str = _f("", "generation: a Jinja chat template file for /v1/chat/completions (default: the "
                                "model's chat_template.jinja or tokenizer_config.json `chat_template`)")
    max_tokens: int = _f(256, "generation: max_tokens of a request that gives none")
    max_seq: int = _f(0, "generation: KV cache positions per request (prompt + output); 0 = the model's maximum "
                         "(torch models: within --kv-memory-mb)")
    kv_memory_mb: int = _f(0, "generation: KV cache memory in MiB, shared by all slots (torch models: caps "
                              "--max-seq); 0 = min(512, a quarter of free memory), on a GPU half of its free memory")
    prefix_cache: bool = _f(True, "generation, GGUF models: requests share the KV blocks of a common prompt prefix "
                                  "(a cached prefix is not prefilled again)")
    speculate: int = _f(0, "generation, GGUF models: draft tokens verified per step for greedy requests (the "
                           "same text, faster when answers quote the prompt or a draft model guesses well); 0 = off")
    draft_model: str = _f("", "generation, GGUF models: a smaller GGUF of the same vocabulary that drafts the "
                              "tokens (with --speculate N); default: prompt lookup")
    prefill_tokens_per_step: int = _f(0, "generation: prompt tokens one engine step prefills, all requests together "
                                         "(a long prompt goes over several steps: bounds their stall); 0 = 256 on "
                                         "cpu, 2048 on cuda")
    dtype: str = _f("fp32", "generation: fp32 or bf16 weights and activations", choices=DTYPES)
    quant: str = _f("none", "generation: none; on cpu with dtype fp32, int8 (millis's kernels) or int8-torch "
                            "(torch dynamic quantization); on cuda with dtype bf16, int8, int4 or fp8 weight-only",
                    choices=QUANTS)

    def __post_init__(self) -> None:
        # each message names the flag (the CLI turns it into the MILLIS_* variable a value came from)
        check_at_least(self, 1, "max_batch", "max_batch_tokens", "max_queue", "max_inputs", "max_body_bytes",
                       "max_tokens")
        check_at_least(self, 0, "max_wait_ms", "threads", "max_seq", "kv_memory_mb")
        for name in ("request_timeout_s", "shutdown_timeout_s", "head_timeout_s"):
            if not getattr(self, name) > 0:
                raise MillisError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.max_inputs > self.max_queue:
            raise MillisError(f"--max-inputs ({self.max_inputs}) cannot exceed --max-queue ({self.max_queue}): "
                              f"such a request could never be admitted")
        for name, allowed in (("too_long", TOO_LONG), ("device", ("cpu", "cuda")), ("log_level", LOG_LEVELS),
                              ("dtype", DTYPES), ("quant", QUANTS)):
            if getattr(self, name) not in allowed:
                raise MillisError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, name)!r}")
        check_pooling_mode(self.pooling)
        if not 0 <= self.port < 65536:
            raise MillisError(f"--port must be in 0..65535, got {self.port}")
