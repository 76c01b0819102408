"""The watchdog: makes the count hook fire at once in a call that is past its time budget.

Why it exists: the time budget is a count hook (every ``hook_count`` VM instructions, see
``prelude.lua``). One VM instruction is not always cheap: ``s .. "y"`` on a 16 MB string, ``s < u``
on two long strings that share a prefix, or hashing a new long string as a table key each cost
milliseconds. Measured before this module: a loop of such instructions ran 100-250 s past a 200 ms
budget (the hook fires only every 100,000 instructions). A smaller count would not fix it (at 10 ms
per instruction even 1,000 instructions are 10 s) and would slow every script down.

What it does: one thread sleeps until the earliest deadline of a call in progress and, for each
engine whose call is past its deadline, sets the *remaining count* of the count hook of that
engine's Lua threads to 1 (again every ``interval`` seconds while the call goes on), so the hook
runs at the next instruction and raises the budget error. This is how the
standalone ``lua`` interpreter stops a script on Ctrl-C (its SIGINT handler sets the hook with a
count of 1); here only the counter is written (one aligned int), not ``lua_sethook``, whose walk
over the thread's call frames is not safe from another thread. The hook keeps the other fields it
already has (every Lua thread the prelude makes has the count hook on), so the VM checks the
counter at each instruction anyway: no other state is touched.

The counter's place inside ``lua_State`` is not part of Lua's API: :func:`hook_counter` finds it
once per process by setting a known count through the debug library and reading the state back,
then proves it by interrupting a real loop; if any step fails the watchdog is off and says so.
A thread's address is Lua's own ``%p`` (``tostring(co)``); the prelude reports each thread it
makes and forgets it before Lua can free it, under the engine's lock (see ``LuaEngine``).

What it cannot do: stop a single C function that runs long (a pattern match, a sort); those are
bounded where scripts call them (``stdlib/``). The overshoot of a call that runs expensive
instructions is the time to wake plus one instruction: measured in
``tests/middleware/test_watchdog.py``.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any, Protocol

log = logging.getLogger("dicomproxy_middleware.lua")

_MAGIC = (0x2A5A5A5, 0x3B6B6B6)  # two counts nobody else would set
_SCAN_INTS = 64  # lua_State is ~200 bytes in Lua 5.4; the two hook counts sit near its end


class Interruptible(Protocol):
    """What the watchdog needs of an engine: when its current call ends, and how to interrupt it."""

    lua_deadline: float

    def interrupt(self) -> None: ...


def thread_address(text: str) -> int:
    """The address in ``tostring(co)`` (``thread: 0x55d0c1a2b3c0``)."""
    return int(text.rpartition(" ")[2], 16)


def _ints_at(address: int) -> list[int]:
    return list((ctypes.c_int32 * _SCAN_INTS).from_address(address))


@functools.cache
def hook_counter(lupa: Any) -> int | None:
    """The byte offset of ``hookcount`` in a ``lua_State``, or None if it cannot be proven.

    Sets a magic count on a coroutine with ``debug.sethook`` (Lua stores it twice: the base count
    and the remaining count, side by side), finds the pair, tells the two apart by running a few
    instructions (only the remaining count moves), then writes 1 into it and checks that the
    hook really runs at the next instruction.
    """
    lua = lupa.LuaRuntime()
    probe = lua.execute(
        """
        local fired = false
        local co = coroutine.create(function()
          for _ = 1, 100 do end
          coroutine.yield()
          for _ = 1, 1000000 do if fired then return "fired" end end
          return "not fired"
        end)
        local function set(count) debug.sethook(co, function() fired = true end, "", count) end
        local function step() return select(2, coroutine.resume(co)) end
        return step, tostring(co), set
        """
    )
    step, text, set_count = probe
    address = thread_address(text)
    set_count(_MAGIC[0])
    first = _ints_at(address)
    pairs = [i for i in range(_SCAN_INTS - 1) if first[i] == first[i + 1] == _MAGIC[0]]
    set_count(_MAGIC[1])
    second = _ints_at(address)
    pairs = [i for i in pairs if second[i] == second[i + 1] == _MAGIC[1]]
    if len(pairs) != 1:
        return None
    base = pairs[0]
    step()  # runs ~300 instructions, then yields
    moved = _ints_at(address)
    if moved[base] != _MAGIC[1] or not 0 < _MAGIC[1] - moved[base + 1] < 10_000:
        return None
    offset = (base + 1) * 4
    ctypes.c_int32.from_address(address + offset).value = 1
    return offset if step() == "fired" else None


class Watchdog:
    """One thread for all the engines of a script set; see the module docstring.

    It sleeps until the earliest deadline of a call in progress (``next_wake``), so a gateway
    whose calls end in time costs it nothing per call: an engine starting a call only wakes it
    (one ``Event.set``) when that call's deadline comes before ``next_wake``, and ``next_wake``
    reads as "now" while the thread looks, so no call started meanwhile is missed. Once a call
    is overdue the thread pokes its threads every ``interval`` seconds until it has stopped.
    """

    def __init__(self, lupa: Any, interval: float = 0.01, max_sleep: float = 1.0) -> None:
        self.interval = interval
        self.max_sleep = max_sleep
        self.next_wake = math.inf  # read by engines starting a call; see wake_for()
        self.wakeups = 0  # how often the thread looked (for tests and the status page)
        self._offset = hook_counter(lupa)
        if self._offset is None:
            log.warning("the Lua watchdog is off: this Lua build's lua_State layout is not the one expected; a "
                        "call running expensive instructions may overrun its time budget")
        self._engines: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self._offset is not None

    def add(self, engine: Interruptible) -> None:
        """Watch ``engine`` (held weakly) from now on; starts the thread on first use."""
        if self._offset is None:
            return
        with self._lock:
            self._engines.add(engine)
            if self._thread is None:
                self._stopped = False
                self._thread = threading.Thread(target=self._run, name="lua-watchdog", daemon=True)
                self._thread.start()

    def wake_for(self, deadline: float) -> None:
        """An engine starts a call ending at ``deadline``: wake the thread if it sleeps past it."""
        if deadline < self.next_wake:
            self._event.set()

    def stop(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._stopped = True
            self._event.set()
            thread.join()

    def poke(self, addresses: Iterable[int]) -> None:
        """Make the count hook of each Lua thread fire at its next instruction (caller holds the
        engine's lock, so no address is freed meanwhile)."""
        offset = self._offset
        if offset is None:
            return
        for address in addresses:
            ctypes.c_int32.from_address(address + offset).value = 1

    def _run(self) -> None:
        while not self._stopped:
            self.wakeups += 1
            self._event.clear()
            self.next_wake = math.inf  # looking: a call that starts now wakes us again
            now = time.monotonic()
            soonest = now + self.max_sleep
            with self._lock:
                engines = list(self._engines)
            for engine in engines:
                deadline = engine.lua_deadline
                if deadline <= now:
                    engine.interrupt()
                    soonest = min(soonest, now + self.interval)
                elif deadline < soonest:
                    soonest = deadline
            del engines
            self.next_wake = soonest
            self._event.wait(max(0.0, soonest - time.monotonic()))


NO_DEADLINE = math.inf
