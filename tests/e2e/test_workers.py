"""``Server:Workers: 2`` through the real stack (a real Orthanc, dcmtk, the gateway as a
subprocess): both workers serve the one port (health says which answered), ``SharedDict``
counts exactly across them, a script edit reaches both, the DICOM side and its forwarder run
once (worker 0), a background task submitted on any worker runs once, SIGTERM stops both
cleanly, and a worker killed with -9 is restarted and serves again. Units of the pieces:
tests/scripting/test_shared.py (the LMDB backend), tests/test_workers.py (the supervisor)."""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
from tusclient import client as tus_client

from tests import dicom_samples
from tests.e2e.test_dicom_gateway import storescu
from tests.peers import GatewayProcess, OrthancServer, free_port, wait_until
from tests.tls_certs import TestCa

GatewayFactory = Callable[..., GatewayProcess]

MAIN = """
function onHttpRequest(r)
  if r.Path == "/count" then
    local n = SharedDict:incr("hits", 1, 0)
    r:ResponseWrite(tostring(n)) return true
  end
  if r.Path == "/hits" then r:ResponseWrite(tostring(SharedDict:get("hits") or 0)) return true end
  if r.Path == "/version" then r:ResponseWrite("v1") return true end
  if r.Path == "/task" then r:ResponseWrite(LuaBackgroundWorker("main-task.lua", "work", "")) return true end
end
"""

TASK = """
function work(args)
  SharedDict:incr("task-runs", 1, 0)
  return "done"
end
"""


def workers_gateway(gateway_factory: GatewayFactory, **settings: Any) -> GatewayProcess:
    gw = gateway_factory({"Server": {"Workers": 2}, **settings}, scripts={"main.lua": MAIN, "main-task.lua": TASK})
    wait_until(lambda: health(gw)["workers"]["running"] == 2, timeout=30, what="both workers running")
    return gw


def health(gw: GatewayProcess) -> dict[str, Any]:
    """``/dicomproxy/health`` on a new connection (so it may land on either worker)."""
    answer: dict[str, Any] = requests.get(f"{gw.url}/dicomproxy/health", timeout=10,
                                          headers={"Connection": "close"}).json()
    return answer


def fresh_get(gw: GatewayProcess, path: str) -> requests.Response:
    return requests.get(f"{gw.url}{path}", timeout=10, headers={"Connection": "close"})


def answering_workers(gw: GatewayProcess, count: int = 60) -> Counter[int]:
    with ThreadPoolExecutor(8) as pool:
        return Counter(pool.map(lambda _: health(gw)["workers"]["index"], range(count)))


def worker_pids(gw: GatewayProcess) -> dict[int, int]:
    seen: dict[int, int] = {}

    def look() -> bool:
        w = health(gw)["workers"]
        seen[w["index"]] = w["pid"]
        return len(seen) == 2

    wait_until(look, timeout=20, what="health answered by both workers")
    return seen


def test_both_workers_serve_and_shared_dict_counts_exactly(gateway_factory: GatewayFactory) -> None:
    gw = workers_gateway(gateway_factory)
    seen = answering_workers(gw)
    assert set(seen) == {0, 1}, f"health answered by {dict(seen)}: both workers should accept on the one port"
    first = health(gw)["workers"]
    assert first["configured"] == 2 and first["running"] == 2 and first["pid"] != os.getpid()

    n = 200
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: fresh_get(gw, "/count"), range(n)))
    assert all(a.status_code == 200 for a in answers)
    # every increment returned a distinct value 1..n: one atomic incr per request, whichever worker
    assert sorted(int(a.text) for a in answers) == list(range(1, n + 1))
    assert {fresh_get(gw, "/hits").text for _ in range(10)} == {str(n)}

    # the metrics are every worker's, whichever worker is scraped: the Lua hook ran once per request
    # (each scrape is a request too, so successive scrapes see +1 each, never one worker's share)
    hooks = []
    for _ in range(6):
        text = fresh_get(gw, "/dicomproxy/metrics").text
        found = re.search(r'^dicomproxy_lua_hook_seconds_count\{callback="onHttpRequest"\} (\S+)$', text, re.M)
        assert found, "the hook histogram in the metrics"
        hooks.append(float(found.group(1)))
    assert hooks == [hooks[0] + i for i in range(6)] and hooks[0] >= n + 10

    # the status page's graphs are drawn from every worker's series too: the hook's request rate
    # seen by either worker's history covers the requests both served
    def hook_rate_total() -> float:
        history = fresh_get(gw, "/dicomproxy/ui/history?since=0").json()
        rates = [v for k, points in history["series"].items() if k.startswith("dicomproxy_lua_hook_seconds")
                 and 'callback="onHttpRequest"' in k and k.endswith(":rate") for v in points if v]
        return sum(rates)

    wait_until(lambda: hook_rate_total() >= n, timeout=10, what="the history's hook rate summing to the requests")


