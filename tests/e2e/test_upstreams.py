"""Several PACS behind one gateway, HTTP side (issue 13): three real Orthancs, started once for
the module; each gateway is a real subprocess with a ``servers.json`` beside its appsettings.json.

Which Orthanc answered is read from the answer itself: each has its own ``Name``, which
``GET /system`` returns, and the Lua hooks echo ``request.Upstream``/``response.Upstream``."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.dicom_samples import make_instance
from tests.peers import GatewayProcess, OrthancServer, free_port, wait_until

NAMES = ("a", "b", "c")
NO_DICOM = {"Dicom": {"Port": 0}}
STUDY_ALL = "1.2.826.0.1.3680043.10.999.13.1"  # on a and b
STUDY_B = "1.2.826.0.1.3680043.10.999.13.2"  # on b only
STUDY_C = "1.2.826.0.1.3680043.10.999.13.3"  # on c only


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, OrthancServer]]:
    servers = {n: OrthancServer(tmp_path_factory.mktemp(f"orthanc-{n}"), aet=f"PACS{n.upper()}",
                                extra_config={"Name": f"pacs-{n}"}) for n in NAMES}
    for server in servers.values():
        server.start()
    def upload(server: OrthancServer, study: str, n: int) -> None:
        for i in range(n):
            data, _ = make_instance(patient_id=f"P{study[-1]}", patient_name="Routing^Test", study_uid=study,
                                    series_uid=f"{study}.1", sop_uid=f"{study}.1.{i + 1}", size=(64, 64))
            server.upload(data)  # type: ignore[arg-type]
    upload(servers["a"], STUDY_ALL, 3)
    upload(servers["b"], STUDY_ALL, 3)
    upload(servers["b"], STUDY_B, 1)
    upload(servers["c"], STUDY_C, 1)
    try:
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def servers_json(pacs: dict[str, OrthancServer], **extra: Any) -> dict[str, Any]:
    check = extra.pop("check", {})
    return {"Servers": {n: {"Url": s.http_url, "Dicom": {"Aet": s.aet, "Port": s.dicom_port}, "HealthCheck": check,
                            **extra.pop(f"server_{n}", {})} for n, s in pacs.items()}, **extra}


@pytest.fixture
def routed(gateway_factory: Callable[..., GatewayProcess], pacs: dict[str, OrthancServer]
           ) -> Callable[..., GatewayProcess]:
    def make(servers: dict[str, Any], scripts: dict[str, str] | None = None) -> GatewayProcess:
        gw = gateway_factory(NO_DICOM, scripts, orthanc=pacs["a"], start=False)
        (gw.config_path.parent / "servers.json").write_text(json.dumps(servers))
        return gw.start()
    return make


def served_by(gw: GatewayProcess, path: str = "/system", **kwargs: Any) -> str:
    answer = gw.get(path, **kwargs)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["Name"]).removeprefix("pacs-")


ECHO_UPSTREAM = """
function onHttpRequest(request)
  local wanted = request.Headers["X-Lua-Upstream"]
  if wanted then request:SetUpstream(wanted) end
  request:AddResponseHeader("X-Request-Upstream", request.Upstream)
end
function onHttpResponse(response)
  response:AddHeader("X-Response-Upstream", response.Upstream)
