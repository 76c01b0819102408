"""The Grafana dashboard's PromQL against a REAL Prometheus scraping a real gateway after traffic.

Prometheus is Debian's (/usr/bin/prometheus, scripts/install.sh), started on a free port with a
1 s scrape of ``/dicomproxy/metrics`` (basic auth, as a site would configure it). Traffic:
proxied GETs to the real Orthanc (a Lua ``onHttpRequest`` hook on each), C-STOREs from dcmtk's
storescu forwarded to Orthanc, one TUS upload. Then every target of every panel of
docs/grafana/dicomproxy.json must return data from ``/api/v1/query``.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from dicomproxy.ui import grafana
from tests.peers import LOOPBACK, GatewayProcess, OrthancServer, free_port, require_binary, run_dcmtk, wait_until

PROMETHEUS = "/usr/bin/prometheus"
USER, PASSWORD = "scraper", "scr4pe-pw"
SCRIPT = "function onHttpRequest(req) return false end\n"


@pytest.fixture
def gateway(gateway_factory: Callable[..., GatewayProcess], fresh_orthanc: OrthancServer) -> GatewayProcess:
    return gateway_factory({"Authentication": {"Users": {USER: {"Password": PASSWORD, "Roles": ["admin"]}}}},
                           {"main.lua": SCRIPT}, orthanc=fresh_orthanc)


@pytest.fixture
def prometheus(gateway: GatewayProcess, tmp_path: Path) -> Iterator[str]:
    binary = require_binary(PROMETHEUS, "run scripts/install.sh (apt-get install prometheus)")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    target = gateway.url.split("://", 1)[1]
    config.write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: dicomproxy
    metrics_path: /dicomproxy/metrics
    basic_auth: {{username: {USER}, password: {PASSWORD}}}
    static_configs: [{{targets: ["{target}"]}}]
""", encoding="utf-8")
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address={LOOPBACK}:{port}", "--web.enable-lifecycle"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{LOOPBACK}:{port}"
    try:
        wait_until(lambda: proc.poll() is None and requests.get(url + "/-/ready", timeout=2).ok, timeout=30,
                   what=f"prometheus ready ({tmp_path / 'prometheus.log'})")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    answer = requests.get(prom + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", (expr, answer)
    return list(answer["data"]["result"])


def promql(expr: str) -> str:
    """A panel's expression as Grafana would send it: the variables replaced."""
    return expr.replace("$__rate_interval", "1m").replace('job=~"$job"', 'job=~".+"')


def test_every_panel_returns_data_from_a_real_prometheus(
    gateway: GatewayProcess, prometheus: str, dicom_samples: Any, sample_dir: Path,
) -> None:
    wait_until(lambda: query(prometheus, 'up{job="dicomproxy"} == 1'), timeout=30, what="the first scrape")
    stop = threading.Event()

    def traffic() -> None:  # bounded: at most 2000 requests, 20 a second
        with requests.Session() as s:
            s.auth = (USER, PASSWORD)
            for _ in range(2000):
                if stop.wait(0.05):
                    return
                s.get(gateway.url + "/system", timeout=10)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        files = [dicom_samples.make_instance(sample_dir / f"{i}.dcm", patient_id=f"GRAF{i}", patient_name="Graf^Ana")[0]
                 for i in range(3)]
        run_dcmtk("storescu", "-aet", "MODALITY", "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port),
                  *map(str, files))
        upload = requests.post(gateway.url + "/files/", auth=(USER, PASSWORD), timeout=10, headers={
            "Tus-Resumable": "1.0.0", "Upload-Length": "5", "Upload-Metadata": "filename bm90ZS50eHQ="})
        assert upload.status_code == 201, upload.text
        location = upload.headers["Location"]
        patch = requests.patch(gateway.url + location if location.startswith("/") else location, data=b"hello",
                               auth=(USER, PASSWORD), timeout=10,
                               headers={"Tus-Resumable": "1.0.0", "Upload-Offset": "0",
                                        "Content-Type": "application/offset+octet-stream"})
        assert patch.status_code == 204, patch.text
        for panel in grafana.PANELS:  # each target: a result, or the test fails naming the panel
            for target in panel.targets:
                expr = promql(target.expr)
                wait_until(lambda e=expr: query(prometheus, e), timeout=45, what=f"{panel.title}: {expr}")
        # and the data is the traffic's, not zeros: requests, C-STOREs, the forward lag
        rate = query(prometheus, promql(grafana.PANELS[0].targets[0].expr))
        assert any(r["metric"].get("status") == "2xx" and float(r["value"][1]) > 0 for r in rate), rate
        received = query(prometheus, 'dicomproxy_dicom_received_total{job="dicomproxy"}')
        assert float(received[0]["value"][1]) == 3
        lag = query(prometheus, promql(grafana.PANELS[4].targets[1].expr))
        assert lag and float(lag[0]["value"][1]) > 0, lag
    finally:
        stop.set()
        thread.join(15)
