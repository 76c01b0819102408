"""The status page /dicomproxy/ui: served by the real gateway, driven in headless Chromium.

Chromium is Debian's (/usr/bin/chromium, scripts/install.sh); Playwright's Python package only
drives it (no browser download). The upload test goes through the gateway's TUS endpoint and
the default import into the real Orthanc, and waits for the "imported" notification to arrive
over the live SSE feed.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from dicomproxy.ui import STATIC_DIR
from tests.peers import GatewayProcess, OrthancServer, chromium

USER, PASSWORD = "admin", "s3cret"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

SCRIPT = r"""
function onSendMail(mail) return false end
function onNotificationShow(n) return false end
function onHttpRequest(req)
  if req.Path == "/test/task" then
    req:ResponseWrite(LuaBackgroundWorker("main-task.lua", "run", "x"))
    return true
  end
  return false
end
"""
TASK_SCRIPT = r"""
function run(args) error("the task went wrong on purpose") end
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright Python package is missing: run scripts/install.sh "
                    "(pip install -e .[test]); never `playwright install`, the system Chromium is used",
                    pytrace=False)
    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def gateway(gateway_factory: Callable[..., GatewayProcess], fresh_orthanc: OrthancServer) -> GatewayProcess:
    return gateway_factory({"Authentication": {"Users": {USER: PASSWORD}}},
                           {"main.lua": SCRIPT, "main-task.lua": TASK_SCRIPT}, orthanc=fresh_orthanc)