end
"""


def test_routes_by_path_host_header_and_lua(routed: Callable[..., GatewayProcess],
                                            pacs: dict[str, OrthancServer]) -> None:
    gw = routed(servers_json(pacs, Groups={"bc": {"Members": ["b", "c"]}}, Default="a", Routes=[
        {"Path": "/system", "Header": "X-Site: north", "Upstream": "c"},
        {"Path": "/system", "Methods": ["GET"], "Host": "pacs-b.example", "Upstream": "b"},
        {"Path": "/statistics", "Upstream": "bc"},
    ]), {"main.lua": ECHO_UPSTREAM})
    assert served_by(gw) == "a"  # no route matches: Default
    assert served_by(gw, headers={"X-Site": "north"}) == "c"
    assert served_by(gw, headers={"X-Site": "south"}) == "a"
    assert served_by(gw, headers={"Host": "PACS-B.example:8080"}) == "b"
    stats = gw.get("/statistics")  # the Failover group bc: b while it is healthy
    assert stats.status_code == 200 and stats.headers["X-Request-Upstream"] == "bc"
    assert stats.headers["X-Response-Upstream"] == "b"
    answer = gw.get("/system", headers={"X-Lua-Upstream": "c"})  # the script wins over the routes
    assert answer.json()["Name"] == "pacs-c"
    assert answer.headers["X-Request-Upstream"] == "c" and answer.headers["X-Response-Upstream"] == "c"
    assert gw.get("/system").headers["X-Request-Upstream"] == "a"
    wrong = gw.get("/system", headers={"X-Lua-Upstream": "nowhere"})
    assert wrong.status_code == 500
    assert "'nowhere'" in wrong.json()["message"] and "known: a, b, bc, c, default" in wrong.json()["message"]


def test_round_robin_spreads_by_weight(routed: Callable[..., GatewayProcess],
                                       pacs: dict[str, OrthancServer]) -> None:
    gw = routed(servers_json(pacs, server_a={"Weight": 2},
                             Groups={"all": {"Members": ["a", "b", "c"], "Mode": "RoundRobin"}}, Default="all"))
    counts = Counter(served_by(gw) for _ in range(40))
    assert counts == {"a": 20, "b": 10, "c": 10}
    metrics = gw.get("/dicomproxy/metrics").text
    for n, c in counts.items():
        assert f'dicomproxy_upstream_requests_total{{status="2xx",upstream="{n}"}} {float(c)}' in metrics


def test_least_connections_prefers_the_idle_member(routed: Callable[..., GatewayProcess],
                                                   pacs: dict[str, OrthancServer]) -> None:
    gw = routed(servers_json(pacs, Groups={"lc": {"Members": ["a", "b"], "Mode": "LeastConnections"}},
                             Default="lc"))
    # sequential requests: nothing in flight, ties go to the first member
    assert {served_by(gw) for _ in range(5)} == {"a"}


def wado_loop(gw: GatewayProcess, stop: threading.Event, log: list[tuple[float, int, int, str]],
              parts: list[int] | None = None) -> None:
    """WADO-RS downloads of STUDY_ALL, one after the other: (time, status, bytes, who answered);
    ``parts``: the number of instances in each answer (closed multipart bodies only)."""
    while not stop.is_set():
        try:
            answer = gw.get(f"/dicom-web/studies/{STUDY_ALL}", headers={"Accept": "multipart/related; "
                            "type=\"application/dicom\""}, timeout=30)
        except (requests.exceptions.ChunkedEncodingError, requests.ConnectionError):  # its body cut short
            log.append((time.monotonic(), 200, -1, "a?"))
            if parts is not None:
                parts.append(-1)
            continue
        log.append((time.monotonic(), answer.status_code, len(answer.content),
                    answer.headers.get("X-Response-Upstream", "")))
        if parts is not None:
            parts.append(multipart_count(answer.headers.get("content-type", ""), answer.content))


def multipart_count(content_type: str, body: bytes) -> int:
    """The parts of a multipart body that ends with its closing delimiter, else -1."""
    boundary = next((p.split("=", 1)[1].strip('"') for p in content_type.split(";")
                     if p.strip().startswith("boundary=")), "")
    if not boundary or not body.rstrip().endswith(f"--{boundary}--".encode()):
        return -1
    return body.count(f"--{boundary}\r\n".encode())


def test_failover_moves_within_the_interval_and_back(routed: Callable[..., GatewayProcess],
                                                     pacs: dict[str, OrthancServer]) -> None:
    check = {"Path": "/system", "IntervalSeconds": 1, "TimeoutSeconds": 1, "Failures": 2, "Successes": 2}
    gw = routed(servers_json(pacs, check=check, Groups={"main": {"Members": ["a", "b"], "Mode": "Failover"}},
                             Default="main"), {"main.lua": ECHO_UPSTREAM})
    log: list[tuple[float, int, int, str]] = []
    parts: list[int] = []
    stop = threading.Event()
    loop = threading.Thread(target=wado_loop, args=(gw, stop, log, parts), daemon=True)
    loop.start()
    try:
        wait_until(lambda: len(log) >= 5, timeout=20, what="downloads from the primary")
        stopping = time.monotonic()
        pacs["a"].stop()
        stopped = time.monotonic()
        wait_until(lambda: gw.get("/dicomproxy/health").json()["upstreams"]["servers"]["a"]["state"] == "ejected",
                   timeout=10, what="the primary ejected")
        ejected = time.monotonic()
        assert ejected - stopped <= 2 * 1 + 1 + 1.5  # Failures x IntervalSeconds, a check's timeout, slack
        n = len(log)
        wait_until(lambda: len(log) >= n + 5, timeout=20, what="downloads from the secondary")
        pacs["a"].start()
        back = wait_until(lambda: next((t for t, *_, who in log if t > ejected and who == "a"), None), timeout=15,
                          what="the primary serving again")
        assert back - ejected > 0
        n = len(log)
        wait_until(lambda: len(log) >= n + 3, timeout=20, what="downloads after the return")
    finally:
        stop.set()
        loop.join(timeout=30)
        if not pacs["a"].running:
            pacs["a"].start()
    assert [s for _, s, _, _ in log if s != 200] == []  # no request lost: every download answered
    # ... in full, each a closed multipart of the study's 3 instances. Except the one in flight when
    # the primary is stopped: Orthanc, stopped while it streams a study, either ends its chunked body
    # early (a framed 200 with the multipart not closed: measured direct, 1 in 3 stops of a 40-instance
    # download) or drops the connection; once the head is sent no proxy can move that answer to
    # another member, so the gateway relays it as it came (short) or drops the client's connection.
    short = [(t, who, n) for (t, _, _, who), n in zip(log, parts, strict=True) if n != 3]
    assert len(short) <= 1 and all(who in ("a", "a?") and stopping <= t <= ejected for t, who, n in short), \
        (short, stopping, ejected)
    sizes = {size for (_, _, size, _), n in zip(log, parts, strict=True) if n == 3}
    assert max(sizes) - min(sizes) < 512  # same study (multipart boundaries differ)
    who = [w for *_, w in log if w != "a?"]
    assert who[0] == "a" and "b" in who and who[-1] == "a"
    health = gw.get("/dicomproxy/health").json()["upstreams"]
    assert health["servers"]["a"]["state"] == "healthy" and health["servers"]["a"]["errors"] >= 2
    assert "password" not in json.dumps(health).lower()


def test_hot_reload_good_edit_applies_broken_edit_keeps(routed: Callable[..., GatewayProcess],
                                                        pacs: dict[str, OrthancServer]) -> None:
    gw = routed(servers_json(pacs, Default="a"))
    assert served_by(gw) == "a"
    file = gw.config_path.parent / "servers.json"
    file.write_text(json.dumps(servers_json(pacs, Default="c")))
    wait_until(lambda: served_by(gw) == "c", timeout=10, what="the edit of Default to take effect")
    file.write_text(json.dumps(servers_json(pacs, Default="nowhere")))
    line = wait_until(lambda: next((ln for ln in Path(gw.log_path).read_text().splitlines()
                                    if "not applied" in ln), None), timeout=10, what="the broken edit logged")
    assert "servers.json" in line and "Default" in line and "'nowhere'" in line
    assert served_by(gw) == "c"
    file.write_text("{not json")
    wait_until(lambda: sum("not applied" in ln for ln in Path(gw.log_path).read_text().splitlines()) >= 2,
               timeout=10, what="the invalid JSON logged")
    assert served_by(gw) == "c"
    assert gw.get("/dicomproxy/health").json()["upstreams"]["reloadError"]


def test_federated_qido_merges_and_names_missing_members(routed: Callable[..., GatewayProcess],
                                                         pacs: dict[str, OrthancServer]) -> None:
    gw = routed(servers_json(pacs, Groups={"fed": {"Members": ["a", "b", "c"], "Federated": True}},
                             Routes=[{"Path": "/dicom-web/", "Upstream": "fed"}]))

    def studies(query: str = "") -> tuple[list[str], str | None]:
        answer = gw.get(f"/dicom-web/studies{query}", headers={"Accept": "application/dicom+json"})
        assert answer.status_code == 200, answer.text
        return [s["0020000D"]["Value"][0] for s in answer.json()], answer.headers.get("X-DicomProxy-Missing-Members")

    found, missing = studies()
    assert sorted(found) == sorted([STUDY_ALL, STUDY_B, STUDY_C]) and missing is None  # the union, once each
    page, _ = studies("?limit=2")
    rest, _ = studies("?limit=2&offset=2")
    assert len(page) == 2 and len(rest) == 1 and sorted(page + rest) == sorted(found)
    pacs["c"].stop()
    try:
        found, missing = studies()
        assert sorted(found) == sorted([STUDY_ALL, STUDY_B]) and missing == "c"
    finally:
        pacs["c"].start()


def test_echo_checks_and_per_upstream_health_and_metrics(routed: Callable[..., GatewayProcess],
                                                         pacs: dict[str, OrthancServer]) -> None:
    """C-ECHO as the health check (the gateway's own upper layer): a and b answer; c's DICOM
    port is wrong, so c is ejected; health and metrics say so per upstream."""
    check = {"Echo": True, "IntervalSeconds": 0.5, "TimeoutSeconds": 2, "Failures": 1}
    servers = servers_json(pacs, check=check, Groups={"all": {"Members": ["c", "a"]}}, Default="all")
    servers["Servers"]["c"]["Dicom"]["Port"] = free_port()  # nothing listens there
    gw = routed(servers)

    def state() -> dict[str, Any]:
        return dict(gw.get("/dicomproxy/health").json()["upstreams"]["servers"])

    wait_until(lambda: state()["c"]["state"] == "ejected" and state()["a"]["latencyMs"] is not None, timeout=15,
               what="c ejected by its C-ECHO check")
    servers_now = state()
    assert servers_now["a"]["state"] == "healthy" and servers_now["b"]["state"] == "healthy"
    assert servers_now["a"]["dicom"] == f"PACSA@127.0.0.1:{pacs['a'].dicom_port}"
    assert "C-ECHO" in servers_now["c"]["lastError"] or "connect" in servers_now["c"]["lastError"].lower()
    assert gw.get("/dicomproxy/health").json()["status"] == "degraded"
    assert served_by(gw) == "a"  # the Failover group skips the ejected c
    assert "C-ECHO" in pacs["a"].log_text() or "ECHO" in pacs["a"].log_text().upper()
    metrics = wait_until(lambda: (m := gw.get("/dicomproxy/metrics").text)
                         and 'dicomproxy_upstream_healthy{upstream="c"} 0.0' in m and m, timeout=5,
                         what="the healthy gauge of c at 0")
    assert 'dicomproxy_upstream_healthy{upstream="a"} 1.0' in metrics
    assert 'dicomproxy_upstream_check_latency_seconds{upstream="a"}' in metrics


def test_reload_lets_a_download_finish_on_the_retired_server(routed: Callable[..., GatewayProcess],
                                                             pacs: dict[str, OrthancServer]) -> None:
    """A download under way when servers.json drops its server ends in full on that server's
    pool; the pool closes after it; new requests go where the edit says."""
    data, _ = make_instance(patient_id="PBIG", patient_name="Big^Download", size=(2048, 2048))
    assert isinstance(data, bytes)
    orthanc_id = pacs["b"].upload(data)["ID"]
    try:
        gw = routed(servers_json(pacs, Default="b"))
        file = gw.config_path.parent / "servers.json"
        answer = gw.get(f"/instances/{orthanc_id}/file", stream=True)
        assert answer.status_code == 200
        parts = answer.iter_content(64 << 10)
        got = bytearray(next(parts))
        edited = servers_json(pacs, Default="a")
        del edited["Servers"]["b"]
        file.write_text(json.dumps(edited))
        wait_until(lambda: "reloaded" in Path(gw.log_path).read_text(), timeout=10, what="the edit applied")
        assert served_by(gw) == "a"
        assert "upstream b retired" not in Path(gw.log_path).read_text()  # its download is still under way
        for part in parts:
            got += part
        assert bytes(got) == pacs["b"].request("GET", f"/instances/{orthanc_id}/file").content
        wait_until(lambda: "upstream b retired" in Path(gw.log_path).read_text(), timeout=10,
                   what="b's pool closed after its last request")
        assert "b" not in gw.get("/dicomproxy/health").json()["upstreams"]["servers"]
    finally:
        pacs["b"].rest_delete(f"/instances/{orthanc_id}")
