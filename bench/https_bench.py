#!/usr/bin/env python3
"""What HTTPS costs the gateway (issue 12, item 1): CPU per request over TLS against plain HTTP.

One gateway process listens on ``http://`` and ``https://`` at once (the same app, the same
Orthanc behind it), so the two schemes are measured in the same process, in alternating runs;
``base-http`` is the code before this change (``/work/baseline`` or ``--baseline DIR``) on the
same Orthanc, to show that the plain listener's cost did not move (for this branch:
``git archive <its parent> | tar -x -C DIR`` and ``ln -s DIR/middleware DIR/dicomproxy_middleware``).

Payloads as in proxy_bench.py: ``json`` (Orthanc's ``GET /series/{id}``, ~2 KB) and ``10mb``
(``GET /instances/{id}/file``, 10,486,888 bytes), with wrk at 1 and 8 keep-alive connections;
``json-close`` sends ``Connection: close``, so every request is a new connection (over TLS a
full handshake: the handshake's cost). The server certificate is ECDSA P-256 or, with
``--rsa``, RSA 2048.

    python bench/https_bench.py                # 5 rounds of 4 s per cell, ~6 minutes
    python bench/https_bench.py --quick        # 1 round of 3 s

Not a test: it prints a Markdown table of the gateway's CPU per request (median over rounds)
and the https/http and http/base-http ratios per cell (median of the per-round ratios, and their
range).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ROOT, Peers, Process, WrkResult, cpu_seconds, free_port, machine_info, run_wrk  # noqa: E402
from proxy_bench import seed_orthanc  # noqa: E402

from tests.tls_certs import TestCa  # noqa: E402

LOOPBACK = "127.0.0.1"
CELLS = [("json", 1), ("json", 8), ("10mb", 1), ("10mb", 8), ("json-close", 1)]


@dataclass
class Cell:
    target: str
    payload: str
    connections: int
    cpu_us: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)


def start_gateway(name: str, workdir: Path, upstream: str, root: Path, python: str, https: dict[str, str] | None,
                  ) -> tuple[Process, dict[str, str]]:
    wd = workdir / name
    (wd / "scripts").mkdir(parents=True, exist_ok=True)
    http_port, https_port = free_port(), free_port()
    urls = {"http": f"http://{LOOPBACK}:{http_port}"}
    config: dict[str, object] = {
        "Urls": urls["http"], "Upstream": {"Url": upstream}, "Dicom": {"Port": 0},
        "ExtraConfig": {"ScriptsRoot": str(wd / "scripts"), "DataFolder": str(wd / "data"),
                        "TusUploadFolder": str(wd / "data" / "tus")},
        "Logging": {"Level": "WARNING"},
    }
    if https:
        urls["https"] = f"https://{LOOPBACK}:{https_port}"
        config["Urls"] = f"{urls['http']};{urls['https']}"
        config["Https"] = https
    (wd / "appsettings.json").write_text(json.dumps(config, indent=2))
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("DICOMPROXY__")}
    env["PYTHONPATH"] = str(root)
    proc = Process(name, [python, "-m", "dicomproxy", "serve", "--config", str(wd / "appsettings.json")],
                   wd / f"{name}.log", cwd=wd, env=env)
    proc.wait_http(urls["http"] + "/dicomproxy/health", ok=(200, 503))
    return proc, urls


def run_cell(cell: Cell, url: str, pid: int, duration: float, workdir: Path) -> WrkResult:
    close = cell.payload.endswith("-close")
    extra = ["-H", "Connection: close"] if close else []
    before = cpu_seconds(pid)
    result = run_wrk(url, connections=cell.connections, duration=duration, workdir=workdir, extra_args=extra)
    spent = cpu_seconds(pid) - before
    if result.errors or result.non_2xx:
        print(f"  ! {cell.target} {cell.payload} c={cell.connections}: {result.errors} errors, "
              f"{result.non_2xx} non-2xx", flush=True)
    cell.cpu_us.append(spent / max(result.requests, 1) * 1e6)
    cell.rps.append(result.rps)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s per cell")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--rsa", action="store_true", help="an RSA 2048 server certificate (default: ECDSA P-256)")
    parser.add_argument("--baseline", type=Path, default=Path("/work/baseline"),
                        help="checkout of the code before this change, on PYTHONPATH (its .venv if it has one, "
                             "else this interpreter; give it a dicomproxy_middleware link to its middleware/); "
                             "'' to skip")
    args = parser.parse_args(argv)
    rounds, duration = (1, 3.0) if args.quick else (args.rounds, args.duration)
    with tempfile.TemporaryDirectory(prefix="https-bench-") as tmp, Peers(Path(tmp)) as peers:
        workdir = Path(tmp)
        orthanc = peers.orthanc(extra={"StableAge": 1})
        payloads = seed_orthanc(orthanc)
        ca = TestCa.create(workdir / "pki")
        server = ca.issue("bench", [LOOPBACK], key_kind="rsa" if args.rsa else "ec")
        https = {"CertificateFile": str(server.cert_path), "KeyFile": str(server.key_path)}
        gateway, urls = start_gateway("gw", workdir, orthanc.url, ROOT, sys.executable, https)
        peers._procs.append(gateway)
        targets = {"http": (urls["http"], gateway.pid), "https": (urls["https"], gateway.pid)}
        baseline = args.baseline if str(args.baseline) and (args.baseline / "dicomproxy").is_dir() else None
        if baseline is not None:
            venv = baseline / ".venv" / "bin" / "python"
            base, base_urls = start_gateway("base", workdir, orthanc.url, baseline,
                                            str(venv) if venv.exists() else sys.executable, None)
            peers._procs.append(base)
            targets["base-http"] = (base_urls["http"], base.pid)
        cells = {(t, p, c): Cell(t, p, c) for p, c in CELLS for t in targets
                 if not (t == "base-http" and p.endswith("-close"))}
        print(f"# HTTPS bench: {machine_info()} | certificate {'RSA 2048' if args.rsa else 'ECDSA P-256'} | "
              f"{rounds} round(s) x {duration:g} s | load {os.getloadavg()[0]:.2f}", flush=True)
        for r in range(rounds):
            for (target, payload, conns), cell in cells.items():
                url, pid = targets[target]
                path = payloads[payload.removesuffix("-close")].path
                if r == 0:
                    run_wrk(url + path, connections=conns, duration=1, workdir=workdir)  # warm-up
                res = run_cell(cell, url + path, pid, duration, workdir)
                print(f"  round {r + 1} {target:9} {payload:10} c={conns}: {res.rps:8.0f} req/s "
                      f"{cell.cpu_us[-1]:9.1f} us CPU/request", flush=True)
        print(report(cells))
    return 0


def report(cells: dict[tuple[str, str, int], Cell]) -> str:
    """Medians over rounds, and the ratios as the median of the per-round ratios (runs of a round are
    next to each other in time, so a ratio within a round is less exposed to a shared machine's drift)."""
    med = {k: statistics.median(c.cpu_us) for k, c in cells.items()}
    rps = {k: statistics.median(c.rps) for k, c in cells.items()}

    def ratio(a: tuple[str, str, int], b: tuple[str, str, int]) -> str:
        if a not in cells or b not in cells:
            return "-"
        per_round = [x / y for x, y in zip(cells[a].cpu_us, cells[b].cpu_us, strict=True) if y]
        low, high = min(per_round), max(per_round)
        return f"{statistics.median(per_round):.2f} ({low:.2f}-{high:.2f})" if len(per_round) > 1 else \
            f"{per_round[0]:.2f}"

    rows = ["| payload | conns | base-http CPU/req | http CPU/req | https CPU/req | https/http | http/base-http | "
            "req/s http / https |", "|---|---|---|---|---|---|---|---|"]
    for payload, conns in CELLS:
        base = med.get(("base-http", payload, conns))
        http, https = med[("http", payload, conns)], med[("https", payload, conns)]
        rows.append(f"| {payload} | {conns} | {f'{base:.0f} us' if base else '-'} | {http:.0f} us | {https:.0f} us | "
                    f"{ratio(('https', payload, conns), ('http', payload, conns))} | "
                    f"{ratio(('http', payload, conns), ('base-http', payload, conns))} | "
                    f"{rps[('http', payload, conns)]:.0f} / {rps[('https', payload, conns)]:.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
