#!/usr/bin/env python3
"""The cost of named upstreams per proxied request: routing rules and a Lua ``SetUpstream``.

The whole in-process ASGI stack (``build_gateway(...).build()``: guard, CORS, the Lua layer, the
proxy and its client) in front of a static upstream on loopback in the same process (2,184-byte
answers), one request at a time. Variants:

* ``plain`` — no ``Upstreams`` configured (the single-upstream path; ``--baseline`` runs it in
  another checkout too: the no-route case must not get slower);
* ``routesN`` — ``Upstreams`` with N routes none of which matches (the path, a host and a header
  rule each), then ``Default``: the worst case of N rules;
* ``lua-noop`` / ``lua-set`` — routing on, an ``onHttpRequest`` that does nothing / that calls
  ``request:SetUpstream("b")``: their difference is SetUpstream's cost.

Each variant is measured two ways: callgrind instructions (``low`` and ``high`` requests, the
difference per request: exact, load-independent) and CPU time (``time.process_time`` over
``--requests``, best of 3: the µs the target is stated in, noisy on a shared machine).

    python bench/upstreams_bench.py [--baseline /work/baseline] [--variants plain,routes10,lua-noop,lua-set]
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
import asyncio, gc, sys, time
from pathlib import Path
root, variant, n, how = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sys.path.insert(0, root)
from dicomproxy.app import build_gateway
from dicomproxy.config.settings import load_settings
import uvloop

SIZE = 2184
ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % SIZE + b"x" * SIZE
HOOKS = {"lua-noop": "function onHttpRequest(request) end",
         "lua-set": 'function onHttpRequest(request) request:SetUpstream("b") end'}

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
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    work = Path(sys.argv[5])
    scripts = work / "scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    for f in scripts.glob("*.lua"):
        f.unlink()
    if variant in HOOKS:
        (scripts / "main.lua").write_text(HOOKS[variant])
    overrides = {"Upstream:Url": url, "Dicom:Port": "0", "ExtraConfig:ScriptsRoot": str(scripts),
                 "ExtraConfig:DataFolder": str(work / "data"), "ExtraConfig:TusUploadFolder": str(work / "tus"),
                 "Dicom:SpoolFolder": str(work / "spool"), "Logging:Level": "WARNING",
                 "Lua:ReloadIntervalMs": "600000"}  # no script-reload polling inside the counted window
    if variant != "plain":
        rules = int(variant[6:]) if variant.startswith("routes") else 0
        routes = []
        for i in range(rules):
            kind = i % 3
            routes.append({"Path": f"/no{i}/"} if kind == 0 else {"Host": f"h{i}.example"} if kind == 1
                          else {"Header": f"X-Route{i}: yes"})
            routes[-1]["Upstream"] = "b"
        overrides["Upstreams"] = {"Servers": {"b": {"Url": url}}, "Routes": routes, "Default": "b"}
    gateway = build_gateway(load_settings(None, environ={}, overrides=overrides))
    await gateway.lua.start()
    gateway._serving = True
    app = gateway.build()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": "/series/x", "raw_path": b"/series/x", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080),
             "headers": [(b"host", b"127.0.0.1:8080"), (b"user-agent", b"bench"), (b"accept", b"*/*")]}
    never = asyncio.get_running_loop().create_future()

    async def one():
        got = []
        first = True
        async def receive():
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": b"", "more_body": False}
            return await never
        async def send(message):
            got.append(len(message.get("body", b"")))
        await app(dict(scope), receive, send)
        assert sum(got) == SIZE, got

    for _ in range(30):
        await one()
    if how == "count":
        for _ in range(n):
            await one()
    else:
        best = float("inf")
        for _ in range(3):
            gc.collect()
            t0 = time.process_time()
            for _ in range(n):
                await one()
            best = min(best, (time.process_time() - t0) / n * 1e6)
        print(f"{best:.2f}")
    await gateway.lua.stop()
    await gateway.upstream.stop()

uvloop.run(main())
"""


def run(python: str, root: Path, variant: str, n: int, how: str, work: Path, callgrind: Path | None = None) -> str:
    cmd = [python, "-c", DRIVER, str(root), variant, str(n), how, str(work)]
    if callgrind is not None:
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={callgrind}", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=work,
                          env={"PYTHONHASHSEED": "0", "PATH": "/usr/bin:/bin"})
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed ({proc.returncode}) for {root}:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip()


def instructions(python: str, root: Path, variant: str, work: Path, low: int = 50, high: int = 250) -> float:
    run(python, root, variant, 1, "count", work)  # .pyc files written: neither measured run compiles
    totals = []
    for n in (low, high):
        out = work / f"cg-{variant}-{n}-{abs(hash(str(root)))}.out"
        run(python, root, variant, n, "count", work, out)
        match = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.M)
        assert match, out
        totals.append(int(match.group(1)))
    return (totals[1] - totals[0]) / (high - low)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, help="another checkout (with its own .venv) for the plain variant")
    ap.add_argument("--variants", default="plain,routes10,routes50,lua-noop,lua-set")
    ap.add_argument("--requests", type=int, default=3000, help="requests per CPU-time pass")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="upstreams-bench-") as tmp:
        work = Path(tmp)
        checkouts = [("this", sys.executable, ROOT)]
        if args.baseline:
            checkouts.insert(0, ("baseline", str(args.baseline / ".venv/bin/python"), args.baseline))
        for variant in args.variants.split(","):
            for label, python, root in checkouts:
                if label == "baseline" and variant != "plain":
                    continue
                cpu = float(run(python, root, variant, args.requests, "time", work))
                kir = instructions(python, root, variant, work) / 1000
                rows.append(f"| {variant} | {label} | {cpu:.1f} | {kir:,.1f} |")
    print("| variant | checkout | CPU µs/request (best of 3) | kIr/request (callgrind) |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
