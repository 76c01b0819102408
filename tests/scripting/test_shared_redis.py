"""SharedDict over Redis (dicomproxy/scripting/shared_redis.py), against a real redis-server:
the same semantics as the memory and LMDB stores (tests/scripting/test_shared.py), atomic
across clients, TTL by Redis's own expiry, the bounds, a Redis that is down or silent failing a
call within seconds with an error naming Cluster:Redis, and the Lua table over the awaited
exports. Two replicas through the real stack: tests/e2e/test_shared_dict_redis.py."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from dicomproxy_middleware import Export, LuaEngine, LuaError, LuaExportError

from dicomproxy.cluster.redis import connect_calls
from dicomproxy.config.settings import Settings
from dicomproxy.scripting.shared import ENTRY_OVERHEAD, SHARED_DICT_LUA, AsyncSharedDictExports
from dicomproxy.scripting.shared_redis import CALL_TIMEOUT, RedisStore
from tests.peers import LOOPBACK, RedisServer, free_port
from tests.scripting.shared_dict_lua import lua_api_walk

Make = Callable[..., RedisStore]


def settings(url: str) -> Settings:
    return Settings.model_validate({"Cluster": {"Redis": url}})


@pytest.fixture
async def make(redis_server: RedisServer) -> AsyncIterator[Make]:
    made: list[RedisStore] = []

    def build(keys: int = 100, size: int = 1 << 20, url: str | None = None) -> RedisStore:
        url = url or redis_server.url
        made.append(RedisStore(connect_calls(settings(url)), url, keys, size))
        return made[-1]

    yield build
    for s in made:
        await s.stop()


async def eventually(check: Callable[[], Any], timeout: float = 5.0) -> None:
    """Wait for a positive sign (``await check()`` true), failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "not within the timeout"
        await asyncio.sleep(0.02)


async def test_get_set_delete_and_value_kinds(make: Make, redis_server: RedisServer) -> None:
    s = make()
    assert await s.get("k") is None
    for value in ("text", "é日本", 42, -7, 2.5, True, False, {"a": [1, 2, {"b": None}]}, [1, "x"], b"\xff\x00"):
        assert await s.set("k", value, 0) == (True, None, False)
        got = await s.get("k")
        assert got == value and type(got) is type(value)
    await s.delete("k")
    assert await s.get("k") is None
    await s.set("k", "v", 0)
    assert await s.set("k", None, 0) == (True, None, False)  # set(key, nil) deletes, as in ngx
    assert await s.get("k") is None and await s.bytes() == 0
    await s.set("here", "v", 0)  # the layout: one hash per entry under the {shared} hash tag
    assert redis_server.client().hgetall("dicomproxy:{shared}:default:here") == {"k": "s", "v": "v"}


async def test_ttl_is_redis_expiry(make: Make, redis_server: RedisServer) -> None:
    s = make()
    await s.set("short", 1, 0.3)
    await s.set("forever", 2, 0)
    ttl_ms = redis_server.client().pttl("dicomproxy:{shared}:default:short")
    assert 0 < ttl_ms <= 300
    assert redis_server.client().pttl("dicomproxy:{shared}:default:forever") == -1
    assert sorted(await s.keys(0)) == ["forever", "short"]

    async def gone() -> bool:
        return await s.get("short") is None

    await eventually(gone)
    assert await s.keys(0) == ["forever"] and await s.get("forever") == 2


async def test_add(make: Make) -> None:
    s = make()
    assert await s.add("lock", "me", 0.3) == (True, None, False)
    assert await s.add("lock", "you", 5) == (False, "exists", False)
    assert await s.get("lock") == "me"

    async def taken() -> bool:  # an expired entry does not count
        return await s.add("lock", "you", 5) == (True, None, False)

    await eventually(taken)
    assert await s.get("lock") == "you"


async def test_incr(make: Make) -> None:
    s = make()
    assert await s.incr("n", 1, None, 0) == (None, "not found")
    assert await s.incr("n", 1, 0, 0) == (1, None)
    assert await s.incr("n", 5, 0, 0) == (6, None)
    assert await s.incr("n", -0.5, 0, 0) == (5.5, None)
    assert await s.incr("n", 0.5, 0, 0) == (6.0, None)
    value, _ = await s.incr("n", 1, 0, 0)
    assert value == 7.0 and isinstance(value, float)  # a float stays a float, as in memory
    await s.set("s", "text", 0)
    assert await s.incr("s", 1, 0, 0) == (None, "not a number")
    assert await s.incr("big", 1, (1 << 62) - 1, 0) == (1 << 62, None)  # exact to 64 bits, not doubles
    assert await s.incr("big", (1 << 62) - 1, 0, 0) == ((1 << 63) - 1, None)
    assert await s.incr("t", 1, 10, 0.3) == (11, None)  # init's ttl

    async def gone() -> bool:
        return await s.get("t") is None

    await eventually(gone)


