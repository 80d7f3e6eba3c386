"""Cache-aware routing for generation replicas, on Ray Serve's request-router API.

A request whose prompt starts like an earlier one should reach the replica that holds that prefix in
its KV prefix cache. The key is the prompt's first `prefix_chars` characters (the gateway puts them on
the forwarded request); rendezvous hashing maps a key to one replica, and to the same one as long as
that replica lives (adding or losing a replica moves only its own keys). The chosen replica is
tried first, the rest after it, so a full replica (at max_ongoing_requests) never blocks a request;
when it has IMBALANCE more requests than the least-loaded, load wins over the cache. Requests
without a key (other routes, or prefix_chars 0) go to the least-loaded replica.
"""
from __future__ import annotations

import hashlib

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

IMBALANCE = 8  # ongoing requests over the least-loaded replica at which the prefix's replica is passed over


def prefix_key(pending: PendingRequest | None) -> str | None:
    """The forwarded request's routing key (millis.serve.ray.replica.Forwarded.prompt), if any."""
    for arg in (pending.args if pending is not None else None) or ():
        prompt = getattr(arg, "prompt", None)
        if isinstance(prompt, str) and prompt:
            return prompt
    return None


def ranked(key: str, replicas: list[RunningReplica]) -> list[RunningReplica]:
    """Rendezvous (highest random weight) order of `replicas` for `key`: the first is the key's own."""
    def weight(r: RunningReplica) -> bytes:
        return hashlib.blake2b(f"{key}\0{r.replica_id.unique_id}".encode(), digest_size=8).digest()

    return sorted(replicas, key=weight, reverse=True)


class PrefixRouter(RequestRouter):
    """No FIFOMixin: it would hand the replica chosen for one request to the oldest pending one,
    which undoes the affinity; without it the base class matches replicas to their own requests."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:  # every replica full: back off before asking again (not a busy loop)
            pending_request.routing_context.should_backoff = True
        key = prefix_key(pending_request)
        if key is None or len(candidate_replicas) < 2:
            return [candidate_replicas]  # the base router probes them and takes the least loaded
        order = ranked(key, candidate_replicas)
        cache = self.replica_queue_len_cache
        known = [q for r in order if (q := cache.get(r.replica_id)) is not None]
        own = cache.get(order[0].replica_id)
        if own is not None and known and own - min(known) >= IMBALANCE:
            return [candidate_replicas]
        return [order[:1], order[1:]]
