"""The watchdog (middleware/watchdog.py): a call running slow VM instructions (each one costing
milliseconds) is stopped at its budget instead of at the next count-hook check, 100,000
instructions later. Each attack here ran 100-250 s past a 200 ms budget before the watchdog.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from dicomproxy_middleware import LuaEngine, LuaTimeoutError, Watchdog
from dicomproxy_middleware.runtime import lupa
from dicomproxy_middleware.watchdog import hook_counter

BUDGET_S = 0.2
MARGIN_S = 0.35  # waking the thread + one slow instruction, on a shared machine

SLOW_INSTRUCTIONS = {
    # one instruction = a 16 MB concatenation
    "concat": 'local s = ("x"):rep(2^24) while true do local t = s .. "y" end',
    # one instruction = comparing two 16 MB strings that differ in their last byte
    "compare": 'local s = ("x"):rep(2^24) local u = s:sub(1, -2) .. "y" while true do local _ = s < u end',
    # one instruction = hashing a new 4 MB string as a table key
    "hash": 'local s = ("x"):rep(2^22) local i = 0 while true do i = i + 1 local t = { [s .. i] = 1 } end',
    # one instruction = a full collection of ~300,000 tables
    "collect": 'local t = {} for i = 1, 3e5 do t[i] = {} end while true do collectgarbage() end',
    # ... and the same from inside a coroutine the script made
    "in a coroutine": 'coroutine.wrap(function() local s = ("x"):rep(2^24) while true do local t = s .. "y" end end)()',
}


@pytest.fixture(scope="module")
def watchdog() -> Iterator[Watchdog]:
    wd = Watchdog(lupa)
    yield wd
    wd.stop()


def test_the_hook_counter_is_found_and_proven() -> None:
    assert hook_counter(lupa) is not None, "the lua_State layout changed: the watchdog cannot interrupt"


@pytest.mark.parametrize("name", list(SLOW_INSTRUCTIONS))
def test_slow_instructions_are_stopped_at_the_budget(watchdog: Watchdog, name: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    engine = LuaEngine("slow", timeout_ms=int(BUDGET_S * 1000), max_memory_mb=128, watchdog=watchdog)
    fn = engine.compile(SLOW_INSTRUCTIONS[name], f"{name}.lua")
    started = time.monotonic()
    try:
        with pytest.raises(LuaTimeoutError):
            asyncio.run(engine.run(fn))
    finally:
        elapsed = time.monotonic() - started
        engine.release()
    with capsys.disabled():
        print(f"\n{name}: stopped {1000 * (elapsed - BUDGET_S):.0f} ms after its {1000 * BUDGET_S:.0f} ms budget")
    assert elapsed < BUDGET_S + MARGIN_S


def test_without_the_watchdog_the_count_hook_alone_is_late() -> None:
    """The reason for the watchdog, kept honest: the same loop with the count hook only runs far
    past its budget (the hook checks the clock every 100,000 instructions, here each a 1 MiB copy:
    0.7-5 s measured, by the machine's speed; with the watchdog it stops within MARGIN_S)."""
    engine = LuaEngine("slow", timeout_ms=50, max_memory_mb=128)
    fn = engine.compile('local s = ("x"):rep(2^20) while true do local t = s .. "y" end', "late.lua")
    started = time.monotonic()
    try:
        with pytest.raises(LuaTimeoutError):
            asyncio.run(engine.run(fn))
    finally:
        engine.release()
    assert time.monotonic() - started > 0.05 + MARGIN_S  # later than the watchdog would ever let it run


def test_an_idle_watchdog_does_not_wake(watchdog: Watchdog) -> None:
    """Calls that end in time cost the thread nothing: it sleeps until the earliest deadline."""
    engine = LuaEngine("quick", timeout_ms=60_000, watchdog=watchdog)
    fn = engine.compile("return 1", "quick.lua")
    try:
        asyncio.run(engine.run(fn))
        before, started = watchdog.wakeups, time.monotonic()
        for _ in range(200):
            asyncio.run(engine.run(fn))
        took = time.monotonic() - started
    finally:
        engine.release()
    # it wakes once per max_sleep at most while nothing is overdue: not once per call
    assert watchdog.wakeups - before <= 2 + took / watchdog.max_sleep


def test_a_released_engine_is_never_poked(watchdog: Watchdog) -> None:
    engine = LuaEngine("gone", timeout_ms=100, watchdog=watchdog)
    engine.release()
    engine.interrupt()  # nothing left to poke: must not touch freed memory
    assert engine._threads == set()
