"""Stop strings: how much of a request's text must wait, because the next tokens may complete a stop."""
from __future__ import annotations


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
