"""The ``SharedDict`` backend for replicas (``Cluster:Redis``): one Redis shared by every replica
and every worker of each.

Each ``SharedDict`` call is one ``EVALSHA`` of :data:`SCRIPT` (redis-py's ``register_script``:
``SCRIPT LOAD`` again after a Redis restart), so it is atomic across replicas as the other
backends are across engines and workers: Redis runs a script with nothing in between. Same API,
value kinds, bounds and answers as :class:`~dicomproxy.scripting.shared.MemoryStore`, including
least-recently-*used* eviction by a full ``set`` (``get`` moves an entry, here one ``ZADD``).

Layout, every key under one hash tag (``{shared}``: one slot, so a Redis Cluster serves it too):
``dicomproxy:{shared}:<dict>:<key>`` a hash ``k`` (kind: ``s`` text, ``y`` bytes, ``i`` integer,
``f`` float, ``b`` boolean, ``j`` JSON of a table) and ``v`` (the value), with Redis's own expiry
(``PEXPIRE``) for a TTL; ``dicomproxy:{shared}:<dict>#lru`` (a sorted set: key by last use),
``#size`` (counted bytes per key), ``#bytes`` (their sum), ``#seq``. An entry Redis expired stays
counted until a write needs room (then every expired one is dropped first, as in memory).
Numbers cross as decimal text and are added by ``HINCRBY`` / ``HINCRBYFLOAT``, never by the
script's Lua 5.1 doubles, so integers stay exact to 64 bits.

Unlike the LMDB file the store is not emptied when a gateway starts: it is the replicas', and one
replica restarting must not wipe what the others hold. The bounds (``Lua:SharedDictMaxKeys``,
``Lua:SharedDictMaxMB``) are each caller's: give the replicas the same.

The calls are awaited exports (the engine yields while Redis answers: the event loop never
waits on the network), as ``HttpGet`` is; the one thing a script loses against the synchronous
stores: a call from a function a C function calls back (a ``table.sort`` comparator, a
``string.gsub`` replacement) is Lua's "attempt to yield across a C-call boundary". A Redis
that is down fails a call within :data:`CALL_TIMEOUT` seconds with a Lua error naming
``Cluster:Redis``; a script that must carry on wraps it in ``pcall``.

Cost of one ``incr`` from Lua, measured in one engine against a loopback redis-server
(``bench/shared_dict_bench.py``: 7 rounds of 5000 calls, median, one run on this shared 2-core
machine at load 5): Redis 226 us of this process's CPU (433 us wall: the round trip and Redis's
own work), against 3.9 us in memory and 11.8 us in LMDB, a bare redis-py ``INCR`` awaited from
Python 98 us and an awaited export that does nothing 17 us. So about 60x memory and 2.3x the
client's floor: the rest is redis-py packing the script's arguments and the engine's yield. Why
this is acceptable: a replica pays it only on the calls a script makes (a counter per request is
~0.2 ms of CPU), the loop serves others meanwhile, and nothing cheaper shares state between hosts;
a script that reads a value often can keep it in a local with a TTL of its own.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio
from dicomproxy_middleware import LuaExportError
from redis.exceptions import RedisError

from dicomproxy.cluster.redis import CALL_CONNECTIONS, PREFIX, where
from dicomproxy.scripting.shared import (
    ENTRY_OVERHEAD,
    NO_MEMORY,
    NOT_A_NUMBER,
    NOT_FOUND,
    ByteCodec,
    Value,
)

CALL_TIMEOUT = 3.0  # seconds for one call, retries included (the client's own: 1 s per socket operation)
MAX_TTL_MS = 1 << 44  # ~557 years: PEXPIRE refuses a time past its range; longer is "never" anyway

# One script for every operation: the helpers are shared and one SHA is loaded.
SCRIPT = """
local base, dk, op, member = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local lru, sizes, total, seq = base .. "#lru", base .. "#size", base .. "#bytes", base .. "#seq"
local prefix = base .. ":"

local function touch(m) redis.call("ZADD", lru, redis.call("INCR", seq), m) end

local function drop(m)
  local size = redis.call("HGET", sizes, m)
  if size then
    redis.call("HDEL", sizes, m)
    redis.call("DECRBY", total, size)
  end
  redis.call("ZREM", lru, m)
  redis.call("DEL", prefix .. m)
end

local function fits(m, size, max_keys, max_bytes)
  local old = redis.call("HGET", sizes, m)
  local count = redis.call("ZCARD", lru)
  if not old then count = count + 1 end
  local bytes = tonumber(redis.call("GET", total) or "0") + size - (old and tonumber(old) or 0)
  return count <= max_keys and bytes <= max_bytes
end

