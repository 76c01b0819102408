"""The three balancing modes of an ``Upstreams:Groups`` entry, each a ``Balancer``: given the
group's members (in ``Members`` order) and which of them may serve, which one serves next.

* ``Failover`` — the first available member in order (a primary and its secondaries);
* ``RoundRobin`` — nginx's smooth weighted round robin: every pick adds each candidate's
  ``Weight`` to its running score, takes the highest and subtracts the candidates' total from it,
  so weight 2 gets twice weight 1's share, interleaved (a b a a b a…, never a burst);
* ``LeastConnections`` — the available member with the fewest requests in flight (ties: order).

Hand-written: the whole of it is these few lines over a handful of members (a library would be a
dependency for a loop), and it runs on the request path (one pick: well under a microsecond for
three members).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from dicomproxy.upstream.member import Member


class Balancer(Protocol):
    def choose(self, candidates: Sequence[Member]) -> Member:
        """One of ``candidates`` (never empty, in ``Members`` order)."""


class Failover:
    def choose(self, candidates: Sequence[Member]) -> Member:
        return candidates[0]


class RoundRobin:
    def __init__(self) -> None:
        self._score: dict[str, int] = {}

    def choose(self, candidates: Sequence[Member]) -> Member:
        score = self._score
        total = 0
        best: Member | None = None
        best_score = 0
        for m in candidates:
            s = score.get(m.name, 0) + m.weight
            score[m.name] = s
            total += m.weight
            if best is None or s > best_score:
                best, best_score = m, s
        assert best is not None
        score[best.name] = best_score - total
        return best


class LeastConnections:
    def choose(self, candidates: Sequence[Member]) -> Member:
        return min(candidates, key=lambda m: m.health.in_flight)


def balancer(mode: str) -> Balancer:
    if mode == "RoundRobin":
        return RoundRobin()
    if mode == "LeastConnections":
        return LeastConnections()
    return Failover()
