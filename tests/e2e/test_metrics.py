"""``GET /dicomproxy/metrics`` of a real gateway after real traffic, read with prometheus_client's
own parser: HTTP through the proxy to Orthanc, a Lua hook, a TUS upload, C-STOREs from dcmtk."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from tusclient import client as tus_client

from tests import dicom_samples
from tests.peers import LOOPBACK, GatewayProcess, run_dcmtk, wait_until

MAIN_LUA = """
function onHttpRequest(request)
    return nil
end
"""

# Every name the home-made registry had (git grep '"dicomproxy_' before the move).
SERIES_BEFORE = (
    "dicomproxy_dicom_failed_folder", "dicomproxy_dicom_forward_failed_total", "dicomproxy_dicom_forwarded_total",
    "dicomproxy_dicom_received_total", "dicomproxy_dicom_rejected_total", "dicomproxy_dicom_spool_depth",
    "dicomproxy_dicom_store_errors_total", "dicomproxy_mails_total", "dicomproxy_notification_streams",
    "dicomproxy_notifications_total", "dicomproxy_proxy_requests_total", "dicomproxy_proxy_upstream_errors_total",
    "dicomproxy_tasks_queued", "dicomproxy_tus_bytes_received_total", "dicomproxy_tus_errors_total",
    "dicomproxy_tus_imported_instances_total", "dicomproxy_tus_imports_total", "dicomproxy_tus_requests_total",
    "dicomproxy_tus_uploads_created_total", "dicomproxy_tus_uploads_finished_total",
    "dicomproxy_tus_uploads_terminated_total",
)
UPLOAD_BYTES = 1_234_568  # '{:g}' rendered it 1.23457e+06; the exposition format keeps every digit


def scrape(gw: GatewayProcess) -> tuple[str, dict[str, list[Sample]]]:
    r = gw.get("/dicomproxy/metrics")
    assert r.status_code == 200, r.text
    families = {f.name: f.samples for f in text_string_to_metric_families(r.text)}
    return r.headers["content-type"], families


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, samples)
    return found[0]


def test_a_real_gateway_exposes_exact_counters_and_latency_histograms(
    gateway_factory: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    gw = gateway_factory(scripts={"main.lua": MAIN_LUA})
    for _ in range(5):
        assert gw.get("/system").status_code == 200  # proxied to Orthanc, through onHttpRequest
    assert gw.get("/no-such-orthanc-route").status_code == 404

    data = os.urandom(UPLOAD_BYTES)
    upload = tmp_path / "blob.bin"
    upload.write_bytes(data)
    tus_client.TusClient(gw.url + "/files/").uploader(str(upload), chunk_size=300_000).upload()

    files = []
    study = dicom_samples.generate_uid()
    for i in range(3):
        path, _ = dicom_samples.make_instance(tmp_path / f"IM{i}.dcm", patient_id="MET", patient_name="Me^Trics",
                                              study_uid=study, InstanceNumber=i + 1)
        files.append(str(path))
    run_dcmtk("storescu", "-aet", "MODALITY", "-aec", gw.aet, LOOPBACK, str(gw.dicom_port), *files)

    def forwarded() -> dict[str, Any] | None:
        families = scrape(gw)[1]
        return families if value(families["dicomproxy_dicom_forwarded"], "dicomproxy_dicom_forwarded_total") == 3 \
            else None

    wait_until(forwarded, timeout=30, what="3 instances forwarded to Orthanc")
    content_type, m = scrape(gw)
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"

    # counters, exact
    requests_total = m["dicomproxy_proxy_requests"]
    assert value(requests_total, "dicomproxy_proxy_requests_total", status="2xx") == 5
    assert value(requests_total, "dicomproxy_proxy_requests_total", status="4xx") == 1
    assert value(m["dicomproxy_tus_bytes_received"], "dicomproxy_tus_bytes_received_total") == UPLOAD_BYTES
    assert value(m["dicomproxy_dicom_received"], "dicomproxy_dicom_received_total") == 3
    per_destination = m["dicomproxy_dicom_destination_forwarded"]  # relayed: Dicom:Upstream is "default"
    assert value(per_destination, "dicomproxy_dicom_destination_forwarded_total", destination="default") == 3
    raw = gw.get("/dicomproxy/metrics").text
    assert "dicomproxy_tus_bytes_received_total 1.234568e+06" in raw

    # histograms: buckets, sum and count, by the labels they promise
    first_byte = m["dicomproxy_proxy_first_byte_seconds"]
    assert value(first_byte, "dicomproxy_proxy_first_byte_seconds_count", status="2xx") == 5
    assert value(first_byte, "dicomproxy_proxy_first_byte_seconds_bucket", status="2xx", le="+Inf") == 5
    assert 0 < value(first_byte, "dicomproxy_proxy_first_byte_seconds_sum", status="2xx") < 30
    hooks = m["dicomproxy_lua_hook_seconds"]
    # onHttpRequest ran for every request the middleware saw: the proxied ones, TUS and the scrapes
    assert value(hooks, "dicomproxy_lua_hook_seconds_count", callback="onHttpRequest") >= 6
    store = m["dicomproxy_dicom_store_seconds"]
    assert value(store, "dicomproxy_dicom_store_seconds_count") == 3
    assert value(store, "dicomproxy_dicom_store_seconds_bucket", le="60.0") == 3
    forward = m["dicomproxy_dicom_forward_seconds"]
    assert value(forward, "dicomproxy_dicom_forward_seconds_count") == 3
    assert value(forward, "dicomproxy_dicom_forward_seconds_sum") > 0
    # every series that existed before prometheus_client is still declared under its name
    declared = {line.split()[2] for line in raw.splitlines() if line.startswith("# HELP ")}
    assert set(SERIES_BEFORE) <= declared, set(SERIES_BEFORE) - declared


def test_proxied_body_bytes_in_and_out_are_counted_exactly(gateway_factory: Callable[..., GatewayProcess]) -> None:
    """``dicomproxy_proxy_bytes_received_total`` / ``_sent_total``: the request and answer bodies
    that went through the proxy to the real Orthanc, byte for byte (the status page's bytes graph)."""
    gw = gateway_factory()
    sent = 0
    for _ in range(3):
        r = gw.get("/system", headers={"Accept-Encoding": "identity"}, stream=True)
        sent += len(r.raw.read(decode_content=False))
        assert r.status_code == 200
    query = b'{"Level": "Study", "Query": {"PatientID": "' + b"x" * 5000 + b'"}}'
    r = gw.post("/tools/find", data=query, headers={"Accept-Encoding": "identity", "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    sent += len(r.content)
    chunked = gw.post("/tools/find", data=iter([query[:100], query[100:]]), headers={"Accept-Encoding": "identity"})
    assert chunked.status_code == 200, chunked.text  # a chunked upload: counted as its chunks arrive
    sent += len(chunked.content)
    m = scrape(gw)[1]
    assert value(m["dicomproxy_proxy_bytes_received"], "dicomproxy_proxy_bytes_received_total") == 2 * len(query)
    assert value(m["dicomproxy_proxy_bytes_sent"], "dicomproxy_proxy_bytes_sent_total") == sent
