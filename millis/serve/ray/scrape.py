"""The gateway's /metrics: every replica's Prometheus text, merged into one exposition.

Each replica runs its own app, so its counters are its own; the gateway asks all of them at each scrape
(Ray's broadcast, one call per running replica) and labels each replica's samples replica="<Ray replica
id>". Before, the scrape went to one replica picked by the router: each scrape saw another replica's
counters, unlabelled, which Prometheus reads as counter resets. A family's HELP and TYPE lines are written
once, and all its samples follow them together (the text format wants a family's samples in one group). A
replica that does not answer within SCRAPE_TIMEOUT_S is left out, and counted in the
millis_metrics_replicas_missing gauge.
"""
from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("millis.serve.ray")
SCRAPE_TIMEOUT_S = 2.0  # a replica not answered by then is left out of this scrape (Prometheus's default is 10 s)
MISSING = "millis_metrics_replicas_missing"


def escaped(value: str) -> str:
    """A label value as the text format writes it."""
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def labelled(sample: str, label: str) -> str:
    """One sample line with `label` (name="value") put first among its labels. The metric's name ends at the
    first "{" or space: label values (route="/v1/models/{id}") may hold braces, so only the first one counts."""
    brace, space = sample.find("{"), sample.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        rest = sample[brace + 1:]
        return f"{sample[:brace + 1]}{label}{'' if rest.startswith('}') else ','}{rest}"
    name, _, value = sample.partition(" ")
    return f"{name}{{{label}}} {value}"


def families(text: str) -> dict[str, tuple[list[str], list[str]]]:
    """An exposition's families in order: name -> (its HELP and TYPE lines, its sample lines)."""
    out: dict[str, tuple[list[str], list[str]]] = {}
    current = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                current = parts[2]
                out.setdefault(current, ([], []))[0].append(line)
            continue  # other comments carry nothing
        if current is None:  # a sample before any header: its own family
            name = line.split("{", 1)[0].split(" ", 1)[0]
            out.setdefault(name, ([], []))[1].append(line)
        else:
            out[current][1].append(line)
    return out


def merged(answers: list[tuple[str, bytes]]) -> bytes:
    """The replicas' expositions [(replica id, text)] as one, each sample labelled with its replica's id."""
    heads: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for replica, text in answers:
        label = f'replica="{escaped(replica)}"'
        for name, (head, lines) in families(text.decode("utf-8", "replace")).items():
            heads.setdefault(name, head)  # the first replica's HELP/TYPE: once per family
            samples.setdefault(name, []).extend(labelled(ln, label) for ln in lines)
    out = [ln for name in heads for ln in (*heads[name], *samples[name])]
    return ("\n".join(out) + "\n").encode() if out else b""


def missing_gauge(missing: int) -> bytes:
    return (f"# HELP {MISSING} replicas that did not answer this scrape within {SCRAPE_TIMEOUT_S:g} s (their "
            f"series are left out of it)\n# TYPE {MISSING} gauge\n{MISSING} {float(missing)}\n").encode()


async def every_replica(replicas, method: str) -> tuple[list, int]:
    """(the answers of `method` from every running replica that gave one within SCRAPE_TIMEOUT_S, how many did
    not).

    Each replica is waited for on its own: DeploymentBroadcastResponse.results_async(timeout_s) raises when any
    one replica is late, and every other replica's answer is lost with it. So its list of per-replica results
    is read (Ray 2.60 names that step with an underscore; millis[ray] pins that version) and each is bounded
    alone. No replica running (autoscaled to 0, or all being replaced) is no answer and none missing."""
    from ray.serve.exceptions import DeploymentUnavailableError

    timeout_s = SCRAPE_TIMEOUT_S
    deadline = time.monotonic() + timeout_s  # for the whole scrape, the list of replicas included
    try:
        sent = replicas.broadcast(method)
        results = await asyncio.wait_for(sent._fetch_replica_results_async(), timeout_s)  # noqa: SLF001
    except DeploymentUnavailableError:
        return [], 0
    except TimeoutError:  # the handle has not learnt the replicas yet
        log.warning("millis gateway: the replicas' list was not known within %g s for /metrics", timeout_s)
        return [], 0
    left = max(0.0, deadline - time.monotonic())
    got = await asyncio.gather(*(asyncio.wait_for(r.get_async(), left) for r in results), return_exceptions=True)
    answers = [a for a in got if not isinstance(a, BaseException)]
    for e in got:
        if isinstance(e, BaseException):
            log.warning("millis gateway: a replica gave no /metrics (%s)", type(e).__name__)
    return answers, len(got) - len(answers)
