"""The status page's spool, task and bytes panels in headless Chromium, against the real gateway,
a real Orthanc (checked over its REST API) and dcmtk's storescu.

* Orthanc refuses the modality's instances for good (``DicomAlwaysAllowStore`` off and the
  modality unknown to it: it aborts the C-STORE, and ``Dicom:ForwardMaxAttempts`` 1 makes that
  final): they show in the failed panel, by study, with why. The cause is then fixed (the modality
  declared in Orthanc over its REST API), one instance and then the rest of its study are retried
  FROM THE PAGE and arrive in Orthanc; another study is discarded from the page (a second click
  confirms) and its files are gone. The JSON-lines audit file records both (DICOM Instances
  Accessed, U and D, the admin's name, the study).
* A viewer sees no spool and no button; the API refuses the viewer (403) either way.
* A background task fails (its script prints, logs, then raises); the page shows its error and
  its log lines; the cause is fixed (a SharedDict flag) and the task re-run from the page completes.
* The bytes graph (proxied in and out) moves under a bounded traffic generator.

Screenshots go to ``build/artifacts/ui/`` (``DICOMPROXY_ARTIFACTS``), committed copies in
``docs/screenshots/``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

from tests import dicom_samples
from tests.e2e.test_ui import browser as browser  # noqa: F401  (the module's Chromium fixture)
from tests.e2e.test_ui_operator import Traffic, artifact, open_page
from tests.peers import LOOPBACK, GatewayProcess, OrthancServer, run_dcmtk, wait_until

ADMIN, ADMIN_PW = "root", "adm1n-pw"
VIEWER, VIEWER_PW = "watcher", "v1ewer-pw"
USERS = {ADMIN: {"Password": ADMIN_PW, "Roles": ["admin"]}, VIEWER: VIEWER_PW}

MAIN = r"""
function onHttpRequest(req)
  if req.Path == "/test/task" then
    req:ResponseWrite(LuaBackgroundWorker("main-task.lua", "run", "study 42"))
    return true
  end
  if req.Path == "/test/fix" then
    SharedDict:set("archive", "ready")
    req:ResponseWrite("fixed")
    return true
  end
  return false
end
"""
TASK = r"""
function run(args)
  print("archiving " .. args)
  LogInfo("looking for the archive of {Study}", args)
  if SharedDict:get("archive") ~= "ready" then
    LogError("the archive of {0} is not ready", args)
    error("no archive for " .. args)
  end
  print("archived " .. args)
  return "archived"
