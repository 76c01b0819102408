"""The role policy: built-in table, longest prefix, method-specific beats any method, site beats built-in."""

from __future__ import annotations

import pytest

from dicomproxy.auth.identity import Identity, Scheme
from dicomproxy.auth.policy import Policy, Rule, builtin_rules


def who(*roles: str) -> Identity:
    return Identity("u", Scheme.BASIC, frozenset(roles))


DEFAULT = Policy((), builtin_rules("/files/"))


@pytest.mark.parametrize("method,path,roles,allowed", [
    ("GET", "/dicom-web/studies", ("viewer",), True),
    ("HEAD", "/instances", ("viewer",), True),
    ("GET", "/dicom-web/studies", ("uploader",), False),
    ("POST", "/dicom-web/studies", ("uploader",), True),
    ("POST", "/dicom-web/studies", ("viewer",), False),
    ("DELETE", "/studies/x", ("viewer", "uploader"), True),
    ("POST", "/files/", ("uploader",), True),
    ("PATCH", "/files/abc", ("uploader",), True),
    ("HEAD", "/files/abc", ("viewer",), False),
    ("GET", "/filesystem", ("viewer",), True),  # not under /files
    ("GET", "/dicomproxy/tasks", (), True),
    ("GET", "/dicomproxy/metrics", (), True),
    ("POST", "/dicomproxy/spool/retry", ("viewer", "uploader"), False),
    ("POST", "/dicomproxy/spool/retry", ("admin",), True),
    ("POST", "/tools/execute-script", ("viewer", "uploader"), False),
    ("POST", "/tools/execute-script", ("admin",), True),
    ("GET", "/dicomproxy/ui/history", ("viewer",), True),  # the graphs: harmless
    ("GET", "/dicomproxy/ui/scripts/source", ("viewer", "uploader"), False),  # may hold credentials
    ("POST", "/dicomproxy/ui/check", ("viewer", "uploader"), False),  # runs the scripts
    ("GET", "/dicomproxy/ui/audit", ("viewer", "uploader"), False),  # PHI
    ("GET", "/dicomproxy/ui/audit", ("admin",), True),
    ("GET", "/anything", ("admin",), True),  # admin meets every rule
    ("GET", "/anything", (), False),
])
def test_builtin_rules(method: str, path: str, roles: tuple[str, ...], allowed: bool) -> None:
    assert (DEFAULT.denied(who(*roles), method, path) is None) is allowed


def test_site_rules_override_the_route_they_name_only() -> None:
    site = [Rule("/dicomproxy/metrics", frozenset(), frozenset({"admin"})),
            Rule("/tools/execute-script", frozenset(), frozenset({"scripter"})),
            Rule("/", frozenset({"DELETE"}), frozenset({"admin"})),
            Rule("/files", frozenset(), frozenset({"viewer", "uploader"}))]
    p = Policy(site, builtin_rules("/files/"))
    denied = p.denied(who("viewer"), "GET", "/dicomproxy/metrics")
    assert denied is not None and denied.roles == {"admin"} and denied.describe() == "* /dicomproxy/metrics"
    assert p.denied(who("viewer"), "GET", "/dicomproxy/tasks") is None
    assert p.denied(who("scripter"), "POST", "/tools/execute-script") is None
    assert p.denied(who("uploader"), "DELETE", "/studies/1") is not None
    assert p.denied(who("uploader"), "POST", "/dicom-web/studies") is None
    assert p.denied(who("viewer"), "PATCH", "/files/x") is None


def test_a_method_rule_at_the_same_path_beats_an_any_method_rule() -> None:
    p = Policy([Rule("/x", frozenset({"GET"}), frozenset({"a"})), Rule("/x", frozenset(), frozenset({"b"}))], ())
    assert p.denied(who("a"), "GET", "/x/1") is None and p.denied(who("b"), "GET", "/x/1") is not None
    assert p.denied(who("b"), "PUT", "/x") is None and p.rule_for("PUT", "/y") is None
