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
    python bench/upstreams_bench.py --micro     # the parts alone, timeit-style (best of 7)

Under callgrind the whole-stack counts move by ±25 % between runs (valgrind runs the requests
~50x slower, so wall-clock timers such as the proxy's 50 ms disconnect watcher fire in some runs
and not others); ``--micro`` times the added parts alone, in-process, interleaved, best of 7:
``Routes.choose`` with N rules, the routed path's accounting (pick, in-flight count, passive
health, the labelled counter), and ``onHttpRequest`` with and without ``SetUpstream``.
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


def micro(rounds: int = 7, n: int = 20000) -> list[str]:
    """µs per call of each added part (process CPU time, best of ``rounds``)."""
    import asyncio
    import time

    from dicomproxy_middleware import LuaEngine
    from dicomproxy_middleware.http import HttpExchange, call_request_hook

    from dicomproxy.config.model import HttpRoute
    from dicomproxy.config.settings import load_settings
    from dicomproxy.http.routes import Routes
    from dicomproxy.metrics import Metrics
    from dicomproxy.upstream import Upstream
    from dicomproxy.upstream.directory import Upstreams

    scope = {"type": "http", "method": "GET", "scheme": "http", "path": "/series/x", "raw_path": b"/series/x",
             "query_string": b"", "client": ("127.0.0.1", 5), "headers": [(b"host", b"127.0.0.1:8080"),
                                                                          (b"user-agent", b"b"), (b"accept", b"*/*")]}

    def rules(k: int) -> Routes:
        out = []
        for i in range(k):
            r: dict[str, object] = ({"Path": f"/no{i}/"} if i % 3 == 0 else {"Host": f"h{i}.example"} if i % 3 == 1
                                    else {"Header": f"X-Route{i}: yes"})
            out.append(HttpRoute.model_validate({**r, "Upstream": "b"}))
        return Routes(out, "b")

    settings = load_settings(None, environ={}, overrides={"Upstream:Url": "http://127.0.0.1:9", "Upstreams": {
        "Servers": {"b": {"Url": "http://127.0.0.1:9"}, "c": {"Url": "http://127.0.0.1:9"}},
        "Groups": {"g": {"Members": ["b", "c"], "Mode": "RoundRobin"}}}})
    ups = Upstreams(settings, Upstream(settings.upstream), Metrics())

    def accounting() -> None:  # what the routed path adds around one exchange
        member = ups.pick("g")
        assert member is not None
        member.begin()
        member.answered()
        ups.requests.inc(upstream=member.name, status="2xx")
        member.end()

    cases: dict[str, object] = {f"Routes.choose, {k} rules": (lambda r=rules(k): r.choose(scope)) for k in (1, 10, 50)}
    cases["routed accounting (RoundRobin pick, in flight, health, counter)"] = accounting
    out = {}
    for name, fn in cases.items():
        best = float("inf")
        for _ in range(rounds):
            t0 = time.process_time()
            for _ in range(n):
                fn()  # type: ignore[operator]
            best = min(best, (time.process_time() - t0) / n * 1e6)
        out[name] = best

    async def hooks() -> dict[str, float]:
        engines = {}
        for kind, src in (("noop", "function onHttpRequest(request) end"),
                          ("SetUpstream", 'function onHttpRequest(request) request:SetUpstream("b") end')):
            engine = LuaEngine(kind)
            await engine.load(src, "main.lua")
            engines[kind] = engine
        names = frozenset({"b", "c", "g", "default"})
        best = dict.fromkeys(engines, float("inf"))
        for _ in range(rounds):
            for kind, engine in engines.items():
                t0 = time.process_time()
                for _ in range(n // 4):
                    x = HttpExchange(scope)
                    x.upstream, x.upstream_names = "b", lambda: names
                    await call_request_hook(engine, "onHttpRequest", x)
                best[kind] = min(best[kind], (time.process_time() - t0) / (n // 4) * 1e6)
        for engine in engines.values():
            engine.release()
        return best

    lua = asyncio.run(hooks())
    out["onHttpRequest, empty"] = lua["noop"]
    out["onHttpRequest, request:SetUpstream(\"b\")"] = lua["SetUpstream"]
    rows = [f"| {k} | {v:.2f} |" for k, v in out.items()]
    rows.append(f"| SetUpstream's own cost (difference) | {lua['SetUpstream'] - lua['noop']:.2f} |")
    return [f"| part | CPU µs/call (best of {rounds}) |", "|---|---|", *rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, help="another checkout (with its own .venv) for the plain variant")
    ap.add_argument("--variants", default="plain,routes10,routes50,lua-noop,lua-set")
    ap.add_argument("--requests", type=int, default=3000, help="requests per CPU-time pass")
    ap.add_argument("--micro", action="store_true", help="time the added parts alone (see the docstring)")
    args = ap.parse_args(argv)
    if args.micro:
        print("\n".join(micro()))
        return 0
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
