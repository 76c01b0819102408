"""SharedDict (dicomproxy/scripting/shared.py): the store's semantics (ngx.shared.DICT's get / set /
add / incr / delete / keys, TTL, the bounds and what happens when full) and the Lua table over it
in an engine. The same store across engine types through a real gateway: tests/e2e/test_shared_dict.py."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dicomproxy_middleware import Export, LuaEngine, LuaError

from dicomproxy.scripting.shared import (
    ENTRY_OVERHEAD,
    MAX_KEY_BYTES,
    MAX_VALUE_BYTES,
    SHARED_DICT_LUA,
    MemoryStore,
    SharedDictExports,
)
from dicomproxy.scripting.shared_lmdb import LmdbStore
from tests.scripting.shared_dict_lua import lua_api_walk


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


Make = Callable[..., Any]


def store(clock: Clock, keys: int = 100, size: int = 1 << 20) -> MemoryStore:
    return MemoryStore(keys, size, clock=clock)


@pytest.fixture(params=["memory", "lmdb"])
def make(request: pytest.FixtureRequest, clock: Clock, tmp_path: Path) -> Iterator[Make]:
    """Each backend: the in-process one, and LMDB (several workers, dicomproxy/scripting/shared_lmdb.py)."""
    made: list[LmdbStore] = []

    def build(keys: int = 100, size: int = 1 << 20) -> Any:
        if request.param == "memory":
            return MemoryStore(keys, size, clock=clock)
        made.append(LmdbStore(tmp_path / f"lmdb-{len(made)}", keys, size, clock=clock))
        return made[-1]

    yield build
    for s in made:
        s.close()


def test_get_set_delete_and_value_kinds(clock: Clock, make: Make) -> None:
    s = make()
    assert s.get("k") is None
    for value in ("text", 42, 2.5, True, False, {"a": [1, 2, {"b": None}]}, [1, "x"], b"\xff\x00"):
        assert s.set("k", value, 0) == (True, None, False)
        assert s.get("k") == value
    s.delete("k")
    assert s.get("k") is None
    s.set("k", "v", 0)
    assert s.set("k", None, 0) == (True, None, False)  # set(key, nil) deletes, as in ngx
    assert s.get("k") is None and s.bytes == 0


def test_a_table_is_a_copy(clock: Clock, make: Make) -> None:
    s = make()
    value = {"n": [1]}
    s.set("t", value, 0)
    value["n"].append(2)
    got = s.get("t")
    assert got == {"n": [1]}
    assert isinstance(got, dict)
    got["n"].append(3)
    assert s.get("t") == {"n": [1]}


def test_ttl(clock: Clock, make: Make) -> None:
    s = make()
    s.set("short", 1, 10)
    s.set("forever", 2, 0)
    clock.now += 9.9
    assert s.get("short") == 1 and sorted(s.keys(0)) == ["forever", "short"]
    clock.now += 0.2
    assert s.get("short") is None and s.keys(0) == ["forever"] and s.get("forever") == 2


def test_add(clock: Clock, make: Make) -> None:
    s = make()
    assert s.add("lock", "me", 5) == (True, None, False)
    assert s.add("lock", "you", 5) == (False, "exists", False)
    assert s.get("lock") == "me"
    clock.now += 6
    assert s.add("lock", "you", 5) == (True, None, False)  # an expired entry does not count


def test_incr(clock: Clock, make: Make) -> None:
    s = make()
    assert s.incr("n", 1, None, 0) == (None, "not found")
    assert s.incr("n", 1, 0, 0) == (1, None)
    assert s.incr("n", 5, 0, 0) == (6, None)
    assert s.incr("n", -0.5, 0, 0) == (5.5, None)
    s.set("s", "text", 0)
    assert s.incr("s", 1, 0, 0) == (None, "not a number")
    assert s.incr("t", 1, 10, 3) == (11, None)  # init's ttl
    clock.now += 4
    assert s.get("t") is None


def test_full_set_evicts_the_least_recently_used(clock: Clock) -> None:
    s = store(clock, keys=3)
    for k in ("a", "b", "c"):
        s.set(k, 1, 0)
    assert s.get("a") == 1  # a is now the most recently used
    assert s.set("d", 1, 0) == (True, None, True)  # forcible: a live entry went
    assert sorted(s.keys(0)) == ["a", "c", "d"]
    assert s.set("c", 2, 0) == (True, None, False)  # replacing needs no room


def test_lmdb_full_set_evicts_the_least_recently_written(clock: Clock, tmp_path: Path) -> None:
    s = LmdbStore(tmp_path / "lmdb", 3, 1 << 20, clock=clock)
    for k in ("a", "b", "c"):
        s.set(k, 1, 0)
    assert s.get("a") == 1  # a read does not move an entry (that would take a write transaction)
    assert s.set("b", 2, 0) == (True, None, False)  # a write does: a is now the oldest
    assert s.set("d", 1, 0) == (True, None, True)
    assert sorted(s.keys(0)) == ["b", "c", "d"]
    s.close()


def test_lmdb_long_keys_and_counters_across_processes(tmp_path: Path) -> None:
    """Two processes incrementing one counter: every increment counts (one write transaction each);
    a key past LMDB's 511-byte limit works and is listed whole."""
    folder = tmp_path / "lmdb"
    long_key = "k" * 1000
    LmdbStore(folder, 100, 1 << 20).set(long_key, "v", 0)
    pids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                child = LmdbStore(folder, 100, 1 << 20)
                for _ in range(2000):
                    child.incr("n", 1, 0, 0)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    assert [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids] == [0, 0]
    s = LmdbStore(folder, 100, 1 << 20)
    assert s.get("n") == 4000
    assert s.get(long_key) == "v" and sorted(s.keys(0)) == [long_key, "n"]
    s.delete(long_key)
    assert s.keys(0) == ["n"]


