#!/usr/bin/env python3
"""``Server:Workers`` scaling (issue 14, item 1): the gateway with 1, 2 (and more) workers in
front of a static nginx upstream (a 2 KB JSON file; nginx is not the bottleneck: it answers it
directly several times faster than the gateway proxies it).

For each worker count: ``wrk`` (2 threads, 32 connections) for ``--seconds``, rounds alternated
(1, 2, 1, 2, ...) so a change in the machine's load hits both alike; req/s is the median of the
rounds, CPU per request is the gateway's CPU (the supervisor and every live worker, from
/proc) over the requests served. Targets: ``gw-none`` (no script) and ``gw-singleton``
(``onHttpRequest`` + ``onHttpResponse`` in main.lua, as in proxy_bench.py).

    python bench/workers_bench.py                    # 1 and 2 workers, 3 rounds of 6 s each
    python bench/workers_bench.py --workers 1,2,4 --rounds 2 --seconds 5

The machine is shared (2 cores, other sessions' load in the load average printed); wrk and
nginx take their share of the same cores, so ideal scaling is below 2x even on an idle host.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    LOOPBACK,
    NGINX_BIN,
    Peer,
    Peers,
    cpu_seconds,
    free_port,
    machine_info,
    require,
    run_wrk,
)
from bench.proxy_bench import GATEWAY_HOOKS as HOOKS  # noqa: E402  (the same hooks as proxy_bench.py)

BODY = b'{"ok": true, "items": [' + b",".join(b'{"id": %d, "name": "item %d"}' % (i, i) for i in range(80)) + b"]}"


def static_nginx(peers: Peers, workdir: Path) -> Peer:
    """nginx serving one static file, 2 worker processes, keep-alive."""
    require(NGINX_BIN, "run scripts/install.sh (apt-get install nginx)")
    wd = workdir / "nginx-static"
    (wd / "www").mkdir(parents=True, exist_ok=True)
    (wd / "logs").mkdir(exist_ok=True)
    (wd / "www" / "data.json").write_bytes(BODY)
    port = free_port()
    (wd / "nginx.conf").write_text(f"""
daemon off;
worker_processes 2;
pid {wd}/nginx.pid;
error_log {wd}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {wd}/body; proxy_temp_path {wd}/proxy; fastcgi_temp_path {wd}/fcgi;
  uwsgi_temp_path {wd}/uwsgi; scgi_temp_path {wd}/scgi;
  keepalive_requests 1000000;
  server {{
    listen {LOOPBACK}:{port};
    root {wd}/www;
    location / {{ default_type application/json; }}
  }}
}}
""")
    proc = peers._start("nginx-static", [NGINX_BIN, "-p", str(wd), "-c", str(wd / "nginx.conf")], wd,
                        stop_signal=signal.SIGQUIT)
    url = f"http://{LOOPBACK}:{port}"
    proc.wait_http(url + "/data.json")
    return Peer("nginx-static", url, proc, wd)


def measure(peer: Peer, seconds: float, workdir: Path) -> tuple[float, float]:
    """(req/s, gateway CPU microseconds per request) of one wrk run; req/s x CPU per request is
    the cores the gateway got (the machine's free CPU caps it, whatever the worker count)."""
    url = peer.url + "/data.json"
    before = cpu_seconds(peer.process.pid)
    result = run_wrk(url, connections=32, threads=2, duration=seconds, workdir=workdir)
    cpu = cpu_seconds(peer.process.pid) - before
    if result.errors or result.non_2xx:
        raise SystemExit(f"{peer.name}: {result.errors} errors, {result.non_2xx} non-2xx answers")
    return result.rps, cpu / max(1, result.requests) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--targets", default="gw-none,gw-singleton")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6)
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    info = machine_info()
    print(f"machine: {info}; load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="workers-bench-") as tmp, Peers(Path(tmp)) as peers:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # nginx's workers (not root) read the file
        upstream = static_nginx(peers, workdir)
        direct = [measure(upstream, args.seconds, workdir)[0] for _ in range(2)]
        print(f"\nnginx static direct (the upstream's own ceiling here): {statistics.median(direct):.0f} req/s\n")
        print("| target | workers | req/s (median) | CPU µs/request | cores used | × of 1 worker |")
        print("|---|---|---|---|---|---|")
        for target in args.targets.split(","):
            scripts = {"main.lua": HOOKS} if target == "gw-singleton" else {}
            gateways = {n: peers.gateway(f"{target}-w{n}", upstream.url, scripts=scripts,
                                         settings={"Server": {"Workers": n}}) for n in counts}
            for gw in gateways.values():  # warm up (both workers' pools, Lua engines)
                run_wrk(gw.url + "/data.json", connections=32, threads=2, duration=1, workdir=workdir)
            rps: dict[int, list[float]] = {n: [] for n in counts}
            cpu: dict[int, list[float]] = {n: [] for n in counts}
            for _ in range(args.rounds):
                for n, gw in gateways.items():
                    r, c = measure(gw, args.seconds, workdir)
                    rps[n].append(r)
                    cpu[n].append(c)
            base = statistics.median(rps[counts[0]])
            for n in counts:
                median = statistics.median(rps[n])
                per = statistics.median(cpu[n])
                print(f"| {target} | {n} | {median:.0f} | {per:.0f} | {median * per / 1e6:.2f} | {median / base:.2f} |")
            for gw in gateways.values():
                peers.stop(gw)
        print(f"\nload average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
