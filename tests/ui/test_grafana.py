"""The Grafana dashboard: generated, current, and naming only metrics a real gateway declares."""

from __future__ import annotations

import json
from pathlib import Path

from dicomproxy.app import build_gateway
from dicomproxy.config.loader import load_settings
from dicomproxy.ui import grafana


def test_committed_dashboard_is_the_generated_one() -> None:
    assert grafana.DASHBOARD.read_text(encoding="utf-8") == grafana.render(), \
        "docs/grafana/dicomproxy.json is stale: run python -m dicomproxy.ui.grafana"
    assert grafana.main(["--check"]) == 0
    board = json.loads(grafana.render())
    assert len(board["panels"]) == len(grafana.PANELS) >= 8
    assert all(t["expr"] for p in board["panels"] for t in p["targets"])


def test_every_metric_a_panel_names_is_declared_by_the_gateway(tmp_path: Path) -> None:
    folders = {"DataFolder": str(tmp_path / "data"), "ScriptsRoot": str(tmp_path / "lua"),
               "TusUploadFolder": str(tmp_path / "tus")}
    settings = load_settings(None, environ={}, overrides={"ExtraConfig": folders})
    gateway = build_gateway(settings)
    declared = {family.name for family in gateway.metrics.registry.collect()}
    used = grafana.metric_names()
    assert "dicomproxy_proxy_requests" in used and "dicomproxy_dicom_forward_seconds" in used
    assert used <= declared, f"panels name metrics no gateway declares: {sorted(used - declared)}"