@pytest.fixture
def page(browser: Any, gateway: GatewayProcess) -> Iterator[Any]:
    context = browser.new_context(http_credentials={"username": USER, "password": PASSWORD},
                                  viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.errors = []  # type: ignore[attr-defined]
    page.on("pageerror", lambda e: page.errors.append(str(e)))  # type: ignore[attr-defined]
    try:
        yield page
    finally:
        context.close()  # closes the SSE stream before the gateway stops


def test_page_and_assets_need_the_gateways_authentication(gateway: GatewayProcess) -> None:
    for path in ("/dicomproxy/ui", "/dicomproxy/ui/static/app.js", "/dicomproxy/ui/status.json",
                 "/dicomproxy/notifications", "/dicomproxy/notifications/stream"):
        assert requests.get(gateway.url + path, timeout=10).status_code == 401, path
    auth = (USER, PASSWORD)
    resp = requests.get(gateway.url + "/dicomproxy/ui", auth=auth, timeout=10)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
    assert 'src="/dicomproxy/ui/static/tus.min.js"' in resp.text
    assert 'data-tus-endpoint="/files/"' in resp.text
    assert "http://" not in resp.text and "https://" not in resp.text  # nothing from a CDN
    tus = requests.get(gateway.url + "/dicomproxy/ui/static/tus.min.js", auth=auth, timeout=10)
    assert tus.status_code == 200 and tus.content == (STATIC_DIR / "tus.min.js").read_bytes()
    assert tus.headers["Content-Type"].startswith("text/javascript")
    lic = requests.get(gateway.url + "/dicomproxy/ui/static/tus-js-client.LICENSE.txt", auth=auth, timeout=10)
    assert lic.status_code == 200 and "MIT License" in lic.text
    assert requests.get(gateway.url + "/dicomproxy/ui/static/../__init__.py", auth=auth,
                        timeout=10).status_code == 404
    status = requests.get(gateway.url + "/dicomproxy/ui/status.json", auth=auth, timeout=10).json()
    assert "main.lua" in str(status["scripts"])


def test_page_shows_the_gateway_live(page: Any, gateway: GatewayProcess, tmp_path: Path) -> None:
    page.goto(gateway.url + "/dicomproxy/ui")
    page.wait_for_selector("#scripts-body code:text('main.lua')", timeout=15000)
    callbacks = page.inner_text("#scripts-body")
    for name in ("onSendMail", "onNotificationShow", "onHttpRequest"):
        assert name in callbacks
    page.wait_for_selector("#upstream-http .badge:text('reachable')", timeout=15000)
    # DICOM reachability is a real C-ECHO from the gateway to the Orthanc behind it
    page.wait_for_selector("#upstream-dicom .badge:text('reachable')", timeout=15000)
    assert f"@127.0.0.1:{gateway.settings['Dicom']['Upstream']['Port']}" in page.inner_text("#upstream-dicom")
    assert "0 instances waiting to be forwarded" in page.inner_text("#spool-depth")
    page.wait_for_selector("#feed-state:text('live')", timeout=15000)
    assert page.inner_text("#tasks-body")  # rendered (empty queue or tasks)
    assert page.inner_text("#spool-depth") != ""
    assert page.is_hidden("#reload-error")

    # A background task that fails: its row in the queue, and a live task.failed notification.
    task_id = requests.get(gateway.url + "/test/task", auth=(USER, PASSWORD), timeout=10).text
    page.wait_for_selector("#feed-list li[data-kind='task.failed']", timeout=20000)
    row = page.locator(f"#tasks-body tr[data-task='{task_id}']")
    row.wait_for(timeout=15000)
    page.wait_for_function("(id) => document.querySelector(`#tasks-body tr[data-task='${id}']`)"
                           ".innerText.includes('failed')", arg=task_id, timeout=15000)
    assert "the task went wrong on purpose" in row.inner_text() and "main-task.lua:run" in row.inner_text()

    # A broken edit shows up as the last reload error and, live, as a notification.
    gateway.write_script("main.lua", SCRIPT + "\nthis is not lua (\n")
    page.wait_for_selector("#feed-list li[data-kind='script.failed']", timeout=20000)
    page.wait_for_selector("#reload-error", state="visible", timeout=15000)
    assert "main.lua" in page.inner_text("#reload-error-text")
    page.screenshot(path=str(tmp_path / "status-page.png"), full_page=True)
    assert page.errors == []


def test_upload_box_progress_and_imported_notification(
    page: Any, gateway: GatewayProcess, fresh_orthanc: OrthancServer, dicom_samples: Any, sample_dir: Path,
    tmp_path: Path,
) -> None:
    one, sop_uid = dicom_samples.make_instance(sample_dir / "one.dcm", patient_id="UI1", patient_name="Ui^Test")
    study, zip_uids = dicom_samples.make_zip(sample_dir / "study.zip", n_series=1, n_instances=3)
    page.goto(gateway.url + "/dicomproxy/ui")
    page.wait_for_selector("#feed-state:text('live')", timeout=15000)
    # Record every progress value the page shows, to see it climb to 100.
    page.evaluate("""() => {
        window.seenProgress = {};
        new MutationObserver(() => document.querySelectorAll('#uploads li').forEach(li => {
            const seen = window.seenProgress[li.dataset.name] = window.seenProgress[li.dataset.name] || [];
            const v = li.querySelector('progress').value;
            if (seen[seen.length - 1] !== v) seen.push(v);
        })).observe(document.getElementById('uploads'), {subtree: true, childList: true, attributes: true,
                                                         characterData: true});
    }""")
    page.set_input_files("#upload-input", [str(one), str(study)])
    for name in ("one.dcm", "study.zip"):
        row = page.locator(f"#uploads li[data-name='{name}']")
        row.wait_for(timeout=10000)
        page.wait_for_function(
            "(name) => { const r = document.querySelector(`#uploads li[data-name='${name}']`);"
            " return r && r.querySelector('progress').value === 100; }", arg=name, timeout=30000)
        assert row.locator(".percent").inner_text() == "100%"
    seen = page.evaluate("window.seenProgress")
    for name in ("one.dcm", "study.zip"):
        assert seen[name][-1] == 100 and seen[name] == sorted(seen[name]), seen
    # The TUS importer's "upload.imported" events reach the page over SSE, and each row says so.
    for name in ("one.dcm", "study.zip"):
        page.wait_for_selector(f"#uploads li[data-name='{name}'].imported", timeout=60000)
        assert "imported" in page.locator(f"#uploads li[data-name='{name}'] .state").inner_text()
    titles = page.locator("#feed-list li[data-kind='upload.imported'] .title").all_inner_texts()
    assert any("one.dcm" in t for t in titles) and any("study.zip" in t for t in titles), titles
    # A file dropped on the box (a real drop event with a DataTransfer) goes the same way.
    dropped, dropped_uid = dicom_samples.make_instance(sample_dir / "dropped.dcm", patient_id="UI2",
                                                       patient_name="Ui^Dropped")
    page.evaluate("""([name, b64]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, {type: 'application/dicom'}));
        const zone = document.getElementById('dropzone');
        zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: dt, bubbles: true, cancelable: true}));
        zone.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", ["dropped.dcm", base64.b64encode(Path(dropped).read_bytes()).decode()])
    page.wait_for_selector("#uploads li[data-name='dropped.dcm'].imported", timeout=60000)
    assert page.locator("#uploads li[data-name='dropped.dcm'] .percent").inner_text() == "100%"
    # the task queue refreshes on the live notifications: the three import tasks are listed
    page.wait_for_function("() => document.querySelectorAll('#tasks-body tr[data-task]').length === 3",
                           timeout=10000)
    fresh_orthanc.wait_for_instances(5)
    assert fresh_orthanc.sop_instance_uids() == {sop_uid, dropped_uid, *zip_uids}
    page.screenshot(path=str(tmp_path / "uploads.png"), full_page=True)
    assert page.errors == []