def test_a_script_edit_reloads_in_both_workers(gateway_factory: GatewayFactory) -> None:
    gw = workers_gateway(gateway_factory)
    assert {fresh_get(gw, "/version").text for _ in range(20)} == {"v1"}
    gw.write_script("main.lua", MAIN.replace('"v1"', '"v2"'))

    # each worker polls the scripts folder itself (Lua:ReloadIntervalMs); the connections are spread
    # over both (SO_REUSEPORT), so 40 answers of v2 in a row are both workers' answers
    wait_until(lambda: {fresh_get(gw, "/version").text for _ in range(40)} == {"v2"}, timeout=20,
               what="every worker answering v2 after the edit")
    assert set(answering_workers(gw)) == {0, 1}


def test_dicom_and_the_forwarder_run_once_and_tasks_run_once(
    gateway_factory: GatewayFactory, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    gw = workers_gateway(gateway_factory)
    listening = [h["dicom"] for h in (health(gw) for _ in range(20))]
    owners = {bool(d.get("listening")) for d in listening}
    assert owners == {True, False}, "only worker 0 reports the DICOM listener"
    assert gw.log_text().count(f"listening on {'127.0.0.1'}:{gw.dicom_port}") == 1

    path = tmp_path / "ct.dcm"
    dicom_samples.make_instance(path, patient_id="W1", patient_name="Workers^Test")
    storescu(gw, path)
    fresh_orthanc.wait_for_instances(1)

    def forwarded_total() -> float:
        text = fresh_get(gw, "/dicomproxy/metrics").text
        found = re.search(r"^dicomproxy_dicom_forwarded_total (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    wait_until(lambda: forwarded_total() == 1.0, timeout=15, what="the instance forwarded (metrics)")
    time.sleep(1.0)  # a second forwarder (none: worker 0 owns the spool) would have sent it by now
    assert {forwarded_total() for _ in range(6)} == {1.0}, "forwarded exactly once, as every worker's scrape says"
    assert fresh_orthanc.instance_count() == 1

    # background tasks submitted on either worker run once each, in worker 0
    ids = [fresh_get(gw, "/task").text for _ in range(8)]
    assert all(ids)
    wait_until(lambda: fresh_get(gw, "/dicomproxy/tasks?state=done").json().__len__() >= 8, timeout=20,
               what="all 8 tasks done")
    assert fresh_get(gw, "/dicomproxy/tasks?state=done").json().__len__() == 8
    wait_until(lambda: all(fresh_get(gw, f"/dicomproxy/tasks/{i}").status_code == 200 for i in ids), timeout=5,
               what="every worker lists every task")


def test_sigterm_stops_both_workers_cleanly(gateway_factory: GatewayFactory) -> None:
    gw = workers_gateway(gateway_factory)
    pids = worker_pids(gw)
    assert gw.stop() == 0
    log = gw.log_text()
    assert "DicomProxy worker 0 stopped (exit status 0)" in log
    assert "DicomProxy worker 1 stopped (exit status 0)" in log
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


def test_a_worker_killed_with_sigkill_is_restarted_and_serves(gateway_factory: GatewayFactory) -> None:
    gw = workers_gateway(gateway_factory)
    pids = worker_pids(gw)
    os.kill(pids[1], signal.SIGKILL)
    assert [fresh_get(gw, "/count").status_code for _ in range(20)] == [200] * 20  # worker 0 serves meanwhile

    def replaced() -> bool:
        w = health(gw)["workers"]
        return w["running"] == 2 and w["restarts"] == 1 and w["index"] == 1 and w["pid"] != pids[1]

    wait_until(replaced, timeout=30, what="worker 1 restarted with a new pid, answering")
    assert re.search(rf"worker 1 \(pid {pids[1]}\) died after [\d.]+s \(killed by SIGKILL\): restarting it",
                     gw.log_text())
    assert set(answering_workers(gw)) == {0, 1}
    assert gw.stop() == 0


def test_https_and_http_listeners_are_served_by_both_workers(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    """Every Urls entry, https included: each worker has its own TLS acceptor and certificate store."""
    ca = TestCa.create(tmp_path / "ca")
    server = ca.issue("server", ["127.0.0.1", "localhost"], key_kind="rsa")
    https_port = free_port()
    gw = gateway_factory({
        "Urls": f"http://127.0.0.1:{free_port()};https://127.0.0.1:{https_port}",
        "Https": {"CertificateFile": str(server.cert_path), "KeyFile": str(server.key_path)},
        "Server": {"Workers": 2}, "Dicom": {"Port": 0}}, scripts={"main.lua": MAIN})
    wait_until(lambda: health(gw)["workers"]["running"] == 2, timeout=30, what="both workers running")

    def tls_health(_: int) -> dict[str, Any]:
        answer: dict[str, Any] = requests.get(f"https://127.0.0.1:{https_port}/dicomproxy/health", timeout=10,
                                              verify=str(ca.cert_path), headers={"Connection": "close"}).json()
        return answer

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(tls_health, range(40)))
    assert {a["workers"]["index"] for a in answers} == {0, 1}
    assert all(a["https"]["ok"] for a in answers)
    assert set(answering_workers(gw, 40)) == {0, 1}  # the plain listener too
    assert gw.stop() == 0
    log = gw.log_text()
    assert log.count("stopped (exit status 0)") == 3  # both workers and the supervisor
    assert "Application shutdown failed" not in log  # (CertificateStore.settle was a number, not settle(until))


def test_a_tus_upload_spread_over_both_workers_is_imported_once(
    gateway_factory: GatewayFactory, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    """tuspy opens a new connection per request, so the PATCHes land on both workers (the
    upload's file lock is across processes); the import task, submitted by whichever worker took
    the last PATCH, runs once in worker 0."""
    gw = workers_gateway(gateway_factory)
    path, sop_uid = dicom_samples.make_instance(tmp_path / "ct.dcm", patient_id="W2", patient_name="Workers^Tus",
                                                size=(64, 64))
    size = Path(path).stat().st_size
    uploader = tus_client.TusClient(gw.url + "/files/").uploader(str(path), chunk_size=1024,
                                                                 metadata={"filename": "ct.dcm"})
    uploader.upload()
    assert size // 1024 >= 8  # that many PATCHes, each on a new connection: both workers took some

    def imports() -> list[dict[str, Any]]:
        return [t for t in fresh_get(gw, "/dicomproxy/tasks").json() if t["kind"] == "tus-import"]

    wait_until(lambda: [t["state"] for t in imports()] == ["done"], timeout=60, what="the import done")
    assert fresh_orthanc.sop_instance_uids() == {sop_uid}
    time.sleep(1.0)  # two adoption rounds: the task is not run a second time
    assert [t["attempts"] for t in imports()] == [1]
    text = fresh_get(gw, "/dicomproxy/metrics").text
    assert 'dicomproxy_tus_imports_total{outcome="stored"} 1.0' in text


def test_worker_0_killed_with_sigkill_comes_back_with_the_dicom_port(
    gateway_factory: GatewayFactory, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    gw = workers_gateway(gateway_factory)
    pids = worker_pids(gw)
    os.kill(pids[0], signal.SIGKILL)

    def back() -> bool:
        h = health(gw)
        return h["workers"]["index"] == 0 and h["workers"]["pid"] != pids[0] and bool(h["dicom"].get("listening"))

    wait_until(back, timeout=30, what="worker 0 restarted, listening on the DICOM port again")
    path, sop_uid = dicom_samples.make_instance(tmp_path / "ct.dcm", patient_id="W3", patient_name="Workers^Zero")
    storescu(gw, path)
    fresh_orthanc.wait_for_instances(1)
    assert fresh_orthanc.sop_instance_uids() == {sop_uid}
    assert gw.stop() == 0