async def test_counters_are_atomic_across_clients(make: Make) -> None:
    """Two clients (two replicas) incrementing one counter at once: every increment counts."""
    a, b = make(), make()
    await asyncio.gather(*(store.incr("n", 1, 0, 0) for _ in range(300) for store in (a, b)))
    assert await a.get("n") == 600 and await b.get("n") == 600


async def test_full_set_evicts_the_least_recently_used(make: Make) -> None:
    s = make(keys=3)
    for k in ("a", "b", "c"):
        await s.set(k, 1, 0)
    assert await s.get("a") == 1  # a is now the most recently used
    assert await s.set("d", 1, 0) == (True, None, True)  # forcible: a live entry went
    assert sorted(await s.keys(0)) == ["a", "c", "d"]
    assert await s.set("c", 2, 0) == (True, None, False)  # replacing needs no room


async def test_full_set_drops_expired_entries_first(make: Make) -> None:
    s = make(keys=2)
    await s.set("old", 1, 0)
    await s.set("brief", 1, 0.2)

    async def expired() -> bool:
        return await s.get("brief") is None

    await eventually(expired)
    assert await s.set("new", 1, 0) == (True, None, False)
    assert sorted(await s.keys(0)) == ["new", "old"]


async def test_full_add_and_incr_never_evict(make: Make) -> None:
    s = make(keys=2)
    await s.set("a", 1, 0)
    await s.set("b", 1, 0)
    ok, err, forcible = await s.add("c", 1, 0)
    assert (ok, forcible) == (False, False) and err is not None and err.startswith("no memory")
    assert "Lua:SharedDictMaxKeys" in err
    value, err = await s.incr("c", 1, 0, 0)
    assert value is None and err is not None and err.startswith("no memory")
    assert await s.incr("a", 1, 0, 0) == (2, None)  # an existing counter still counts
    assert sorted(await s.keys(0)) == ["a", "b"]


async def test_the_byte_bound(make: Make) -> None:
    size = 2 * (ENTRY_OVERHEAD + 1 + 1000)
    s = make(size=size)
    assert (await s.set("a", "x" * 1000, 0))[0] and (await s.set("b", "x" * 1000, 0))[0]
    assert await s.bytes() == size
    assert await s.set("c", "x" * 1000, 0) == (True, None, True) and await s.get("a") is None
    ok, err, _ = await s.set("huge", "x" * size, 0)
    assert not ok and err is not None and "the value alone" in err
    await s.delete("b")
    await s.delete("c")
    assert await s.bytes() == 0


async def test_keys_limit(make: Make) -> None:
    s = make(keys=1000)
    for i in range(600):  # past one batch of the script's scan (256)
        await s.set(f"k{i}", i, 0)
    assert len(await s.keys(3)) == 3 and len(await s.keys(0)) == 600 and len(await s.keys(300)) == 300


async def test_a_restarted_redis_gets_the_script_again(make: Make, redis_server: RedisServer) -> None:
    s = make()
    assert await s.incr("n", 1, 0, 0) == (1, None)
    redis_server.client().script_flush()  # as after a restart of Redis: EVALSHA answers NOSCRIPT
    assert await s.incr("n", 1, 0, 0) == (2, None)


