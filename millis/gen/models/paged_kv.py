"""Block bookkeeping of the native models' paged KV cache, with prefix caching.

The pool holds `n_blocks` blocks of `block_size` positions; `table[slot]` lists the blocks of a slot's
positions in order (the C forward reads it). A slot takes blocks as its sequence grows (`ensure`) within
what admission promised it (`admit`) and what it was promised since (`grow`, step by step as a request decodes),
and gives them back when its request ends or is preempted (`release`).

Prefix caching: a block that holds a whole `block_size` run of a prompt is keyed by a hash of the
prompt's tokens up to its end (a chain: each key covers every token before it, so equal keys mean
equal K/V). `admit` hands a new request the cached blocks of its prompt's leading runs; they are shared
(reference-counted) and never written again, because a slot writes only positions at or past the
end of its prompt's cached part. The engine prefills the rest. A cached block no slot uses stays
valid until the pool needs it: those are evicted least-recently-used first.

Admission arithmetic: blocks in use (referenced by a slot) + blocks promised but not yet taken must
fit the pool; free and evictable blocks are what is left.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from millis.common.errors import MillisError


class PagedKV:
    def __init__(self, n_blocks: int, block_size: int, max_slots: int, max_seq: int,
                 prefix_cache: bool = True) -> None:
        self.n_blocks, self.block_size, self.prefix_cache = n_blocks, block_size, prefix_cache
        self.table = np.zeros((max_slots, -(-max_seq // block_size)), dtype=np.int32)  # (slots, blocks)
        self.free = list(range(n_blocks - 1, -1, -1))  # pop() gives the lowest first: touched memory stays low
        self.owned: list[list[int]] = [[] for _ in range(max_slots)]
        self.pending = [0] * max_slots          # blocks promised to each slot and not taken yet
        self.refs = np.zeros(n_blocks, np.int32)  # slots holding each block
        self.key_of: dict[int, bytes] = {}      # block -> the prefix key it holds
        self.block_of: dict[bytes, int] = {}    # prefix key -> block
        self.idle: OrderedDict[int, None] = OrderedDict()  # keyed blocks no slot holds, oldest first
        self.prompt_tokens = self.hit_tokens = 0  # over admitted prompts: all, and served from the cache

    def blocks(self, n_pos: int) -> int:
        return -(-n_pos // self.block_size)

    @property
    def capacity(self) -> int:  # positions the whole cache holds
        return self.n_blocks * self.block_size

    @property
    def in_use(self) -> int:  # blocks some slot holds
        return int((self.refs > 0).sum())

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def keys(self, prompt: list[int]) -> list[bytes]:
        """The prefix key of each whole block of `prompt` (none when prefix caching is off). The engine
        computes them once per request and passes them to `admit` and `register`."""
        if not self.prefix_cache:
            return []
        out, h, bs = [], b"", self.block_size
        ids = np.asarray(prompt, dtype=np.int64)
        for i in range(len(prompt) // bs):
            h = hashlib.blake2b(h + ids[i * bs:(i + 1) * bs].tobytes(), digest_size=16).digest()
            out.append(h)
        return out

    def next_uncached(self, prompt: list[int], keys: list[bytes]) -> bytes | None:
        """The key of the first shareable block of `prompt` not cached yet (None: all are, or none can be)."""
        return next((k for k in keys[:(len(prompt) - 1) // self.block_size] if k not in self.block_of), None)

    def cached_blocks(self, prompt: list[int], keys: list[bytes]) -> list[int]:
        """The cached blocks of `prompt`'s leading runs, in order (never its last token: its logits are computed):
        what `admit` shares now."""
        hit: list[int] = []
        for k in keys[:(len(prompt) - 1) // self.block_size]:
            if k not in self.block_of:
                break
            hit.append(self.block_of[k])
        return hit

    def cached_prefix(self, prompt: list[int], keys: list[bytes]) -> int:
        """Positions of `prompt` that `admit` would find cached now: what starting it leaves to prefill is the rest."""
        return len(self.cached_blocks(prompt, keys)) * self.block_size if self.prefix_cache else 0

    def admit(self, slot: int, n_pos: int, prompt: list[int] | None = None,
              keys: list[bytes] | None = None, count: bool = True) -> int | None:
        """Promise `slot` room for n_pos positions, sharing the cached blocks of `prompt`'s leading runs
        (never its last token: its logits are computed; `keys`: `keys(prompt)` if already known).
        Returns the positions already cached (a multiple of block_size), or None (nothing promised)
        when the pool cannot hold the request."""
        hit: list[int] = []
        owned = self.owned[slot]
        if prompt and self.prefix_cache and not owned:
            hit = self.cached_blocks(prompt, self.keys(prompt) if keys is None else keys)
        waking = sum(1 for b in hit if self.refs[b] == 0)  # idle blocks this slot takes back into use
        need = max(self.blocks(n_pos) - len(hit) - len(owned), 0)
        others = sum(self.pending) - self.pending[slot]
        if self.in_use + others + waking + need > self.n_blocks:
            return None
        for i, b in enumerate(hit):
            self.refs[b] += 1
            self.idle.pop(b, None)
            self.table[slot, i] = b
            owned.append(b)
        self.pending[slot] = need
        if prompt and count:  # (not a preempted request's return: its prompt counted once)
            self.prompt_tokens += len(prompt)
            self.hit_tokens += len(hit) * self.block_size
        return len(hit) * self.block_size

    def grow(self, slot: int, n_pos: int) -> bool:
        """Extend `slot`'s promise to n_pos positions, from blocks nobody holds or was promised (free or idle);
        False, promising nothing more, when the pool has too few (the engine then preempts a request)."""
        need = self.blocks(n_pos) - len(self.owned[slot]) - self.pending[slot]
        if need <= 0:
            return True
        if self.in_use + sum(self.pending) + need > self.n_blocks:
            return False
        self.pending[slot] += need
        return True

    def promised(self, slot: int) -> int:
        """Positions `slot` holds or was promised."""
        return (len(self.owned[slot]) + self.pending[slot]) * self.block_size

    def reserve(self, slot: int, n_pos: int) -> bool:
        """Promise `slot` room for n_pos positions (no sharing); False when the pool cannot."""
        return self.admit(slot, n_pos) is not None

    def ensure(self, slot: int, n_pos: int) -> None:
        """Blocks for positions [0, n_pos) of `slot`: new ones from the free list, else the oldest idle
        cached block (its key dropped)."""
        owned = self.owned[slot]
        need = self.blocks(n_pos)
        if need > self.table.shape[1]:
            raise MillisError(f"position {n_pos - 1} is past the engine's context of {self.table.shape[1] * self.block_size}")
        while len(owned) < need:
            if self.free:
                b = self.free.pop()
            elif self.idle:
                b, _ = self.idle.popitem(last=False)
                del self.block_of[self.key_of.pop(b)]
            else:
                raise MillisError("the KV cache is full (raise --kv-memory-mb)")
            self.refs[b] = 1
            self.table[slot, len(owned)] = b
            owned.append(b)
            self.pending[slot] = max(self.pending[slot] - 1, 0)

    def register(self, slot: int, keys: list[bytes]) -> None:
        """Key `slot`'s leading prompt blocks (`keys(prompt)[:n]`) for later requests to share, once every
        position of them is written (a prompt prefilled in chunks registers its blocks as they complete)."""
        for i, k in enumerate(keys):
            b = self.owned[slot][i]
            if k not in self.block_of and b not in self.key_of:
                self.block_of[k], self.key_of[b] = b, k

    def release(self, slot: int) -> None:
        for b in reversed(self.owned[slot]):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.key_of:
                    self.idle[b] = None  # the most recently used last
                else:
                    self.free.append(b)
        self.owned[slot], self.pending[slot] = [], 0
