"""A generation request's state inside the engine, and what one step reports for it."""
from __future__ import annotations

from dataclasses import dataclass, field

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
    emitted: str = ""      # text already handed out
    anchor: int = 0        # out[:anchor] is final text (`anchor_text`): only what follows is decoded
    anchor_text: str = ""

    @property
    def n_cached(self) -> int:  # positions of the slot written: all but the last sampled token
        return len(self.prompt) + len(self.out) - 1
