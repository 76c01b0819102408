"""The operator's view of /dicomproxy/ui in headless Chromium, against the real gateway and Orthanc.

* the graphs render from ``/dicomproxy/ui/history`` and move while a bounded traffic generator
  sends proxied requests (to the real Orthanc) through the gateway;
* with a full ring (a day of uptime: 3600 points a series) and 10 updates a second the page
  keeps up, each update's cost measured in the browser;
* a broken script shows its ``file:line`` and its source with that line marked; ``dicomproxy
  check`` runs from the page;
* the admin routes (source, check, audit) refuse a viewer; the audit panel shows failed logins.

Screenshots go to ``build/artifacts/ui/`` (``DICOMPROXY_ARTIFACTS`` overrides), the README links
the committed copies in ``docs/screenshots/``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.e2e.test_ui import CHROMIUM_ARGS
from tests.e2e.test_ui import browser as browser  # noqa: F401  (the module's Chromium fixture)
from tests.peers import GatewayProcess, OrthancServer, free_port

ADMIN, ADMIN_PW = "root", "adm1n-pw"
VIEWER, VIEWER_PW = "watcher", "v1ewer-pw"
ARTIFACTS = Path(os.environ.get("DICOMPROXY_ARTIFACTS", Path(__file__).resolve().parents[2] / "build" / "artifacts"))

SCRIPT = r"""
function onHttpRequest(req) return false end
function onSendMail(mail) return false end
"""
BROKEN = SCRIPT + "\nlocal x = 1\nthis is not lua (\n"
BROKEN_LINE = len(BROKEN.split("\n")) - 1  # the line of "this is not lua (" (1-based)

assert CHROMIUM_ARGS


def artifact(name: str) -> str:
    folder = ARTIFACTS / "ui"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / name)


@pytest.fixture
def gateway(gateway_factory: Callable[..., GatewayProcess], fresh_orthanc: OrthancServer) -> GatewayProcess:
    users = {ADMIN: {"Password": ADMIN_PW, "Roles": ["admin"]}, VIEWER: VIEWER_PW}
    return gateway_factory({"Authentication": {"Users": users}, "Audit": {"Enabled": True}},
                           {"main.lua": SCRIPT}, orthanc=fresh_orthanc)


def open_page(browser: Any, url: str, user: str, password: str) -> Any:
    context = browser.new_context(http_credentials={"username": user, "password": password},
                                  viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    page.errors = []  # type: ignore[attr-defined]
    page.on("pageerror", lambda e: page.errors.append(str(e)))  # type: ignore[attr-defined]
    # a Content-Security-Policy violation (an inline style or script uPlot might add) is a console error
    page.on("console", lambda m: m.type == "error" and "Content Security Policy" in m.text
            and page.errors.append(m.text))  # type: ignore[attr-defined]
    page.goto(url)
    return page


@pytest.fixture
def admin_page(browser: Any, gateway: GatewayProcess) -> Iterator[Any]:
    page = open_page(browser, gateway.url + "/dicomproxy/ui", ADMIN, ADMIN_PW)
    try:
        yield page
    finally:
        page.context.close()


class Traffic:
    """A bounded load: at most ``total`` proxied GETs, ``rate`` a second, from one thread."""

    def __init__(self, url: str, auth: tuple[str, str], total: int = 600, rate: float = 40.0) -> None:
        self.url, self.auth, self.total, self.rate = url, auth, total, rate
        self.sent = 0
        self.statuses: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def one(self, session: requests.Session) -> int:
        """One request; its status. A subclass sends another kind."""
        path = "/system" if self.sent % 10 else "/no-such-route"  # some 404s too
        return session.get(self.url + path, timeout=10).status_code

    def _run(self) -> None:
        with requests.Session() as s:
            s.auth = self.auth
            started = time.monotonic()
            while self.sent < self.total and not self._stop.is_set():
                status = self.one(s)
                self.statuses[status] = self.statuses.get(status, 0) + 1
                self.sent += 1
                ahead = started + self.sent / self.rate - time.monotonic()
                if ahead > 0:
                    self._stop.wait(ahead)


def chart_pixels(page: Any, chart: str) -> str:
    return str(page.evaluate("(id) => document.querySelector(`#chart-${id} canvas`).toDataURL()", chart))


def test_graphs_render_and_move_under_load(admin_page: Any, gateway: GatewayProcess) -> None:
    page = admin_page
    page.wait_for_selector("#chart-requests .empty", timeout=10000)  # placeholders before data
    with Traffic(gateway.url, (ADMIN, ADMIN_PW)) as traffic:
        page.wait_for_selector("#chart-requests[data-series*='2xx'] canvas", timeout=20000)
        page.wait_for_function(
            "() => { const n = document.querySelector('#chart-requests'); const i = n.dataset.series.split(',')"
            ".indexOf('2xx'); return i >= 0 && parseFloat(n.dataset.last.split(',')[i]) > 5; }", timeout=20000)
        page.wait_for_selector("#chart-latency[data-series='p50,p99'] canvas", timeout=20000)
        page.wait_for_selector("#chart-hooks[data-series*='onHttpRequest'] canvas", timeout=20000)
        before = chart_pixels(page, "requests")
        updates = page.evaluate("window.dicomproxyGraphs.updates")
        page.wait_for_function("(n) => window.dicomproxyGraphs.updates >= n + 3", arg=updates, timeout=15000)
        assert chart_pixels(page, "requests") != before  # the graph moved
        page.wait_for_selector("#chart-requests[data-series*='4xx']", timeout=20000)
        page.screenshot(path=artifact("graphs.png"), full_page=True)
    assert traffic.statuses.get(200, 0) > 0 and traffic.statuses.get(404, 0) > 0, traffic.statuses
    # the same series stay on /dicomproxy/metrics
    metrics = requests.get(gateway.url + "/dicomproxy/metrics", auth=(ADMIN, ADMIN_PW), timeout=10).text
    assert 'dicomproxy_proxy_requests_total{status="2xx"}' in metrics
    stats = page.evaluate("window.dicomproxyGraphs")
    assert stats["errors"] == 0 and page.errors == [], (stats, page.errors)
    # the endpoint's answer is a delta: a page that is up to date gets at most a point or two
    auth = (ADMIN, ADMIN_PW)
    full = requests.get(gateway.url + "/dicomproxy/ui/history?since=0", auth=auth, timeout=10).json()
    delta = requests.get(gateway.url + f"/dicomproxy/ui/history?since={full['seq']}", auth=auth, timeout=10).json()
    assert len(full["t"]) >= 5 and len(delta["t"]) <= 2 and delta["first"] == full["seq"] + 1
    assert requests.get(gateway.url + "/dicomproxy/ui/history?since=x", auth=auth, timeout=10).status_code == 400
    ring = requests.get(gateway.url + "/dicomproxy/health", auth=auth, timeout=10).json()["ui"]
    assert ring["bytes"] == (ring["series"] + 1) * 3600 * 8 and ring["capacity"] == 3600
    print(f"\nthis gateway: {ring['series']} series, a full ring {ring['bytes'] / 1e6:.2f} MB, "
          f"one sample {ring['sampleMs']} ms")


# Answers /dicomproxy/ui/history in the page itself (a wrapped fetch): the ring full at the first
# call, one new point per call after, so what is measured is the page's own cost per update.
SYNTHETIC_HISTORY = r"""
(() => {
  const keys = ["1xx", "2xx", "3xx", "4xx", "5xx"].map(c => `dicomproxy_proxy_requests_total{status="${c}"}`)
    .concat(["dicomproxy_proxy_first_byte_seconds:p50", "dicomproxy_proxy_first_byte_seconds:p99",
             "dicomproxy_dicom_spool_depth", "dicomproxy_dicom_failed_folder", "dicomproxy_dicom_received_total",
             "dicomproxy_dicom_forwarded_total", "dicomproxy_tus_bytes_received_total",
             "dicomproxy_dicom_forward_seconds:p50", "dicomproxy_dicom_forward_seconds:p99",
             "dicomproxy_tus_uploads_created_total", "dicomproxy_tus_uploads_finished_total"])
    .concat([0, 1, 2, 3, 4, 5].map(i => `dicomproxy_lua_hook_seconds{callback="on${i}"}:p99`));
  while (keys.length < 60) keys.push("dicomproxy_other_" + keys.length);
  const t0 = 1700000000;
  function answer(first, n) {
    const series = {};
    keys.forEach((k, j) => { series[k] = Array.from({length: n}, (_, i) => ((first + i) * (j + 1)) % 97 / 10); });
    return {seq: first + n - 1, first: first, interval: 1, t: Array.from({length: n}, (_, i) => t0 + first + i),
            series: series};
  }
  window.syntheticHistoryServed = 0;
  const real = window.fetch.bind(window);
  window.fetch = (url, opts) => {
    const m = /\/dicomproxy\/ui\/history\?since=(\d+)/.exec(String(url));
    if (!m) return real(url, opts);
    const since = parseInt(m[1], 10);
    window.syntheticHistoryServed += 1;
    const full = parseInt(new URLSearchParams(location.search).get("synthetic") || "3600", 10);
    const body = JSON.stringify(since === 0 ? answer(1, full) : answer(since + 1, 1));
    return Promise.resolve(new Response(body, {status: 200, headers: {"Content-Type": "application/json"}}));
  };
})();
"""


def update_cost(context: Any, url: str, points: int, updates: int = 20) -> tuple[float, float]:
    """(ms per update, updates per second) of the page polling every 100 ms with ``points`` kept."""
    page = context.new_page()
    try:
        page.goto(f"{url}/dicomproxy/ui?refresh=100&synthetic={points}")
        page.wait_for_function("(n) => window.dicomproxyGraphs.points >= n", arg=points, timeout=30000)
        js = "({u: window.dicomproxyGraphs.updates, t: performance.now(), ms: window.dicomproxyGraphs.totalMs})"
        start = page.evaluate(js)
        page.wait_for_function("(n) => window.dicomproxyGraphs.updates >= n", arg=start["u"] + updates, timeout=60000)
        end = page.evaluate(js)
        kept = page.evaluate("window.dicomproxyGraphs.points")
        assert kept == 3600 if points == 3600 else points < kept < 3600  # never more than the ring
        assert page.locator("#charts canvas").count() == 8
        if points == 3600:
            page.screenshot(path=artifact("graphs-full-ring.png"), full_page=True)
        n = end["u"] - start["u"]
        return (end["ms"] - start["ms"]) / n, n / ((end["t"] - start["t"]) / 1000)
    finally:
        page.close()


def test_page_update_cost_does_not_grow_with_uptime(browser: Any, gateway: GatewayProcess) -> None:
    """A day of uptime (the ring full: 3600 points x 60 series, 8 charts) against one minute
    (60 points), both polled every 100 ms in the same run: an update costs about the same, since
    a chart draws one point per pixel column. Absolute times depend on the machine's load."""
    context = browser.new_context(http_credentials={"username": ADMIN, "password": ADMIN_PW},
                                  viewport={"width": 1400, "height": 1100})
    try:
        context.add_init_script(SYNTHETIC_HISTORY)
        minute = update_cost(context, gateway.url, 60)
        day = update_cost(context, gateway.url, 3600)
        minute2 = update_cost(context, gateway.url, 60)  # alternated: the load may change meanwhile
        base = min(minute[0], minute2[0])
        print(f"\npage update, 8 charts: 60 points {minute[0]:.1f} / {minute2[0]:.1f} ms, "
              f"3600 points {day[0]:.1f} ms ({day[0] / base:.2f}x); {day[1]:.1f} updates/s at 3600 points")
        assert day[0] < 3 * base + 5, (minute, day, minute2)
    finally:
        context.close()


