"""Unit tests of the pure parts of named upstreams: the balancers, the route rules, the member
state machine (one function each; the real stack is in tests/e2e/test_upstreams.py)."""

from __future__ import annotations

from collections import Counter

from dicomproxy.config.model import HealthCheckSettings, HttpRoute, UpstreamSettings
from dicomproxy.http.routes import Routes
from dicomproxy.upstream.balance import LeastConnections, RoundRobin
from dicomproxy.upstream.member import Member, State
from dicomproxy.upstream.upstream import Upstream


def member(name: str, weight: int = 1, **check: object) -> Member:
    upstream = Upstream(UpstreamSettings.model_validate({"Url": "http://127.0.0.1:9"}))
    return Member(name, upstream, dicom=None, dicom_host="", weight=weight,
                  check=HealthCheckSettings.model_validate(check), owned=True)


def test_smooth_round_robin_interleaves_by_weight() -> None:
    a, b, c = member("a", 2), member("b"), member("c")
    rr = RoundRobin()
    picks = [rr.choose([a, b, c]).name for _ in range(8)]
    assert Counter(picks) == {"a": 4, "b": 2, "c": 2}
    assert "aa" not in "".join(picks[:4])  # interleaved: a b a c, not a a b c


def test_least_connections_takes_the_least_busy_then_order() -> None:
    a, b = member("a"), member("b")
    lc = LeastConnections()
    assert lc.choose([a, b]) is a
    a.begin()
    assert lc.choose([a, b]) is b
    a.end()
    assert lc.choose([a, b]) is a


def test_ejection_and_half_open_recovery_without_checks() -> None:
    m = member("a", Failures=2, IntervalSeconds=0.1)
    m.failed("refused")
    assert m.health.state is State.HEALTHY
    m.failed("refused")
    assert m.health.state is State.EJECTED and not m.available(0.0)
    m.answered()
    assert m.health.state is State.HEALTHY


def test_actively_checked_member_needs_successes() -> None:
    m = member("a", Path="/system", Failures=1, Successes=2)
    m.checked(False, 1.0, "refused")
    assert m.health.state is State.EJECTED
    m.answered()  # traffic does not bring back a checked member
    assert m.health.state is State.EJECTED
    m.checked(True, 1.0, None)
    assert m.health.state is State.EJECTED
    m.checked(True, 1.0, None)
    assert m.health.state is State.HEALTHY


def test_routes_first_match_with_every_part() -> None:
    routes = Routes([HttpRoute.model_validate(r) for r in (
        {"Path": "/dicom-web/", "Header": "X-Site: north", "Upstream": "north"},
        {"Path": "/dicom-web/", "Methods": ["POST"], "Upstream": "stow"},
        {"Host": "AI.example.org", "Upstream": "ai"},
        {"Header": "X-Research", "Upstream": "research"},
    )], "main")

    def scope(method: str = "GET", path: str = "/dicom-web/studies", **headers: str) -> dict[str, object]:
        return {"method": method, "path": path,
                "headers": [(k.replace("_", "-").lower().encode(), v.encode()) for k, v in headers.items()]}

    assert routes.choose(scope(X_Site="north")) == "north"
    assert routes.choose(scope(X_Site="south")) == "main"
    assert routes.choose(scope("POST")) == "stow"
    assert routes.choose(scope(host="ai.example.org:8443")) == "ai"
    assert routes.choose(scope(X_Research="")) == "research"
    assert routes.choose(scope(path="/system")) == "main"
