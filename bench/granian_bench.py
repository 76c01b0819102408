#!/usr/bin/env python3
"""uvicorn (uvloop + httptools, ``dicomproxy serve``) against granian (a Rust HTTP server, ASGI
interface, uvloop, one worker) serving the same gateway app (issue 14, item 4).

Upstream: a static nginx (bench/workers_bench.py) with a 2 KB JSON file and a 10 MB file.
Cells: no script and singleton hooks (proxy_bench.py's) on the JSON, no script on 10 MB.
``wrk`` (2 threads; 32 connections for JSON, 4 for 10 MB), rounds alternated between the two
servers; CPU per request from /proc (the server process and its children: granian's worker).

    python bench/granian_bench.py --rounds 3 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import LOOPBACK, ROOT, Peer, Peers, cpu_seconds, free_port, run_wrk  # noqa: E402
from bench.proxy_bench import GATEWAY_HOOKS  # noqa: E402
from bench.workers_bench import static_nginx  # noqa: E402

GRANIAN = str(Path(sys.executable).with_name("granian"))


def granian_gateway(peers: Peers, name: str, upstream: str, scripts: dict[str, str]) -> Peer:
    """The same generated config as ``Peers.gateway``, served by granian."""
    wd = peers.workdir / name
    (wd / "scripts").mkdir(parents=True, exist_ok=True)
    (wd / "data").mkdir(exist_ok=True)
    for script, text in scripts.items():
        (wd / "scripts" / script).write_text(text)
    port = free_port()
    config = {
        "Urls": f"http://{LOOPBACK}:{port}", "Upstream": {"Url": upstream},
        "ExtraConfig": {"ScriptsRoot": str(wd / "scripts"), "DataFolder": str(wd / "data"),
                        "TusUploadFolder": str(wd / "data" / "tus")},
        "Dicom": {"Port": 0, "Host": LOOPBACK, "SpoolFolder": str(wd / "data" / "spool")},
        "Logging": {"Level": "WARNING"},
    }
    (wd / "appsettings.json").write_text(json.dumps(config))
    env = dict(os.environ, PYTHONPATH=str(ROOT), DICOMPROXY_BENCH_CONFIG=str(wd / "appsettings.json"))
    cmd = [GRANIAN, "--interface", "asgi", "--loop", "uvloop", "--workers", "1", "--host", LOOPBACK,
           "--port", str(port), "--no-ws", "--log-level", "warning", "--factory", "bench.granian_app:app"]
    proc = peers._start(name, cmd, wd, env=env)
    url = f"http://{LOOPBACK}:{port}"
    proc.wait_http(url + "/dicomproxy/health", ok=(200, 503))
    return Peer(name, url, proc, wd)


def measure(peer: Peer, path: str, connections: int, seconds: float, workdir: Path) -> tuple[float, float]:
    before = cpu_seconds(peer.process.pid)
    result = run_wrk(peer.url + path, connections=connections, threads=2, duration=seconds, workdir=workdir)
    cpu = cpu_seconds(peer.process.pid) - before
    if result.errors or result.non_2xx:
        raise SystemExit(f"{peer.name} {path}: {result.errors} errors, {result.non_2xx} non-2xx")
    return result.rps, cpu / max(1, result.requests) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="granian-bench-") as tmp, Peers(Path(tmp)) as peers:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        upstream = static_nginx(peers, workdir)
        (upstream.workdir / "www" / "10mb.bin").write_bytes(os.urandom(10 << 20))
        cells = [("none", "/data.json", 32), ("singleton", "/data.json", 32), ("none", "/10mb.bin", 4)]
        print("| script | payload | server | req/s (median) | CPU µs/request | CPU vs uvicorn |")
        print("|---|---|---|---|---|---|")
        for script in ("none", "singleton"):
            scripts = {"main.lua": GATEWAY_HOOKS} if script == "singleton" else {}
            servers = {"uvicorn": peers.gateway(f"uvicorn-{script}", upstream.url, scripts=scripts),
                       "granian": granian_gateway(peers, f"granian-{script}", upstream.url, scripts)}
            for _, path, conns in [c for c in cells if c[0] == script]:
                for peer in servers.values():
                    run_wrk(peer.url + path, connections=conns, threads=2, duration=1, workdir=workdir)
                got: dict[str, list[tuple[float, float]]] = {k: [] for k in servers}
                for _ in range(args.rounds):
                    for key, peer in servers.items():
                        got[key].append(measure(peer, path, conns, args.seconds, workdir))
                base = statistics.median(c for _, c in got["uvicorn"])
                for key in servers:
                    rps = statistics.median(r for r, _ in got[key])
                    cpu = statistics.median(c for _, c in got[key])
                    print(f"| {script} | {path} | {key} | {rps:.0f} | {cpu:.0f} | {cpu / base:.2f} |")
            for peer in servers.values():
                peers.stop(peer)
        print(f"\nload average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