def test_broken_script_shows_its_line_and_check_runs_from_the_page(admin_page: Any, gateway: GatewayProcess) -> None:
    page = admin_page
    page.wait_for_selector("#scripts-body code:text('main.lua')", timeout=15000)
    page.click("#check-run")
    page.wait_for_selector("#check-results li[data-script='main.lua'].ok", timeout=15000)
    assert "all scripts load" in page.inner_text("#check-state")

    gateway.write_script("main.lua", BROKEN)
    page.wait_for_selector("#reload-error", state="visible", timeout=20000)
    # the source opens by itself at the error, that line marked
    page.wait_for_selector(f"#source-code .line.error-line[data-line='{BROKEN_LINE}']", timeout=15000)
    marked = page.locator("#source-code .error-line")
    assert marked.count() == 1 and "this is not lua (" in marked.inner_text()
    assert f"main.lua:{BROKEN_LINE}" in page.inner_text("#scripts-body")
    assert "previous version running" in page.inner_text("#scripts-body")  # the old one still serves
    page.click("#check-run")
    page.wait_for_selector("#check-results li[data-script='main.lua'].bad", timeout=15000)
    assert f"main.lua:{BROKEN_LINE}" in page.inner_text("#check-results")
    assert "errors found" in page.inner_text("#check-state")
    page.screenshot(path=artifact("script-error.png"), full_page=True)
    assert page.errors == []


