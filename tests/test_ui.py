"""The status page /dicomproxy/ui: served by the real gateway, driven in headless Chromium.

Chromium is Debian's (/usr/bin/chromium, scripts/install.sh); Playwright's Python package only
drives it (no browser download). The upload test goes through the gateway's TUS endpoint and
the default import into the real Orthanc, and waits for the "imported" notification to arrive
over the live SSE feed.
"""

from __future__ import annotations

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
function onHttpRequest(req) return false end
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
    return gateway_factory({"Authentication": {"Users": {USER: PASSWORD}}}, {"main.lua": SCRIPT},
                           orthanc=fresh_orthanc)


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
    for path in ("/dicomproxy/ui", "/dicomproxy/ui/static/app.js", "/dicomproxy/ui/status.json"):
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


def test_page_shows_the_gateway_live(page: Any, gateway: GatewayProcess) -> None:
    page.goto(gateway.url + "/dicomproxy/ui")
    page.wait_for_selector("#scripts-body code:text('main.lua')", timeout=15000)
    callbacks = page.inner_text("#scripts-body")
    for name in ("onSendMail", "onNotificationShow", "onHttpRequest"):
        assert name in callbacks
    page.wait_for_selector("#upstream-http .badge:text('reachable')", timeout=15000)
    page.wait_for_selector("#feed-state:text('live')", timeout=15000)
    assert page.inner_text("#tasks-body")  # rendered (empty queue or tasks)
    assert page.inner_text("#spool-depth") != ""
    assert page.is_hidden("#reload-error")

    # A broken edit shows up as the last reload error and, live, as a notification.
    gateway.write_script("main.lua", SCRIPT + "\nthis is not lua (\n")
    page.wait_for_selector("#feed-list li[data-kind='script.failed']", timeout=20000)
    page.wait_for_selector("#reload-error", state="visible", timeout=15000)
    assert "main.lua" in page.inner_text("#reload-error-text")
    assert page.errors == []


def test_upload_box_progress_and_imported_notification(
    page: Any, gateway: GatewayProcess, fresh_orthanc: OrthancServer, dicom_samples: Any, sample_dir: Path
) -> None:
    path, sop_uid = dicom_samples.make_instance(sample_dir / "one.dcm", patient_id="UI1",
                                                patient_name="Ui^Test")
    page.goto(gateway.url + "/dicomproxy/ui")
    page.wait_for_selector("#feed-state:text('live')", timeout=15000)
    page.set_input_files("#upload-input", str(path))
    row = page.locator("#uploads li[data-name='one.dcm']")
    row.wait_for(timeout=10000)
    page.wait_for_function(
        "() => { const r = document.querySelector(\"#uploads li[data-name='one.dcm']\");"
        " return r && r.querySelector('progress').value === 100; }", timeout=30000)
    assert row.locator(".percent").inner_text() == "100%"
    # The TUS importer's "upload.imported" event reaches the page over SSE ...
    page.wait_for_selector("#feed-list li[data-kind='upload.imported']", timeout=60000)
    # ... and the row of this upload says so.
    page.wait_for_selector("#uploads li[data-name='one.dcm'].imported", timeout=10000)
    assert "imported" in row.locator(".state").inner_text()
    fresh_orthanc.wait_for_instances(1)
    assert sop_uid in fresh_orthanc.sop_instance_uids()
    assert page.errors == []
