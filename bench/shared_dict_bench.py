#!/usr/bin/env python3
"""The cost of one ``SharedDict:incr`` from Lua (issue 14 item 1), per backend, in one run.

One engine per backend, bound as the gateway binds it (``ScriptHost``): the in-process
``MemoryStore`` and ``LmdbStore`` (``Server:Workers`` > 1) as synchronous exports, the
``RedisStore`` (``Cluster:Redis``) as awaited exports against a Debian ``redis-server`` this
script starts on a loopback port. Baselines in the same run: an export that does nothing,
synchronous and awaited (the crossing between Lua and Python, and the engine's yield and resume).
Each figure is a loop of ``--calls`` calls in one Lua run, after a warm-up run; rounds alternate
the backends and the median is given: wall microseconds per call and this process's CPU
microseconds per call (for Redis the wall includes the round trip and Redis's own work).

    python bench/shared_dict_bench.py [--calls 5000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import LOOPBACK, Process, free_port, machine_info, require  # noqa: E402
from dicomproxy_middleware import Export, LuaEngine  # noqa: E402

from dicomproxy.cluster.redis import connect_calls  # noqa: E402
from dicomproxy.config.settings import Settings  # noqa: E402
from dicomproxy.scripting.shared import (  # noqa: E402
    SHARED_DICT_LUA,
    AsyncSharedDictExports,
    MemoryStore,
    SharedDictExports,
)
from dicomproxy.scripting.shared_lmdb import LmdbStore  # noqa: E402
from dicomproxy.scripting.shared_redis import RedisStore  # noqa: E402

NAMES = ("get", "set", "add", "incr", "delete", "keys")


def shared_engine(exports: Any, is_async: bool) -> LuaEngine:
    bound = {f"_Shared{n.capitalize()}": Export(getattr(exports, n), is_async=is_async, label=f"SharedDict:{n}")
             for n in NAMES}

    def nothing() -> None:
        return None

    async def nothing_awaited() -> None:
        return None

    bound["Nothing"] = Export(nothing)
    bound["NothingAwaited"] = Export(nothing_awaited, is_async=True)
    return LuaEngine("bench", exports=bound, setup=(SHARED_DICT_LUA,), timeout_ms=600_000)


async def per_call(engine: LuaEngine, body: str, calls: int) -> tuple[float, float]:
    code = engine.compile(f"for i = 1, {calls} do {body} end", "bench.lua")
    await engine.run(code)  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    await engine.run(code)
    return (time.perf_counter() - wall) / calls * 1e6, (time.process_time() - cpu) / calls * 1e6


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((LOOPBACK, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"redis-server did not listen on {port}")


async def measure(calls: int, rounds: int, redis_url: str, folder: Path) -> dict[str, list[tuple[float, float]]]:
    redis_store = RedisStore(connect_calls(Settings.model_validate({"Cluster": {"Redis": redis_url}})), redis_url,
                             10_000, 16 << 20)
    engines: dict[str, tuple[LuaEngine, str]] = {}
    memory = shared_engine(SharedDictExports(MemoryStore(10_000, 16 << 20)), False)
    lmdb = shared_engine(SharedDictExports(LmdbStore(folder / "lmdb", 10_000, 16 << 20)), False)
    redis = shared_engine(AsyncSharedDictExports(redis_store), True)
    incr = 'SharedDict:incr("n", 1, 0)'
    engines["export doing nothing (sync)"] = (memory, "Nothing()")
    engines["export doing nothing (awaited)"] = (memory, "NothingAwaited()")
    engines["incr, memory"] = (memory, incr)
    engines["incr, LMDB"] = (lmdb, incr)
    engines["incr, Redis"] = (redis, incr)
    engines["get, Redis"] = (redis, 'SharedDict:get("n")')
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
    floor = "redis-py INCR from Python, no Lua (the client's floor)"
    results[floor] = []
    plain = redis_store.client
    for _ in range(rounds):
        for name, (engine, body) in engines.items():
            results[name].append(await per_call(engine, body, calls))
        results[floor].append(await plain_incr(plain, calls))
    await redis_store.stop()
    return results


async def plain_incr(client: Any, calls: int) -> tuple[float, float]:
    for _ in range(100):
        await client.incr("dicomproxy:bench")
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        await client.incr("dicomproxy:bench")
    return (time.perf_counter() - wall) / calls * 1e6, (time.process_time() - cpu) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    binary = require("/usr/bin/redis-server", "apt-get install redis-server (scripts/install.sh)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        port = free_port()
        redis = Process("redis", [binary, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
                                  "--dir", tmp], folder / "redis.log", cwd=folder)
        try:
            wait_port(port)
            results = asyncio.run(measure(args.calls, args.rounds, f"redis://{LOOPBACK}:{port}/0", folder))
        finally:
            redis.stop()
    print(f"# {machine_info()}; {args.calls} calls x {args.rounds} rounds, median")
    print("| call | wall µs/call | CPU µs/call (this process) |")
    print("|---|---|---|")
    median: Callable[[list[float]], float] = statistics.median
    for name, runs in results.items():
        print(f"| {name} | {median([w for w, _ in runs]):.1f} | {median([c for _, c in runs]):.1f} |")


if __name__ == "__main__":
    main()