def test_admin_routes_refuse_a_viewer_and_audit_shows_failed_logins(
    browser: Any, gateway: GatewayProcess,
) -> None:
    viewer = (VIEWER, VIEWER_PW)
    for method, path in (("GET", "/dicomproxy/ui/scripts/source?script=main.lua"), ("POST", "/dicomproxy/ui/check"),
                         ("GET", "/dicomproxy/ui/audit")):
        assert requests.request(method, gateway.url + path, auth=viewer, timeout=10).status_code == 403, path
    assert requests.get(gateway.url + "/dicomproxy/ui/history", auth=viewer, timeout=10).status_code == 200
    admin = (ADMIN, ADMIN_PW)
    # check runs the scripts: not from another site's page, even with the admin's credentials
    cross = requests.post(gateway.url + "/dicomproxy/ui/check", auth=admin, timeout=10,
                          headers={"Origin": "https://evil.example"})
    assert cross.status_code == 403
    source = requests.get(gateway.url + "/dicomproxy/ui/scripts/source?script=main.lua", auth=admin, timeout=10)
    assert source.status_code == 200 and source.json()["source"] == SCRIPT
    assert requests.get(gateway.url + "/dicomproxy/ui/scripts/source?script=../appsettings.json", auth=admin,
                        timeout=10).status_code == 404
    # a failed login: its audit event reaches the page
    assert requests.get(gateway.url + "/dicomproxy/ui", auth=("mallory", "guess"), timeout=10).status_code == 401
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        events = requests.get(gateway.url + "/dicomproxy/ui/audit?limit=200", auth=admin, timeout=10).json()["events"]
        if any(e["event"] == "User Authentication" and e["outcome"] != 0 for e in events):
            break
        time.sleep(0.2)
    page = open_page(browser, gateway.url + "/dicomproxy/ui", ADMIN, ADMIN_PW)
    try:
        page.wait_for_selector("#security-body tr[data-event='User Authentication']", timeout=15000)
        assert "mallory" in page.inner_text("#security-body")
        page.screenshot(path=artifact("security.png"), full_page=True)
        assert page.errors == []
    finally:
        page.context.close()
    vpage = open_page(browser, gateway.url + "/dicomproxy/ui", VIEWER, VIEWER_PW)
    try:
        vpage.wait_for_selector("#audit-state:text('admins only')", timeout=15000)
        vpage.wait_for_selector("#chart-requests", timeout=15000)  # the graphs are for viewers too
        assert vpage.errors == []
    finally:
        vpage.context.close()


