"""A generation request's state inside the engine, and what one step reports for it."""
from __future__ import annotations

from dataclasses import dataclass, field

from millis.common.errors import MillisError
from millis.gen.config import SamplingParams
from millis.gen.speculate import DraftStats


@dataclass(frozen=True)
class StepOutput:
    id: str
    token_ids: list[int]   # the tokens this step produced for the request (EOS included when it came)
    text: str              # the text they add (held back while it could still be the start of a stop string)
    finished: str | None   # None while running; "stop" (EOS or stop string), "length" or "error"
    error: str = ""        # finished == "error": what this request raised (its batch-mates ran on)
    logprobs: tuple = ()   # params.logprobs >= 0: per token (id, log p, ((id, log p) of the top alternatives))


@dataclass
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    seed: int              # its sampling stream (sampling.uniform): the seed given, else one the engine drew
    slot: int = -1
    cached: int = 0        # leading prompt positions whose KV the prefix cache already held
    prefilled: int = 0     # leading prompt positions whose KV is written (cached, then chunk by chunk: scheduling.py)
    passed: int = 0        # requests admitted before it while it waited (scheduling.py: at most max_passes)
    keys: list | None = None  # its prompt blocks' prefix-cache keys, hashed once (native models)
    drafts: DraftStats = field(default_factory=DraftStats)  # its speculative drafts' acceptance
    lp: tuple = ()         # this step's token log-probability entry (params.logprobs >= 0)
    matcher: object = None  # params.grammar: its llguidance matcher (`grammar.py`), advanced token by token
    out: list[int] = field(default_factory=list)
    resumed: list[int] | None = None  # preempted (its KV given back): prompt + out then, prefilled again on return
    preempted: int = 0     # times it gave its KV blocks back (`Engine._make_room`)
    arrived: int = 0       # the engine's count of adds: the latest to arrive is preempted first (one that was
    #                        preempted keeps its place: it is not the first to go again when it returns)
    emitted: str = ""      # text already handed out
    anchor: int = 0        # out[:anchor] is final text (`anchor_text`): only what follows is decoded
    anchor_text: str = ""

    @property
    def n_cached(self) -> int:  # positions of the slot written: all but the last sampled token
        return len(self.prompt) + len(self.out) - 1

    @property
    def feed(self) -> list[int]:  # what the prefill writes: the prompt, or after a preemption prompt + out then
        return self.prompt if self.resumed is None else self.resumed

    @property
    def prefilling(self) -> bool:  # holds a slot, its feed not all written yet: no token this step
        return self.prefilled < len(self.feed)


def checked_prompt(prompt: str | list[int], params: SamplingParams, tok, vocab_size: int, max_seq: int,
                   kv_capacity: int = 0) -> list[int]:
    """The prompt's token ids, or a MillisError for a request the engine could never run."""
    if isinstance(prompt, str):
        if tok is None:
            raise MillisError("this model has no tokenizer (tokenizer.json): give the prompt as token ids")
        ids = tok.encode(prompt)
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise MillisError("the prompt is empty")
    if len(ids) >= max_seq:
        raise MillisError(f"the prompt has {len(ids)} tokens; this engine holds at most {max_seq} "
                          f"positions per request (prompt + output), so at most {max_seq - 1}")
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise MillisError(f"prompt token ids must be in 0..{vocab_size - 1}")
    if kv_capacity and len(ids) >= kv_capacity:
        raise MillisError(f"the prompt has {len(ids)} tokens but the KV cache holds {kv_capacity} positions "
                          f"in all (raise --kv-memory-mb)")
    if params.stop and tok is None:
        raise MillisError("stop strings need a tokenizer; this model has none")
    if any(t >= vocab_size for t, _ in params.logit_bias):
        raise MillisError(f"logit_bias token ids must be in 0..{vocab_size - 1}")
    return ids