local function purge_expired()
  for _, m in ipairs(redis.call("ZRANGE", lru, 0, -1)) do
    if redis.call("EXISTS", prefix .. m) == 0 then drop(m) end
  end
end

-- (room made, live entries evicted)
local function make_room(m, size, evict, max_keys, max_bytes)
  if fits(m, size, max_keys, max_bytes) then return true, 0 end
  purge_expired()
  if fits(m, size, max_keys, max_bytes) then return true, 0 end
  if not evict then return false, 0 end
  local forcible = 0
  while not fits(m, size, max_keys, max_bytes) do
    local oldest = redis.call("ZRANGE", lru, 0, 1)
    local victim = oldest[1]
    if victim == m then victim = oldest[2] end
    if not victim then return false, forcible end
    drop(victim)
    forcible = 1
  end
  return true, forcible
end

-- ARGV from 3: kind, value, counted size, ttl (ms, 0: never), max keys, max bytes
local function store(evict, at)
  local kind, value, size, ttl = ARGV[at], ARGV[at + 1], tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
  local ok, forcible = make_room(member, size, evict, tonumber(ARGV[at + 4]), tonumber(ARGV[at + 5]))
  if not ok then return {0, "full", forcible} end
  local old = redis.call("HGET", sizes, member)
  redis.call("DEL", dk)
  redis.call("HSET", dk, "k", kind, "v", value)
  if ttl > 0 then redis.call("PEXPIRE", dk, ttl) end
  redis.call("HSET", sizes, member, size)
  redis.call("INCRBY", total, size - (old and tonumber(old) or 0))
  touch(member)
  return {1, "", forcible}
end

if op == "get" then
  local got = redis.call("HMGET", dk, "k", "v")
  if not got[1] then return false end
  touch(member)
  return got
elseif op == "set" then
  return store(true, 3)
elseif op == "add" then
  if redis.call("EXISTS", dk) == 1 then return {0, "exists", 0} end
  return store(false, 3)
elseif op == "incr" then
  -- ARGV[3]: delta, ARGV[4]: its kind (i or f), then store's arguments for init + delta ("" kind: no init)
  if redis.call("EXISTS", dk) == 0 then
    if ARGV[5] == "" then return {0, "not found"} end
    local r = store(false, 5)
    if r[1] == 0 then return {0, r[2]} end
    return {1, ARGV[5], ARGV[6]}
  end
  local kind = redis.call("HGET", dk, "k")
  if kind ~= "i" and kind ~= "f" then return {0, "not a number"} end
  touch(member)
  if kind == "i" and ARGV[4] == "i" then
    local r = redis.pcall("HINCRBY", dk, "v", ARGV[3])
    if type(r) ~= "table" then return {1, "i", redis.call("HGET", dk, "v")} end
  end  -- a float, or an integer past 64 bits: a float from here on
  redis.call("HINCRBYFLOAT", dk, "v", ARGV[3])
  redis.call("HSET", dk, "k", "f")
  return {1, "f", redis.call("HGET", dk, "v")}
elseif op == "delete" then
  drop(member)
  return 1
