"""A request's text, step by step: what its new tokens add, and how much must wait because the next
tokens may complete a stop string."""
from __future__ import annotations

from millis.gen.tokenizer import text_delta


def held_back(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper start of `stop` (it must wait: the next
    tokens may complete the stop string). Looks only at the last len(stop) - 1 characters, and tries
    each place where stop[0] occurs there, leftmost (longest) first."""
    tail = text[len(text) - min(len(stop) - 1, len(text)):]
    i = tail.find(stop[0])
    while i >= 0:
        if stop.startswith(tail[i:]):
            return len(tail) - i
        i = tail.find(stop[0], i + 1)
    return 0


def new_text(tok, end_ids: frozenset[int], r, final: bool) -> tuple[str, bool]:
    """The new text of engine request `r` (its out, prompt, params and text bookkeeping) and whether a
    stop string ended it."""
    if tok is None:
        return "", False
    ids = r.out[:-1] if r.out[-1] in end_ids and not r.params.ignore_eos else r.out
    context = (r.prompt[-4:] + ids[max(0, r.anchor - 4):r.anchor])[-4:]  # a few ids before (SentencePiece
    # spaces need them), sliced without copying the whole prompt and output each step
    full = r.anchor_text + text_delta(tok, context, ids[r.anchor:])
    stopped = False
    # a stop string can only end in the text not yet handed out: search from just before it, and not in an
    # incomplete UTF-8 character at the end (its U+FFFD is a placeholder: a stop string holding one matched it)
    hay = full if final else full.rstrip("\ufffd")
    cut = min((i for i in (hay.find(s, max(0, len(r.emitted) - len(s) + 1)) for s in r.params.stop) if i >= 0),
              default=-1)
    if cut >= 0:
        full, stopped, final = full[:cut], True, True
    whole = full
    if not final:
        full = full.rstrip("\ufffd")  # an incomplete UTF-8 character: wait for its next bytes
        full = full[:len(full) - max((held_back(full, s) for s in r.params.stop), default=0)]
    if not full.startswith(r.emitted):
        return "", stopped
    new, r.emitted = full[len(r.emitted):], full
    if len(ids) - r.anchor >= 16 and not final:  # decode cost per step stays flat
        if full == whole:  # nothing held back: ids so far are final
            r.anchor, r.anchor_text = len(ids), full
        else:  # a stop string's start or a partial character waits at the end: anchor short of it, where the text
            # is out already (a request whose text always ended so used to decode its whole output every step)
            a = len(ids) - max(map(len, r.params.stop), default=0) - 8
            if a - r.anchor >= 16:
                context = (r.prompt[-4:] + ids[max(0, r.anchor - 4):r.anchor])[-4:]
                text = r.anchor_text + text_delta(tok, context, ids[r.anchor:a])
                if r.emitted.startswith(text) and not text.endswith("\ufffd"):
                    r.anchor, r.anchor_text = a, text
    return new, stopped
