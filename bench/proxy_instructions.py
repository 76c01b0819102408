#!/usr/bin/env python3
"""Instructions per proxied request, counted by callgrind: this checkout against another.

CPU time on a shared two-core machine swings by 10-40 % from run to run; instruction counts do
not. Each checkout runs the same in-process driver (its own ``ReverseProxy`` and upstream
client, uvloop, a static upstream on loopback in the same process answering a fixed body) twice
under callgrind, ``low`` and ``high`` sequential requests after the same warm-up; the difference
over ``high - low`` is the count per request, upstream server and driver included (the same
code in both checkouts, so the difference between checkouts is the proxy's and its client's).

    python bench/proxy_instructions.py --baseline /work/baseline            # 2 KB and 10 MB answers
    python bench/proxy_instructions.py --baseline /work/baseline --sizes 2184
    python bench/proxy_instructions.py --baseline /work/baseline --gateway  # + the whole process

Not a test: prints a Markdown table.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy_bench import GATEWAY_HOOKS  # noqa: E402  # the same hooks as the wrk bench's gw-singleton

ROOT = Path(__file__).resolve().parent.parent

DRIVER = r"""
import asyncio, sys
root, size, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, root)
try:
    from dicomproxy.config.settings import load_settings
    from dicomproxy.http.proxy import ReverseProxy
    from dicomproxy.upstream import Upstream
except ImportError:  # the layout before dicomproxy/upstream/
    from dicomproxy.settings import load_settings
    from dicomproxy.proxy import ReverseProxy, Upstream
from dicomproxy.metrics import Metrics
import uvloop

ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % size + b"x" * size

async def serve(reader, writer):
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(ANSWER)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()

async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = load_settings(None, environ={"DICOMPROXY__Upstream__Url": f"http://127.0.0.1:{port}"})
    upstream = Upstream(settings.upstream)
    proxy = ReverseProxy(upstream, Metrics())
    scope = {"type": "http", "method": "GET", "path": "/series/x", "raw_path": b"/series/x", "query_string": b"",
             "headers": [(b"host", b"127.0.0.1:8080"), (b"user-agent", b"wrk"), (b"accept", b"*/*")],
             "client": ("127.0.0.1", 50000), "scheme": "http", "http_version": "1.1"}
    never = asyncio.get_running_loop().create_future()

    async def one():
        sent = []
        first = True
        async def receive():
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": b"", "more_body": False}
            return await never
        async def send(message):
            sent.append(len(message.get("body", b"")))
        await proxy(scope, receive, send)
        assert sum(sent) == size, sent

    for _ in range(20):  # warm-up: the pool's connection, caches
        await one()
    for _ in range(count):
        await one()
    await upstream.stop()

uvloop.run(main())
"""


def count(python: str, root: Path, size: int, n: int, workdir: Path) -> int:
    out = workdir / f"cg-{abs(hash((str(root), size, n)))}.out"
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", python, "-c", DRIVER, str(root), str(size),
         str(n)],
        capture_output=True, text=True, timeout=1800, cwd=workdir, env={"PYTHONHASHSEED": "0", "PATH": "/usr/bin:/bin"},
    )
    match = re.search(r"^(?:summary|totals): (\d+)", out.read_text() if out.exists() else "", re.M)
    if proc.returncode != 0 or match is None:
        raise SystemExit(f"callgrind run failed ({proc.returncode}) for {root}:\n{proc.stderr[-3000:]}")
    return int(match.group(1))


def per_request(python: str, root: Path, size: int, low: int, high: int, workdir: Path) -> float:
    count(python, root, size, 1, workdir)  # writes the .pyc files: neither measured run compiles
    return (count(python, root, size, high, workdir) - count(python, root, size, low, workdir)) / (high - low)


# --------------------------------------------------------------------------- --gateway
# The whole gateway (uvicorn, the ASGI layers, the proxy) as ``dicomproxy serve`` under callgrind,
# in front of a static upstream; counters zeroed and dumped around 100 then 600 keep-alive
# requests (callgrind_control); the monitor's probe and the metrics history's sampling are pushed
# out of the window (periodic work, which the ~50x slower run under callgrind would inflate).
BODY = b"x" * 2184
START_LIMIT = 1500.0  # seconds for the gateway to start under callgrind


class _Static(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args: object) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _total(path: Path) -> int:
    match = re.search(r"^(?:summary|totals): (\d+)", path.read_text(), re.M)
    assert match, path
    return int(match.group(1))


STARTER = """import sys
try:
    import dicomproxy.upstream.monitor as m
except ImportError:
    import dicomproxy.api as m
m.UpstreamMonitor.__init__.__defaults__ = (1e9,)
try:  # the status page's metrics history samples every second: under callgrind (~50x slower) that
    # is most of what a request window counts, so it is pushed out of the window like the probe
    import dicomproxy.ui.history as h
    init = h.History.__init__  # its ``interval`` default, found by name (the signature grew)
    names = init.__code__.co_varnames[1:init.__code__.co_argcount]
    defaults = list(init.__defaults__)
    defaults[names.index("interval") - (len(names) - len(defaults))] = 1e9
    init.__defaults__ = tuple(defaults)
except ImportError:  # a checkout before the history
    pass
try:  # the upstreams file's watcher (a stat and the health gauges every second): out of the window too
    import dicomproxy.upstream.directory as d
    d.WATCH_INTERVAL = 1e9