elseif op == "keys" then
  local limit, out, start = tonumber(ARGV[3]), {}, 0
  while true do
    local batch = redis.call("ZRANGE", lru, start, start + 255)
    if #batch == 0 then return out end
    for _, m in ipairs(batch) do
      if redis.call("EXISTS", prefix .. m) == 1 then
        out[#out + 1] = m
        if limit > 0 and #out >= limit then return out end
      end
    end
    start = start + 256
  end
elseif op == "bytes" then
  return redis.call("GET", total) or "0"
end
return redis.error_reply("SharedDict: unknown operation " .. tostring(op))
"""


# Numbers as decimal text (HINCRBY and HINCRBYFLOAT add them in Redis), booleans "1" / "0".
_VALUES = ByteCodec(b"1", b"0", lambda n: str(n).encode(), int, lambda x: repr(x).encode(), float)


def _ttl_ms(ttl: float) -> int:
    """Redis's expiry in milliseconds (0: never); a positive TTL is at least 1 ms."""
    if ttl <= 0:
        return 0
    return min(MAX_TTL_MS, max(1, round(ttl * 1000)))


class RedisStore:
    """``SharedDict`` over ``Cluster:Redis``: the async counterpart of ``SharedStore`` (every
    method is awaited; same arguments, same answers)."""

    def __init__(self, client: redis.asyncio.Redis, url: str, max_keys: int, max_bytes: int, *,
                 name: str = "default", setting: str = "Lua:SharedDictMaxKeys / Lua:SharedDictMaxMB") -> None:
        """``client``: from :func:`dicomproxy.cluster.redis.connect_calls` (bytes replies, short
        timeouts); ``url``: ``Cluster:Redis``, for errors (only its host and port are shown)."""
        self.client = client
        self.url = url
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self.setting = setting
        self.base = f"{PREFIX}{{shared}}:{name}"
        self._script = client.register_script(SCRIPT)
        # More calls at once wait here for a connection, within CALL_TIMEOUT: redis-py's blocking
        # pool would do the same but costs ~30-80 us a call more (measured), an uncontended
        # semaphore ~1 us.
        self._slots = asyncio.Semaphore(CALL_CONNECTIONS)

    async def _call(self, op: str, key: str, *args: Any) -> Any:
        data_key = f"{self.base}:{key}".encode("utf-8", "surrogatepass")
        argv = [op.encode(), key.encode("utf-8", "surrogatepass"), *args]
        try:
            async with asyncio.timeout(CALL_TIMEOUT), self._slots:
                return await self._script(keys=[self.base.encode(), data_key], args=argv)
        except TimeoutError:
            raise LuaExportError(self._down(f"no answer within {CALL_TIMEOUT:g} s")) from None
        except (RedisError, OSError) as e:
            raise LuaExportError(self._down(f"{type(e).__name__}: {e}")) from None

    def _down(self, what: str) -> str:
        return (f"Redis at {where(self.url)} (Cluster:Redis) is unavailable: {what}; check that redis-server "
                "runs there and Cluster:Redis / Cluster:RedisPassword are right")

    def _store_args(self, key: str, value: Any, ttl: float) -> tuple[list[Any], str | None]:
        """The script's arguments for storing ``value``, or the error when it can never fit."""
        kind, payload, value_size = _VALUES.pack(value)
        size = len(key.encode("utf-8", "surrogatepass")) + value_size + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return [], f"{NO_MEMORY} (the value alone is over {self.setting})"
        return [kind, payload, size, _ttl_ms(ttl), self.max_keys, self.max_bytes], None

    def _stored(self, reply: list[Any]) -> tuple[bool, str | None, bool]:
        ok, err, forcible = int(reply[0]), reply[1], bool(int(reply[2]))
        if ok:
            return True, None, forcible
        if err == b"full":
            return False, f"{NO_MEMORY} (SharedDict is full: {self.setting})", forcible
        return False, err.decode(), forcible

    # ------------------------------------------------------------------ the SharedStore calls, awaited
    async def get(self, key: str) -> Value | None:
        reply = await self._call("get", key)
        if reply is None:
            return None
        value: Value | None = _VALUES.unpack(reply[0], reply[1])  # type: ignore[assignment]
        return value

    async def set(self, key: str, value: Value | None, ttl: float) -> tuple[bool, str | None, bool]:
        if value is None:
            await self.delete(key)
            return True, None, False
        args, err = self._store_args(key, value, ttl)
        if err is not None:
            return False, err, False
        return self._stored(await self._call("set", key, *args))

    async def add(self, key: str, value: Value, ttl: float) -> tuple[bool, str | None, bool]:
        args, err = self._store_args(key, value, ttl)
        if err is not None:
            # As in memory: an existing key answers "exists" before any question of room.
            if await self.get(key) is not None:
                return False, "exists", False
            return False, err, False
        return self._stored(await self._call("add", key, *args))

    async def incr(self, key: str, delta: int | float, init: int | float | None,
                   ttl: float) -> tuple[Any, str | None]:
        delta_kind, delta_text, _ = _VALUES.pack(delta)
        store: list[Any] = [b"", b"", 0, 0, self.max_keys, self.max_bytes]
        if init is not None:
            args, err = self._store_args(key, init + delta, ttl)
            if err is not None:
                return None, err
            store = args
        reply = await self._call("incr", key, delta_text, delta_kind, *store)
        if not int(reply[0]):
            err = reply[1].decode()
            if err == "full":
                return None, f"{NO_MEMORY} (SharedDict is full: {self.setting})"
            return None, {"not found": NOT_FOUND, "not a number": NOT_A_NUMBER}.get(err, err)
        return _VALUES.unpack(reply[1], reply[2]), None

    async def delete(self, key: str) -> None:
        await self._call("delete", key)

    async def keys(self, limit: int) -> list[str]:
        reply = await self._call("keys", "", limit)
        return [k.decode("utf-8", "surrogatepass") for k in reply]

    async def bytes(self) -> int:
        """Bytes counted against ``max_bytes`` (keys, values, :data:`ENTRY_OVERHEAD` each)."""
        return int(await self._call("bytes", ""))

    # ------------------------------------------------------------------ Component
    async def start(self) -> None:
        """Nothing to do: the client connects on the first call (a Redis down at start fails
        calls, not the start)."""

    async def stop(self) -> None:
        await self.client.aclose()
