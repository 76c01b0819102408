"""``Upstreams:Routes``: which upstream (server or group) serves a proxied request.

The rules are compiled once (:class:`Routes`): each is a path prefix on the canonical path
(``scope["path"]``, already percent-decoded and dot-segment-free by the request guard), a
lower-cased host without its port, an optional header name (and exact value), and a set of
methods; the first rule whose every part matches wins, else ``Upstreams:Default``. A request
costs one pass over the rules with ``str.startswith`` and set lookups (measured in
``bench/proxy_instructions.py --routes``: see the README's Performance section).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dicomproxy.config.model import HttpRoute


@dataclass(frozen=True, slots=True)
class Rule:
    path: str
    host: str  # lower-case, no port; "" = any
    header: bytes  # lower-case name; b"" = any
    value: bytes | None  # exact value; None = present
    methods: frozenset[str]  # empty = any
    upstream: str

    def matches(self, scope: dict[str, Any], host: str | None) -> bool:
        if not scope["path"].startswith(self.path):
            return False
        if self.methods and scope["method"] not in self.methods:
            return False
        if self.host and host != self.host:
            return False
        return not self.header or _has_header(scope["headers"], self.header, self.value)


def compile_rule(route: HttpRoute) -> Rule:
    name, sep, value = route.header.partition(":")
    return Rule(
        path=route.path, host=route.host.lower().split(":")[0] if route.host else "",
        header=name.strip().lower().encode("latin-1"),
        value=value.strip().encode("latin-1") if sep else None,
        methods=frozenset(route.methods), upstream=route.upstream,
    )


def request_host(scope: dict[str, Any]) -> str | None:
    """The ``Host`` header without its port, lower-case (None: none sent)."""
    for k, v in scope["headers"]:
        if k == b"host":
            text: str = v.decode("latin-1").lower()
            if text.startswith("["):
                return text.partition("]")[0] + "]"
            return text.rpartition(":")[0] if ":" in text else text
    return None


class Routes:
    """The compiled rules and the default: ``choose(scope)`` is the name that serves it.

    ``choose`` walks plain tuples with the scope's parts read once (no method call per rule), and
    the request's headers become a dict at the first header rule (one pass, then a lookup per
    rule): 50 rules cost ~5.6 µs instead of ~12 µs with ``Rule.matches`` (timeit, a third each of
    path, host and header rules, none matching; bench/upstreams_bench.py has the whole request)."""

    def __init__(self, routes: Sequence[HttpRoute], default: str) -> None:
        self.rules = tuple(compile_rule(r) for r in routes)
        self.default = default
        self._needs_host = any(r.host for r in self.rules)
        self._flat = tuple((r.path, r.methods, r.host, r.header, r.value, r.upstream) for r in self.rules)

    def choose(self, scope: dict[str, Any]) -> str:
        path = scope["path"]
        method = scope["method"]
        host = request_host(scope) if self._needs_host else None
        seen: dict[bytes, set[bytes]] | None = None  # the request's headers, built for the first header rule
        for prefix, methods, rule_host, header, value, upstream in self._flat:
            if not path.startswith(prefix):
                continue
            if methods and method not in methods:
                continue
            if rule_host and host != rule_host:
                continue
            if header:
                if seen is None:
                    seen = {}
                    for k, v in scope["headers"]:
                        seen.setdefault(k, set()).add(v.strip())
                values = seen.get(header)
                if values is None or (value is not None and value not in values):
                    continue
            return upstream
        return self.default


def _has_header(headers: Sequence[tuple[bytes, bytes]], name: bytes, value: bytes | None) -> bool:
    for k, v in headers:
        if k == name and (value is None or v.strip() == value):
            return True
    return False
