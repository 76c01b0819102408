"""DICOMweb requests recognised on the proxied path, and what recognising one costs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dicomproxy.audit.message import to_xml
from dicomproxy.audit.trail import AuditTrail
from dicomproxy.audit.web import DicomWebAudit, classify, request_event
from dicomproxy.config.settings import load_settings
from dicomproxy.metrics import Metrics
from dicomproxy.notify.events import EventBus
from tests.audit.atna import validate
from tests.audit.test_message import SOURCE


def test_classify_follows_ps3_18_resources() -> None:
    assert classify("GET", "/studies") == ("query", "SearchForStudies", "")
    assert classify("GET", "/series") == ("query", "SearchForSeries", "")
    assert classify("GET", "/studies/1.2/series") == ("query", "SearchForStudySeries", "1.2")
    assert classify("GET", "/studies/1.2/series/3.4/instances") == ("query", "SearchForStudySeriesInstances", "1.2")
    assert classify("GET", "/studies/1.2") == ("retrieve", "1.2", "")
    assert classify("GET", "/studies/1.2/metadata") == ("retrieve", "1.2", "")
    assert classify("GET", "/studies/1.2/series/3.4/instances/5.6/frames/1") == ("retrieve", "1.2", "3.4")
    assert classify("POST", "/studies") == ("store", "", "")
    assert classify("POST", "/studies/1.2") == ("store", "1.2", "")
    assert classify("DELETE", "/studies/1.2") is None
    assert classify("GET", "/workitems") is None
    assert classify("GET", "/") is None


def test_request_events_validate() -> None:
    for what, status in ((("query", "SearchForStudies", ""), 200), (("retrieve", "1.2.3", ""), 404),
                         (("store", "", ""), 200), (("store", "1.2", ""), 0)):
        event = request_event(what, "alice", "1.2.3.4", "/dicom-web/studies", b"PatientID=A&x=<&>", status, 0.5)
        validate(to_xml(event, SOURCE))


def trail(tmp_path: Path) -> AuditTrail:
    settings = load_settings(None, environ={}, overrides={
        "Audit:Enabled": "true", "Audit:BufferFolder": str(tmp_path / "audit")})
    return AuditTrail(settings, EventBus(), Metrics())


async def _cost(app: Any, n: int) -> float:
    scope = {"type": "http", "method": "GET", "path": "/dicom-web/studies", "query_string": b"PatientID=X",
             "client": ("127.0.0.1", 1), "headers": []}

    async def send(message: dict[str, Any]) -> None:
        pass

    started = time.perf_counter()
    for _ in range(n):
        await app(scope, None, send)
    return (time.perf_counter() - started) / n


async def test_per_request_cost_is_a_few_microseconds(tmp_path: Path) -> None:
    """The audit layer on a QIDO-RS request, event included, against the same app without it
    (the XML is built later, off the request's path). Printed with -s; the bound is loose
    (a shared 2-core machine), the report quotes the measured figures."""
    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"[]"})

    t = trail(tmp_path)
    t.enabled = True
    wrapped = DicomWebAudit(inner, t, "/dicom-web")
    n = 5_000
    bare = min([await _cost(inner, n) for _ in range(3)])
    audited = min([await _cost(wrapped, n) for _ in range(3)])
    assert len(t._pending) == 3 * n  # every audited request queued one event
    t._pending.clear()
    record_only = audited - bare
    print(f"\nQIDO request through the audit layer: bare {bare * 1e6:.2f} us, audited {audited * 1e6:.2f} us, "
          f"audit cost {record_only * 1e6:.2f} us/request")
    assert record_only < 50e-6
