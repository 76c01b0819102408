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

Not a test: prints a Markdown table.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, required=True, help="the other checkout (with its own .venv)")
    ap.add_argument("--sizes", default="2184,10486914", help="answer sizes in bytes (default: 2 KB JSON, 10 MB)")
    args = ap.parse_args(argv)
    here = sys.executable
    base = str(args.baseline / ".venv" / "bin" / "python")
    rows = []
    with tempfile.TemporaryDirectory(prefix="proxy-instr-") as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            low, high = (50, 250) if size < 1 << 20 else (4, 14)
            mine = per_request(here, ROOT, size, low, high, Path(tmp))
            theirs = per_request(base, args.baseline, size, low, high, Path(tmp))
            rows.append(f"| {size:,} | {theirs / 1000:,.0f} | {mine / 1000:,.0f} | {mine / theirs:.3f} |")
    print("| answer bytes | baseline kIr/request | this checkout kIr/request | ratio |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