def test_full_set_drops_expired_entries_first(clock: Clock, make: Make) -> None:
    s = make(keys=2)
    s.set("old", 1, 0)
    s.set("brief", 1, 1)
    clock.now += 2
    assert s.set("new", 1, 0) == (True, None, False)
    assert sorted(s.keys(0)) == ["new", "old"]


def test_full_add_and_incr_never_evict(clock: Clock, make: Make) -> None:
    s = make(keys=2)
    s.set("a", 1, 0)
    s.set("b", 1, 0)
    ok, err, forcible = s.add("c", 1, 0)
    assert (ok, forcible) == (False, False) and err is not None and err.startswith("no memory")
    assert "Lua:SharedDictMaxKeys" in err
    value, err = s.incr("c", 1, 0, 0)
    assert value is None and err is not None and err.startswith("no memory")
    assert s.incr("a", 1, 0, 0) == (2, None)  # an existing counter still counts
    assert sorted(s.keys(0)) == ["a", "b"]


def test_the_byte_bound(clock: Clock, make: Make) -> None:
    size = 2 * (ENTRY_OVERHEAD + 1 + 1000)
    s = make(size=size)
    assert s.set("a", "x" * 1000, 0)[0] and s.set("b", "x" * 1000, 0)[0]
    assert s.bytes == size
    assert s.set("c", "x" * 1000, 0) == (True, None, True) and s.get("a") is None
    ok, err, _ = s.set("huge", "x" * size, 0)
    assert not ok and err is not None and "the value alone" in err
    s.delete("b")
    s.delete("c")
    assert s.bytes == 0


def test_keys_limit(clock: Clock, make: Make) -> None:
    s = make()
    for i in range(10):
        s.set(f"k{i}", i, 0)
    assert len(s.keys(3)) == 3 and len(s.keys(0)) == 10


# --------------------------------------------------------------------------- the Lua side
@pytest.fixture
def engine(clock: Clock) -> Iterator[LuaEngine]:
    shared = SharedDictExports(MemoryStore(100, 1 << 20, clock=clock))
    exports = {f"_Shared{n.capitalize()}": Export(getattr(shared, n), label=f"SharedDict:{n}")
               for n in ("get", "set", "add", "incr", "delete", "keys")}
    e = LuaEngine("shared", exports=exports, setup=(SHARED_DICT_LUA,), timeout_ms=2000)
    yield e
    e.release()


def run(engine: LuaEngine, code: str) -> tuple[Any, ...]:
    return asyncio.run(engine.run(engine.compile(code, "script.lua")))


def test_lua_api(engine: LuaEngine) -> None:
    assert run(engine, lua_api_walk()) == ("n,t",)


def test_integers_stay_integers(engine: LuaEngine) -> None:
    assert run(engine, 'SharedDict:set("i", 7) SharedDict:incr("i", 1) '
               'return math.type(SharedDict:get("i")), math.type(SharedDict:incr("f", 0.5, 0))') == ("integer", "float")


@pytest.mark.parametrize(("code", "message"), [
    ('SharedDict:set({}, 1)', "a key is a non-empty string"),
    ('SharedDict:set("", 1)', "a key is a non-empty string"),
    (f'SharedDict:set(("k"):rep({MAX_KEY_BYTES + 1}), 1)', f"at most {MAX_KEY_BYTES} bytes"),
    (f'SharedDict:set("k", ("v"):rep({MAX_VALUE_BYTES + 1}))', f"at most {MAX_VALUE_BYTES} bytes"),
    ('SharedDict:set("k", print)', "values are strings, numbers, booleans or tables"),
    ('SharedDict:set("k", {f = print})', "values are strings, numbers, booleans or tables"),
    ('SharedDict:set("k", 1, -1)', "ttl is a number of seconds"),
    ('SharedDict:add("k", nil)', "add needs a value"),
    ('SharedDict:incr("k", "x")', "delta is a finite number"),
    ('SharedDict:keys(-1)', "keys(max)"),
])
def test_bad_arguments_are_lua_errors_at_the_callers_line(engine: LuaEngine, code: str, message: str) -> None:
    with pytest.raises(LuaError, match="script.lua:1:") as caught:
        run(engine, code)
    assert message in str(caught.value)
    assert "SharedDict:" in str(caught.value) and "_Shared" not in str(caught.value)