end
"""


@pytest.fixture
def pacs(orthanc_factory: Callable[..., OrthancServer]) -> OrthancServer:
    """An Orthanc that takes C-STOREs only from the modalities it knows (none, at first)."""
    return orthanc_factory(extra_config={"DicomAlwaysAllowStore": False})


@pytest.fixture
def gateway(gateway_factory: Callable[..., GatewayProcess], pacs: OrthancServer, tmp_path: Path) -> GatewayProcess:
    return gateway_factory({
        "Authentication": {"Users": USERS},
        "Audit": {"Enabled": True, "File": str(tmp_path / "audit" / "audit.jsonl")},
        "Dicom": {"StoreMode": "StoreAndForward", "ForwardMaxAttempts": 1},
    }, {"main.lua": MAIN, "main-task.lua": TASK}, orthanc=pacs)


@pytest.fixture
def admin_page(browser: Any, gateway: GatewayProcess) -> Iterator[Any]:
    page = open_page(browser, gateway.url + "/dicomproxy/ui", ADMIN, ADMIN_PW)
    try:
        yield page
    finally:
        page.context.close()


def instances(folder: Path, study: str, n: int, tag: str) -> list[tuple[Path, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    series = pydicom.uid.generate_uid()
    out = []
    for i in range(n):
        path, uid = dicom_samples.make_instance(folder / f"{tag}{i}.dcm", patient_id=f"P{tag}", patient_name="Pa^Nel",
                                                study_uid=study, series_uid=series, InstanceNumber=i + 1)
        out.append((Path(path), uid))
    return out


def audit_events(path: Path, action: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in lines if e["event"] == "DICOM Instances Accessed" and e["action"] == action]


def test_failed_instances_are_retried_and_discarded_from_the_page_and_audited(
    admin_page: Any, browser: Any, gateway: GatewayProcess, pacs: OrthancServer, tmp_path: Path,
) -> None:
    study_a, study_b = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    a = instances(tmp_path / "in", study_a, 2, "a")
    b = instances(tmp_path / "in", study_b, 1, "b")
    run_dcmtk("storescu", "-aet", "CT01", "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port),
              *[str(p) for p, _ in a + b])  # acknowledged by the gateway: spooled
    admin = (ADMIN, ADMIN_PW)
    wait_until(lambda: gateway.get("/dicomproxy/spool", auth=admin).json()["failed"] == 3, timeout=60,
               what="3 instances failed for good (Orthanc aborts the unknown modality's C-STORE)")
    assert pacs.sop_instance_uids() == set()
    page = admin_page
    row_a = page.locator(f"#spool-failed tr.failed-study[data-study='{study_a}']")
    row_a.wait_for(timeout=15000)
    # the page refreshes every few seconds: it may first show the study with one failed instance
    wait_until(lambda: "2 \u00b7" in row_a.inner_text(), timeout=20,
               what="the study's two failed instances on the page")
    assert "aborted the association" in row_a.inner_text()
    assert "Pa" in row_a.inner_text() and "CT01" in row_a.inner_text()  # patient and calling AE
    page.wait_for_selector(f"#spool-failed tr.failed-study[data-study='{study_b}']", timeout=15000)
    assert "3 instance(s) in 2 studies" in page.inner_text("#spool-failed-count")
    row_a.locator("button[data-action='instances']").click()
    first = page.locator(f"#spool-failed tr.instances[data-study='{study_a}'] tr[data-failed-id]").first
    first.wait_for(timeout=15000)
    assert "1" in first.inner_text() and "gave up after 1 attempts" in first.inner_text()
    page.screenshot(path=artifact("spool-failed.png"), full_page=True)

    # the cause fixed: Orthanc now knows the modality and takes its C-STOREs
    declared = requests.put(pacs.http_url + "/modalities/ct01", timeout=10,
                            json={"AET": "CT01", "Host": LOOPBACK, "Port": 104, "AllowStore": True})
    assert declared.status_code == 200, declared.text
    retried_uid = first.locator("code").inner_text()
    first.locator("button[data-action='retry']").click()
    wait_until(lambda: pacs.sop_instance_uids() == {retried_uid}, timeout=60, what="the retried instance in Orthanc")
    row_a.wait_for(timeout=15000)
    page.wait_for_function("(s) => document.querySelector(`#spool-failed tr.failed-study[data-study='${s}']`)"
                           ".innerText.includes('1 \u00b7')", arg=study_a, timeout=15000)
    row_a.locator("button[data-action='retry-study']").click()  # the rest of the study
    wait_until(lambda: pacs.sop_instance_uids() == {u for _, u in a}, timeout=60, what="study A in Orthanc")
    page.wait_for_selector(f"#spool-failed tr.failed-study[data-study='{study_a}']", state="detached", timeout=15000)

    # discard: a second click confirms
    discard = page.locator(f"#spool-failed tr.failed-study[data-study='{study_b}'] button[data-action='discard-study']")
    discard.click()
    page.wait_for_selector(f"#spool-failed tr.failed-study[data-study='{study_b}'] button.confirm", timeout=5000)
    assert gateway.get("/dicomproxy/spool", auth=admin).json()["failed"] == 1  # not yet
    page.locator(f"#spool-failed tr.failed-study[data-study='{study_b}'] button.confirm").click()
    page.wait_for_selector(f"#spool-failed tr.failed-study[data-study='{study_b}']", state="detached", timeout=15000)
    page.wait_for_selector("#spool-failed-count:text('0 instance(s) in 0 studies')", timeout=15000)
    assert gateway.get("/dicomproxy/spool", auth=admin).json() | {"destinations": None} == {
        "depth": 0, "failed": 0, "destinations": None}
    assert not list((gateway.data_dir / "spool" / "failed").iterdir())
    assert pacs.sop_instance_uids() == {u for _, u in a}  # the discarded one never went
    page.screenshot(path=artifact("spool-after.png"), full_page=True)
    assert page.errors == []

    # the audit trail: who queued which study again, who discarded which
    audit_file = tmp_path / "audit" / "audit.jsonl"
    retried = wait_until(lambda: len(e := audit_events(audit_file, "U")) == 2 and e, what="2 retries audited")
    discarded = wait_until(lambda: (e := audit_events(audit_file, "D")) and e, what="the discard audited")
    for event in retried + discarded:
        assert event["outcome"] == 0 and event["participants"][0]["userId"] == ADMIN
        assert event["participants"][0]["requestor"] is True and event["participants"][0]["address"] == LOOPBACK
    assert {o["id"] for e in retried for o in e["objects"] if o["idType"] == "Study Instance UID"} == {study_a}
    assert sum(o.get("instances", 0) for e in retried for o in e["objects"]) == 2
    (gone,) = discarded
    assert [o["id"] for o in gone["objects"]] == [study_b, "Pb"] and "discarded" in gone["description"]

    # a viewer: no spool, no buttons, and the API refuses the actions
    vpage = open_page(browser, gateway.url + "/dicomproxy/ui", VIEWER, VIEWER_PW)
    try:
        vpage.wait_for_selector("#spool-state:text('admins only')", timeout=15000)
        vpage.wait_for_selector("#tasks-body tr", timeout=15000)
        assert vpage.locator("button[data-action^='retry'], button[data-action^='discard'], "
                             "button[data-action='rerun']").count() == 0
        assert vpage.errors == []
    finally:
        vpage.context.close()
    viewer = (VIEWER, VIEWER_PW)
    for method, path in (("GET", "/dicomproxy/spool"), ("GET", "/dicomproxy/spool/failed/studies"),
                         ("POST", "/dicomproxy/spool/failed/000000000001-1.2/retry"),
                         ("DELETE", "/dicomproxy/spool/failed/000000000001-1.2"),
                         ("POST", f"/dicomproxy/spool/failed/studies/{study_b}/retry"),
                         ("DELETE", f"/dicomproxy/spool/failed/studies/{study_b}")):
        assert gateway.request(method, path, auth=viewer).status_code == 403, (method, path)


def test_a_failed_task_shows_its_error_and_log_and_is_re_run_from_the_page(
    admin_page: Any, gateway: GatewayProcess, tmp_path: Path,
) -> None:
    admin = (ADMIN, ADMIN_PW)
    task_id = gateway.get("/test/task", auth=admin).text
    wait_until(lambda: gateway.get(f"/dicomproxy/tasks/{task_id}", auth=admin).json()["state"] == "failed",
               timeout=30, what="the task failed")
    page = admin_page
    page.select_option("#tasks-filter", "failed")
    row = page.locator(f"#tasks-body tr[data-task='{task_id}']")
    row.wait_for(timeout=15000)
    assert "no archive for study 42" in row.locator("td[data-error='1']").inner_text()
    row.locator("button[data-action='log']").click()
    log = page.locator(f"pre[data-task-log='{task_id}']")
    log.wait_for(timeout=15000)
    text = log.inner_text()
    for line in ("INFO archiving study 42", "INFO looking for the archive of study 42",
                 "ERROR the archive of study 42 is not ready", "no archive for study 42"):
        assert line in text, (line, text)
    assert "archived study 42" not in text
    page.screenshot(path=artifact("task-failed.png"), full_page=True)
    # the list says how long the log is, not the log; the task itself has it
    listed = gateway.get("/dicomproxy/tasks?state=failed", auth=admin).json()
    assert [t["id"] for t in listed] == [task_id] and "log" not in listed[0] and listed[0]["logLines"] == 4
    assert gateway.get("/dicomproxy/tasks?state=sleeping", auth=admin).status_code == 400
    # a viewer may not run it again (it is no one's: admins only)
    viewer_rerun = gateway.post(f"/dicomproxy/tasks/{task_id}/rerun", auth=(VIEWER, VIEWER_PW))
    assert viewer_rerun.status_code == 403, viewer_rerun.text

    assert gateway.get("/test/fix", auth=admin).text == "fixed"
    row.locator("button[data-action='rerun']").click()
    page.select_option("#tasks-filter", "done")
    row.wait_for(timeout=15000)
    page.wait_for_function("(id) => { const p = document.querySelector(`pre[data-task-log='${id}']`);"
                           " return p && p.innerText.includes('archived study 42'); }", arg=task_id, timeout=30000)
    assert "archived" in row.inner_text() and "1 re-run(s)" in row.inner_text()
    assert "no archive" not in page.locator(f"pre[data-task-log='{task_id}']").inner_text()  # a new log
    done = gateway.get(f"/dicomproxy/tasks/{task_id}", auth=admin).json()
    assert done["state"] == "done" and done["result"] == "archived" and done["reruns"] == 1 and done["error"] is None
    assert gateway.post(f"/dicomproxy/tasks/{task_id}/rerun", auth=admin).status_code == 409  # done: not again
    page.screenshot(path=artifact("task-rerun.png"), full_page=True)
    assert page.errors == []
    alerts = wait_until(lambda: [e for e in requests.get(gateway.url + "/dicomproxy/ui/audit?limit=200", auth=admin,
                                                         timeout=10).json()["events"]
                                 if e["event"] == "Security Alert" and task_id in e.get("description", "")],
                        what="the re-run audited")
    assert alerts[0]["outcome"] == 0 and f"run again by {ADMIN}" in alerts[0]["description"]


class Uploads(Traffic):
    """A bounded load: at most ``total`` proxied POSTs of ``size`` bytes to Orthanc's /tools/find,
    ``rate`` a second, from one thread."""

    def __init__(self, url: str, auth: tuple[str, str], total: int = 400, rate: float = 25.0,
                 size: int = 20_000) -> None:
        super().__init__(url, auth, total, rate)
        self.body = json.dumps({"Level": "Study", "Query": {"PatientID": "x" * size}}).encode()

    def one(self, session: requests.Session) -> int:
        return session.post(self.url + "/tools/find", data=self.body, timeout=10).status_code


def test_the_bytes_graph_moves_under_proxied_traffic(admin_page: Any, gateway: GatewayProcess) -> None:
    page = admin_page
    with Uploads(gateway.url, (ADMIN, ADMIN_PW)) as load:
        page.wait_for_selector("#chart-bytes[data-series*='in'][data-series*='out'] canvas", timeout=20000)
        page.wait_for_function(
            "() => { const n = document.querySelector('#chart-bytes'); const s = n.dataset.series.split(',');"
            " const v = n.dataset.last.split(',').map(parseFloat);"
            " return v[s.indexOf('in')] > 100000 && v[s.indexOf('out')] > 0; }", timeout=30000)
        before = page.evaluate("document.querySelector('#chart-bytes canvas').toDataURL()")
        updates = page.evaluate("window.dicomproxyGraphs.updates")
        page.wait_for_function("(n) => window.dicomproxyGraphs.updates >= n + 3", arg=updates, timeout=15000)
        assert page.evaluate("document.querySelector('#chart-bytes canvas').toDataURL()") != before
        page.locator("#chart-bytes").screenshot(path=artifact("bytes-graph.png"))
    assert 0 < load.sent <= load.total
    metrics = gateway.get("/dicomproxy/metrics", auth=(ADMIN, ADMIN_PW)).text
    received = next(float(line.split()[1]) for line in metrics.splitlines()
                    if line.startswith("dicomproxy_proxy_bytes_received_total "))
    assert received == load.sent * len(load.body)
    assert page.errors == []