async def test_redis_down_fails_a_call_within_seconds_naming_the_setting(make: Make) -> None:
    port = free_port()  # nothing listens there
    s = make(url=f"redis://{LOOPBACK}:{port}/0")
    started = time.monotonic()
    with pytest.raises(LuaExportError, match=r"Cluster:Redis") as caught:
        await s.incr("n", 1, 0, 0)
    assert time.monotonic() - started < CALL_TIMEOUT + 1
    assert f"{LOOPBACK}:{port}" in str(caught.value) and "redis-server" in str(caught.value)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers (a Redis hung or behind a dead link)."""
    listener = socket.create_server((LOOPBACK, 0))
    yield listener.getsockname()[1]
    listener.close()


async def test_a_silent_redis_fails_a_call_within_the_call_timeout(make: Make, silent_port: int) -> None:
    s = make(url=f"redis://{LOOPBACK}:{silent_port}/0")
    started = time.monotonic()
    with pytest.raises(LuaExportError, match=r"Cluster:Redis"):
        await s.get("k")
    assert time.monotonic() - started < CALL_TIMEOUT + 1


async def test_redis_killed_under_a_store_fails_calls_then_recovers(make: Make, redis_server: RedisServer) -> None:
    s = make()
    assert await s.incr("n", 1, 0, 0) == (1, None)
    redis_server.kill()
    with pytest.raises(LuaExportError, match=r"Cluster:Redis"):
        await s.incr("n", 1, 0, 0)
    redis_server.start()  # same port, empty (no persistence)
    assert await s.incr("n", 1, 0, 0) == (1, None)


# --------------------------------------------------------------------------- the Lua side
def lua_engine(store: RedisStore, timeout_ms: int = 4000) -> LuaEngine:
    """An engine with SharedDict bound as the ScriptHost binds it over Redis (awaited exports)."""
    shared = AsyncSharedDictExports(store)
    exports = {f"_Shared{n.capitalize()}": Export(getattr(shared, n), is_async=True, label=f"SharedDict:{n}")
               for n in ("get", "set", "add", "incr", "delete", "keys")}
    return LuaEngine("shared", exports=exports, setup=(SHARED_DICT_LUA,), timeout_ms=timeout_ms)


@pytest.fixture
def engine(make: Make) -> Iterator[LuaEngine]:
    e = lua_engine(make())
    yield e
    e.release()


async def test_lua_api_over_awaited_exports(engine: LuaEngine) -> None:
    more = """
      assert(math.type(SharedDict:get("n")) == "integer" and math.type(SharedDict:incr("f", 0.5, 0)) == "float")
      local okp = pcall(SharedDict.incr, "n", 1)                -- inside pcall too (it yields)
      assert(okp and SharedDict:get("n") == 14)
    """
    assert await engine.run(engine.compile(lua_api_walk(more), "script.lua")) == ("f,n,t",)


@pytest.mark.parametrize(("code", "message"), [
    ('SharedDict:set({}, 1)', "a key is a non-empty string"),
    ('SharedDict:set("k", print)', "values are strings, numbers, booleans or tables"),
    ('SharedDict:set("k", 1, -1)', "ttl is a number of seconds"),
    ('SharedDict:add("k", nil)', "add needs a value"),
    ('SharedDict:incr("k", "x")', "delta is a finite number"),
    ('SharedDict:keys(-1)', "keys(max)"),
])
async def test_bad_arguments_are_lua_errors_at_the_callers_line(engine: LuaEngine, code: str, message: str) -> None:
    with pytest.raises(LuaError, match="script.lua:1:") as caught:
        await engine.run(engine.compile(code, "script.lua"))
    assert message in str(caught.value)
    assert "SharedDict:" in str(caught.value) and "_Shared" not in str(caught.value)


async def test_a_call_waiting_on_redis_does_not_hold_the_event_loop(make: Make, silent_port: int) -> None:
    """The exports are awaited: while one engine waits on a silent Redis, the loop runs others."""
    e = lua_engine(make(url=f"redis://{LOOPBACK}:{silent_port}/0"), timeout_ms=10000)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    tick = asyncio.create_task(ticker())
    try:
        with pytest.raises(LuaError, match="Cluster:Redis"):
            await e.run(e.compile("return SharedDict:get('k')", "script.lua"))
    finally:
        tick.cancel()
        e.release()
    assert ticks >= CALL_TIMEOUT / 0.05 / 2, ticks  # the loop ran on through the whole wait


# The runtime closes the export's coroutine that Lua could not yield to (never awaited, by design).
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
async def test_the_limit_of_an_awaited_call_is_lua_s_own(engine: LuaEngine) -> None:
    """Awaited, so not from a function C calls back (documented); a metamethod is fine."""
    assert await engine.run(engine.compile(
        'SharedDict:set("m", 5) local t = setmetatable({}, {__index = function(_, k) return SharedDict:get(k) end}) '
        "return t.m", "script.lua")) == (5,)
    with pytest.raises(LuaError, match="attempt to yield across a C-call boundary"):
        await engine.run(engine.compile('return (("ab"):gsub(".", function(c) return SharedDict:get(c) or c end))',
                                        "script.lua"))