except ImportError:  # a checkout before named upstreams
    pass
from dicomproxy.cli import main
sys.exit(main(['serve', '--config', sys.argv[1]]))
"""


def _gateway(root: str, python: str, upstream_port: int, tmp: str, hooks: bool = False,
             counts: tuple[int, int] = (100, 600)) -> float:
    """Instructions per request of ``dicomproxy serve`` from ``root`` under callgrind; ``hooks``:
    with proxy_bench's singleton ``onHttpRequest`` + ``onHttpResponse`` (its ``gw-singleton``)."""
    port = _free_port()
    wd = Path(tmp) / f"gw-{abs(hash(root))}-{'hooks' if hooks else 'none'}"
    (wd / "scripts").mkdir(parents=True, exist_ok=True)
    if hooks:
        (wd / "scripts" / "main.lua").write_text(GATEWAY_HOOKS)
    config = {
        "Urls": f"http://127.0.0.1:{port}", "Upstream": {"Url": f"http://127.0.0.1:{upstream_port}"},
        "ExtraConfig": {"ScriptsRoot": str(wd / "scripts"), "DataFolder": str(wd / "data"),
                        "TusUploadFolder": str(wd / "data/tus")},
        "Lua": {"ReloadIntervalMs": 600000}, "Tus": {"SweepIntervalSeconds": 100000},
        "Orthanc": {"PollIntervalSeconds": 100000},  # the change feed's loop, out of the window as well
        "Dicom": {"Port": 0, "SpoolFolder": str(wd / "data/spool")}, "Logging": {"Level": "WARNING"},
    }
    (wd / "appsettings.json").write_text(json.dumps(config))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": root, "PYTHONHASHSEED": "0", "HOME": "/root"}
    log = wd / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={wd / 'cg.out'}", python, "-c", STARTER,
             str(wd / "appsettings.json")], cwd=wd, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    _wait_healthy(proc, port, log)
    client = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def requests(k: int) -> None:
        for _ in range(k):
            client.request("GET", "/series/x", headers={"User-Agent": "bench"})
            assert client.getresponse().read() == BODY

    requests(50)
    totals = []
    for k in counts:
        subprocess.run(["callgrind_control", "--zero", str(proc.pid)], check=True, capture_output=True)
        requests(k)
        before = set(wd.glob("cg.out*"))
        subprocess.run(["callgrind_control", "--dump", str(proc.pid)], check=True, capture_output=True)
        totals.append(_total(sorted(set(wd.glob("cg.out*")) - before)[-1]))
    client.close()
    proc.send_signal(signal.SIGINT)
    proc.wait(300)
    return (totals[1] - totals[0]) / (counts[1] - counts[0])


def _wait_healthy(proc: subprocess.Popen[bytes], port: int, log: Path, limit: float = START_LIMIT) -> None:
    """Wait for ``/dicomproxy/health`` to answer, however long the start under callgrind takes.

    Under callgrind the gateway's start (imports, the Lua runtime, the listeners) takes minutes on
    this shared machine, longer than the 300 s this waited before, which then failed with
    "connection refused" (the port not bound yet); a gateway that exits is reported with its log.
    """
    deadline = time.time() + limit
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the gateway under callgrind exited ({proc.returncode}):\n"
                             f"{log.read_text(errors='replace')[-3000:]}")
        try:
            probe = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            probe.request("GET", "/dicomproxy/health")
            probe.getresponse().read()
            probe.close()
            return
        except OSError:
            if time.time() > deadline:
                proc.kill()
                raise SystemExit(f"the gateway under callgrind did not answer within {limit:g} s:\n"
                                 f"{log.read_text(errors='replace')[-3000:]}") from None
            time.sleep(2)


def gateway_counts(baseline: Path, base_python: str) -> list[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Static)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gw-instr-") as tmp:
        for hooks, what in ((False, "no script"), (True, "singleton hooks")):
            theirs = _gateway(str(baseline), base_python, srv.server_address[1], tmp, hooks)
            mine = _gateway(str(ROOT), sys.executable, srv.server_address[1], tmp, hooks)
            rows.append(f"| whole gateway, {what}, 2,184 B | {theirs / 1000:,.0f} | {mine / 1000:,.0f} "
                        f"| {mine / theirs:.3f} |")
    srv.shutdown()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, required=True, help="the other checkout (with its own .venv)")
    ap.add_argument("--sizes", default="2184,10486914", help="answer sizes in bytes (default: 2 KB JSON, 10 MB)")
    ap.add_argument("--gateway", action="store_true",
                    help="also the whole gateway process (2 KB answers), with no script and with singleton hooks")
    args = ap.parse_args(argv)
    here = sys.executable
    base = str(args.baseline / ".venv" / "bin" / "python")
    rows = []
    with tempfile.TemporaryDirectory(prefix="proxy-instr-") as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            low, high = (50, 250) if size < 1 << 20 else (4, 14)
            mine = per_request(here, ROOT, size, low, high, Path(tmp))
            theirs = per_request(base, args.baseline, size, low, high, Path(tmp))
            rows.append(f"| in-process, {size:,} B | {theirs / 1000:,.0f} | {mine / 1000:,.0f} | {mine / theirs:.3f} |")
    if args.gateway:
        rows += gateway_counts(args.baseline, base)
    print("| what | baseline kIr/request | this checkout kIr/request | ratio |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
