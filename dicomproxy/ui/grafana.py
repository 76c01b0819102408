"""The Grafana dashboard over the gateway's Prometheus series: ``docs/grafana/dicomproxy.json``.

For sites that already run Prometheus and Grafana: the same graphs as the status page
(:mod:`.history`, ``/dicomproxy/ui``), from a Prometheus that scrapes ``/dicomproxy/metrics``.
The dashboard is generated from :data:`PANELS` (``python -m dicomproxy.ui.grafana`` writes it,
``--check`` says whether the committed file is current), and tests keep it honest:
tests/ui/test_grafana.py checks that every metric a panel names is declared by a real gateway
and that the committed file is the generated one; tests/e2e/test_ui_grafana.py runs a real
Prometheus against a real gateway after traffic and checks that every panel's PromQL returns data.

The data source is a variable (``${datasource}``), so the dashboard imports into any Grafana
with a Prometheus data source; ``$job`` selects the scrape job.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "dicomproxy.json"
UID = "dicomproxy-gateway"
RATE = "[$__rate_interval]"
SEL = '{job=~"$job"}'


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    targets: tuple[Target, ...]
    description: str = ""


def _quantiles(metric: str, by: str = "") -> tuple[Target, ...]:
    group = f"le, {by}" if by else "le"
    legend = f"p{{q}} {{{{{by}}}}}" if by else "p{q}"
    return tuple(Target(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{SEL}{RATE})))",
                        legend.format(q=int(q * 100))) for q in (0.5, 0.99))


PANELS: tuple[Panel, ...] = (
    Panel("Proxied requests / s, by status class", "reqps", (
        Target(f"sum by (status) (rate(dicomproxy_proxy_requests_total{SEL}{RATE}))", "{{status}}"),)),
    Panel("Proxy time to first byte", "s", _quantiles("dicomproxy_proxy_first_byte_seconds"),
          "from the request to the upstream answer's head"),
    Panel("Lua hook time, by callback", "s", _quantiles("dicomproxy_lua_hook_seconds", "callback")),
    Panel("C-STOREs / s", "ops", (
        Target(f"sum(rate(dicomproxy_dicom_received_total{SEL}{RATE}))", "received"),
        Target(f"sum(rate(dicomproxy_dicom_forwarded_total{SEL}{RATE}))", "forwarded"),
        Target(f"sum(rate(dicomproxy_dicom_rejected_total{SEL}{RATE}))", "rejected by a script"),
        Target(f"sum(rate(dicomproxy_dicom_store_errors_total{SEL}{RATE}))", "store errors"))),
    Panel("Forward lag", "s", _quantiles("dicomproxy_dicom_forward_seconds"),
          "from reception to the PACS's acceptance, the spool wait and retries included"),
    Panel("Spool", "short", (
        Target(f"sum(dicomproxy_dicom_spool_depth{SEL})", "waiting"),
        Target(f"sum(dicomproxy_dicom_failed_folder{SEL})", "failed"))),
    Panel("DICOM associations and connections", "short", (
        Target(f"sum(dicomproxy_dicom_associations{SEL})", "associations"),
        Target(f"sum(dicomproxy_dicom_connections{SEL})", "connections"))),
    Panel("TUS bytes received / s", "Bps", (
        Target(f"sum(rate(dicomproxy_tus_bytes_received_total{SEL}{RATE}))", "in"),)),
    Panel("Proxied bytes / s", "Bps", (
        Target(f"sum(rate(dicomproxy_proxy_bytes_received_total{SEL}{RATE}))", "in (request bodies)"),
        Target(f"sum(rate(dicomproxy_proxy_bytes_sent_total{SEL}{RATE}))", "out (answer bodies)"))),
    Panel("TUS uploads / s", "ops", (
        Target(f"sum(rate(dicomproxy_tus_uploads_created_total{SEL}{RATE}))", "created"),
        Target(f"sum(rate(dicomproxy_tus_uploads_finished_total{SEL}{RATE}))", "finished"))),
    Panel("Background tasks waiting or running", "short", (
        Target(f"sum(dicomproxy_tasks_queued{SEL})", "tasks"),)),
)

_NAME = re.compile(r"\b(dicomproxy_[a-z_]+?)(?:_bucket|_total)?(?=[{\[ )])")


def metric_names(panels: tuple[Panel, ...] = PANELS) -> set[str]:
    """The metric family names the panels' PromQL uses (``dicomproxy_proxy_requests``, ...:
    prometheus_client's family names, without ``_total`` or ``_bucket``)."""
    return {m.group(1) for p in panels for t in p.targets for m in _NAME.finditer(t.expr)}


def _panel(i: int, panel: Panel) -> dict[str, Any]:
    return {
        "id": i + 1, "type": "timeseries", "title": panel.title, "description": panel.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {"defaults": {"unit": panel.unit, "min": 0}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [{"refId": chr(ord("A") + j), "expr": t.expr, "legendFormat": t.legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for j, t in enumerate(panel.targets)],
    }


def dashboard() -> dict[str, Any]:
    return {
        "uid": UID, "title": "DicomProxy", "tags": ["dicomproxy", "dicom", "pacs"], "timezone": "",
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "description": "Generated by `python -m dicomproxy.ui.grafana` from the gateway's metrics; do not edit.",
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
            {"name": "job", "type": "query", "label": "job", "datasource": {"type": "prometheus",
                                                                           "uid": "${datasource}"},
             "query": "label_values(dicomproxy_proxy_requests_total, job)", "refresh": 2, "includeAll": True,
             "multi": True, "current": {"text": "All", "value": "$__all"}},
        ]},
        "panels": [_panel(i, p) for i, p in enumerate(PANELS)],
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dicomproxy.ui.grafana", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed dashboard is not current")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = DASHBOARD.is_file() and DASHBOARD.read_text(encoding="utf-8") == text
        if not current:
            print(f"{DASHBOARD} is not current: run python -m dicomproxy.ui.grafana", file=sys.stderr)
        return 0 if current else 1
    DASHBOARD.parent.mkdir(parents=True, exist_ok=True)
    DASHBOARD.write_text(text, encoding="utf-8")
    print(f"wrote {DASHBOARD} ({len(PANELS)} panels)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