def test_upstream_panels_show_each_servers_state(browser: Any, gateway_factory: Callable[..., GatewayProcess],
                                                 fresh_orthanc: OrthancServer) -> None:
    """One panel per named upstream (servers.json): the healthy one, and one whose PACS is down,
    ejected by its active check; no credentials of either on the page."""
    users = {ADMIN: {"Password": ADMIN_PW, "Roles": ["admin"]}}
    gw = gateway_factory({"Authentication": {"Users": users}}, orthanc=fresh_orthanc, start=False)
    check = {"Path": "/system", "IntervalSeconds": 0.5, "TimeoutSeconds": 1, "Failures": 1}
    down = f"http://pacsuser:S3CRET-pw@127.0.0.1:{free_port()}"  # nothing listens there
    servers = {"Servers": {"archive": {"Url": fresh_orthanc.http_url, "HealthCheck": check},
                           "backup": {"Url": down, "HealthCheck": check}},
               "Groups": {"main": {"Members": ["archive", "backup"], "Mode": "Failover"}}, "Default": "main"}
    (gw.config_path.parent / "servers.json").write_text(json.dumps(servers))
    gw.start()
    page = open_page(browser, gw.url + "/dicomproxy/ui", ADMIN, ADMIN_PW)
    try:
        page.wait_for_selector("#upstreams:not([hidden]) [data-upstream='archive'] .badge.ok", timeout=15000)
        page.wait_for_selector("[data-upstream='backup'].ejected .badge.bad", timeout=15000)
        assert page.text_content("[data-upstream='backup'] .badge") == "ejected"
        assert "cannot connect" in (page.text_content("[data-upstream='backup']") or "")
        assert "main (Failover): archive, backup" in (page.text_content("#upstreams-groups") or "")
        for _ in range(20):  # through the group: archive serves them all
            assert requests.get(gw.url + "/system", auth=(ADMIN, ADMIN_PW), timeout=10).status_code == 200
        page.wait_for_selector("#chart-upstreams[data-series='archive'] canvas", timeout=20000)
        assert page.query_selector("#chart-upstream-errors") is None  # no upstream failed to answer a request
        text = page.text_content("body") or ""
        assert "S3CRET" not in text and "pacsuser" not in text
        page.screenshot(path=artifact("upstreams.png"), full_page=True)
        assert page.errors == []
    finally:
        page.context.close()
