"""``SharedDict``: data passed between Lua instances (the seed: "Data can be passed between Lua
instances"), modelled on OpenResty's ``ngx.shared.DICT``.

Every engine type (singleton, transient, background) sees the same store through the
``SharedDict`` global: ``get``, ``set``, ``add``, ``incr``, ``delete``, ``keys`` (see the README's
"SharedDict"). In memory or LMDB each call is one synchronous export, so it is atomic: all Lua
runs on the event loop's thread, and such a call never awaits.

The store is behind :class:`SharedStore`, a small synchronous protocol. :class:`MemoryStore`:
one process, in memory; ``shared_lmdb.LmdbStore``: several workers on one host. Replicas share
``shared_redis.RedisStore`` (``Cluster:Redis``), an :class:`AsyncSharedStore` (the same calls,
awaited) bound as awaited exports by :class:`AsyncSharedDictExports`: the Lua API stays the
same (scripts cannot tell an awaited export from another), and each call is atomic in Redis.

Values are strings, numbers, booleans or JSON-able tables (stored as JSON text, so a table is a
copy, never shared between engines). Bounds (``Lua:SharedDictMaxKeys``, ``Lua:SharedDictMaxMB``,
a key of at most :data:`MAX_KEY_BYTES`, a value of at most :data:`MAX_VALUE_BYTES`), and when the
store is full: ``set`` evicts the least recently used entries (expired ones first) and says so
(its third result, ``forcible``, as in ngx); ``add`` and ``incr`` never evict: they answer
``nil, "no memory"``. A counter or a lock then fails visibly instead of pushing out someone else's
data; a cache write makes room, as a cache should.
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from dicomproxy_middleware import LuaExportError

MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 1 << 20
ENTRY_OVERHEAD = 64  # bytes counted per entry besides its key and value (Python's own is ~200)
NO_MEMORY = "no memory"
EXISTS = "exists"
NOT_FOUND = "not found"
NOT_A_NUMBER = "not a number"

Value = str | int | float | bool | dict[str, Any] | list[Any]


class SharedStore(Protocol):
    """What ``SharedDict`` needs of a backend. ``ttl``: seconds, 0 = no expiry. Each method is
    atomic. Errors a script should handle come back as a string (ngx's ``err``); wrong arguments
    raise :class:`LuaExportError`."""

    def get(self, key: str) -> Value | None: ...

    def set(self, key: str, value: Value | None, ttl: float) -> tuple[bool, str | None, bool]: ...

    def add(self, key: str, value: Value, ttl: float) -> tuple[bool, str | None, bool]: ...

    def incr(self, key: str, delta: int | float, init: int | float | None, ttl: float) -> tuple[Any, str | None]: ...

    def delete(self, key: str) -> None: ...

    def keys(self, limit: int) -> list[str]: ...


@dataclass(slots=True)
class _Entry:
    kind: str  # "s" string (str, or bytes when not UTF-8), "n" number, "b" boolean, "j" JSON text of a table
    data: Any
    expires: float  # monotonic; math.inf: never
    size: int


def _encode(value: Any) -> tuple[str, Any, int]:
    """(kind, stored data, bytes counted) of a value a script passes."""
    if isinstance(value, bool):
        return "b", value, 1
    if isinstance(value, int | float):
        return "n", value, 8
    if isinstance(value, str):
        return "s", value, len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bytes):  # (a Lua string that is not UTF-8: given back as the same bytes)
        return "s", value, len(value)
    if isinstance(value, dict | list):
        try:
            text = json.dumps(value, separators=(",", ":"), allow_nan=False)
        except TypeError:
            raise LuaExportError("values are strings, numbers, booleans or tables of those (a table holds a "
                                 "function or userdata)") from None
        except ValueError as e:  # a cycle, NaN or infinity
            raise LuaExportError(f"a table value must be JSON-able: {e}") from None
        return "j", text, len(text)
    raise LuaExportError(f"values are strings, numbers, booleans or tables, not {type(value).__name__}")


def _decode(entry: _Entry) -> Value:
    if entry.kind == "j":
        value: Value = json.loads(entry.data)
        return value
    data: Value = entry.data
    return data


INT64 = 1 << 63  # a number in -INT64 .. INT64-1 is kept as an integer by the byte stores, else as a float


@dataclass(frozen=True, slots=True)
class ByteCodec:
    """Values as (record kind, payload bytes) for the stores that keep bytes (LMDB, Redis).

    Kinds: ``s`` text, ``y`` bytes (a Lua string that is not UTF-8), ``i`` 64-bit integer, ``f``
    float, ``b`` boolean, ``j`` JSON text of a table. The stores differ only in how a number or a
    boolean is written (LMDB packs them with ``struct``; Redis needs decimal text, which its
    ``HINCRBY`` adds), so that is all an instance says; one implementation serves both."""

    true: bytes
    false: bytes
    pack_int: Callable[[int], bytes]
    unpack_int: Callable[[bytes], int]
    pack_float: Callable[[float], bytes]
    unpack_float: Callable[[bytes], float]

    def pack(self, value: Any) -> tuple[bytes, bytes, int]:
        """(kind, payload, counted bytes) of a value a script passes (checked by :func:`_encode`);
        a value over :data:`MAX_VALUE_BYTES` raises."""
        kind, data, size = _encode(value)
        if size > MAX_VALUE_BYTES:
            raise LuaExportError(f"a value is at most {MAX_VALUE_BYTES} bytes (this one: {size})")
        if kind == "b":
            return b"b", self.true if data else self.false, size
        if kind == "n":
            if isinstance(data, int) and -INT64 <= data < INT64:
                return b"i", self.pack_int(data), size
            return b"f", self.pack_float(float(data)), size
        if kind == "s":
            if isinstance(data, bytes):
                return b"y", data, size
            return b"s", data.encode("utf-8", "surrogatepass"), size
        return b"j", data.encode("utf-8"), size

    def unpack(self, kind: bytes, payload: bytes) -> Value | bytes:
        """The value :meth:`pack` gave ``kind`` and ``payload`` for."""
        if kind == b"s":
            return payload.decode("utf-8", "surrogatepass")
        if kind == b"i":
            return self.unpack_int(payload)
        if kind == b"f":
            return self.unpack_float(payload)
        if kind == b"b":
            return payload == self.true
        if kind == b"j":
            table: Value = json.loads(payload)
            return table
        return bytes(payload)


def _check_key(key: Any) -> str:
    if isinstance(key, bytes):
        key = key.decode("utf-8", "surrogateescape")
    if isinstance(key, int | float) and not isinstance(key, bool):
        key = str(key)
    if not isinstance(key, str) or not key:
        raise LuaExportError("a key is a non-empty string")
    if len(key) > MAX_KEY_BYTES // 4 and len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise LuaExportError(f"a key is at most {MAX_KEY_BYTES} bytes")
    return key


def _check_ttl(ttl: Any) -> float:
    if ttl is None:
        return 0.0
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl < 0 or math.isnan(ttl):
        raise LuaExportError("ttl is a number of seconds >= 0 (0: no expiry)")
    return float(ttl)


class MemoryStore:
    """The in-process backend: an LRU-ordered dict with expiry and two bounds.

    ``max_keys`` entries and ``max_bytes`` counted bytes (key + value + :data:`ENTRY_OVERHEAD`
    each). Expired entries are dropped when read and, when room is needed, before any live one.
    """

    def __init__(self, max_keys: int, max_bytes: int, *, clock: Callable[[], float] = time.monotonic,
                 setting: str = "Lua:SharedDictMaxKeys / Lua:SharedDictMaxMB") -> None:
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self.setting = setting
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.bytes = 0

    # ------------------------------------------------------------------ internals
    def _live(self, key: str) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.size

    def _fits(self, size: int, replacing: _Entry | None) -> bool:
        count = len(self._entries) + (replacing is None)
        total = self.bytes + size - (replacing.size if replacing is not None else 0)
        return count <= self.max_keys and total <= self.max_bytes

    def _purge_expired(self) -> None:
        now = self._clock()
        for key in [k for k, e in self._entries.items() if e.expires <= now]:
            self._drop(key)

    def _make_room(self, key: str, size: int, evict: bool) -> tuple[bool, bool]:
        """(room made, live entries evicted) for ``size`` bytes under ``key``."""
        if self._fits(size, self._entries.get(key)):
            return True, False
        self._purge_expired()
        if self._fits(size, self._entries.get(key)):
            return True, False
        if not evict:
            return False, False
        forcible = False
        while not self._fits(size, self._entries.get(key)):
            oldest = next((k for k in self._entries if k != key), None)
            if oldest is None:
                return False, forcible
            self._drop(oldest)
            forcible = True
        return True, forcible

    def _store(self, key: str, value: Any, ttl: float, evict: bool) -> tuple[bool, str | None, bool]:
        kind, data, value_size = _encode(value)
        if value_size > MAX_VALUE_BYTES:
            raise LuaExportError(f"a value is at most {MAX_VALUE_BYTES} bytes (this one: {value_size})")
        size = len(key.encode("utf-8", "surrogatepass")) + value_size + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return False, f"{NO_MEMORY} (the value alone is over {self.setting})", False
        ok, forcible = self._make_room(key, size, evict)
        if not ok:
            return False, f"{NO_MEMORY} (SharedDict is full: {self.setting})", forcible
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size
        self._entries[key] = _Entry(kind, data, self._clock() + ttl if ttl > 0 else math.inf, size)
        self.bytes += size
        return True, None, forcible

    # ------------------------------------------------------------------ SharedStore
    def get(self, key: str) -> Value | None:
        entry = self._live(key)
        return None if entry is None else _decode(entry)

    def set(self, key: str, value: Value | None, ttl: float) -> tuple[bool, str | None, bool]:
        if value is None:
            self.delete(key)
            return True, None, False
        return self._store(key, value, ttl, evict=True)

    def add(self, key: str, value: Value, ttl: float) -> tuple[bool, str | None, bool]:
        if self._live(key) is not None:
            return False, EXISTS, False
        return self._store(key, value, ttl, evict=False)

    def incr(self, key: str, delta: int | float, init: int | float | None, ttl: float) -> tuple[Any, str | None]:
        entry = self._live(key)
        if entry is None:
            if init is None:
                return None, NOT_FOUND
            value = init + delta
            ok, err, _ = self._store(key, value, ttl, evict=False)
            return (value, None) if ok else (None, err)
        if entry.kind != "n":
            return None, NOT_A_NUMBER
        entry.data = entry.data + delta  # same size: a number counts 8 bytes
        return entry.data, None

    def delete(self, key: str) -> None:
        if key in self._entries:
            self._drop(key)

    def keys(self, limit: int) -> list[str]:
        now = self._clock()
        out = []
        for key, entry in self._entries.items():
            if entry.expires > now:
                out.append(key)
                if limit and len(out) >= limit:
                    break
        return out


def _number(value: Any, what: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float) or (isinstance(value, float) and
                                                                         not math.isfinite(value)):
        raise LuaExportError(f"{what} is a finite number")
    return value


def _check_limit(limit: Any) -> int:
    if limit is None:
        return 1024
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise LuaExportError("keys(max): max is a whole number >= 0 (0: every key)")
    return limit


def _check_add(value: Any) -> Any:
    if value is None:
        raise LuaExportError("add needs a value (nil: use delete)")
    return value


def _check_incr(delta: Any, init: Any) -> tuple[int | float, int | float | None]:
    return _number(1 if delta is None else delta, "delta"), None if init is None else _number(init, "init")


class SharedDictExports:
    """The private exports behind the Lua ``SharedDict`` table (:data:`SHARED_DICT_LUA`)."""

    def __init__(self, store: SharedStore) -> None:
        self.store = store

    def get(self, key: Any = None) -> Any:
        return self.store.get(_check_key(key))

    def set(self, key: Any = None, value: Any = None, ttl: Any = None) -> tuple[Any, ...]:
        return self.store.set(_check_key(key), value, _check_ttl(ttl))

    def add(self, key: Any = None, value: Any = None, ttl: Any = None) -> tuple[Any, ...]:
        return self.store.add(_check_key(key), _check_add(value), _check_ttl(ttl))

    def incr(self, key: Any = None, delta: Any = 1, init: Any = None, ttl: Any = None) -> tuple[Any, ...]:
        delta, init = _check_incr(delta, init)
        return self.store.incr(_check_key(key), delta, init, _check_ttl(ttl))

    def delete(self, key: Any = None) -> None:
        self.store.delete(_check_key(key))

    def keys(self, limit: Any = None) -> list[str]:
        return self.store.keys(_check_limit(limit))


class AsyncSharedStore(Protocol):
    """:class:`SharedStore` for a backend over the network (Redis): the same calls, awaited."""

    async def get(self, key: str) -> Value | None: ...

    async def set(self, key: str, value: Value | None, ttl: float) -> tuple[bool, str | None, bool]: ...

    async def add(self, key: str, value: Value, ttl: float) -> tuple[bool, str | None, bool]: ...

    async def incr(self, key: str, delta: int | float, init: int | float | None,
                   ttl: float) -> tuple[Any, str | None]: ...

    async def delete(self, key: str) -> None: ...

    async def keys(self, limit: int) -> list[str]: ...


class AsyncSharedDictExports:
    """:class:`SharedDictExports` over an :class:`AsyncSharedStore`, bound as awaited exports:
    the engine yields while the store answers (the Lua API is the same)."""

    def __init__(self, store: AsyncSharedStore) -> None:
        self.store = store

    async def get(self, key: Any = None) -> Any:
        return await self.store.get(_check_key(key))

    async def set(self, key: Any = None, value: Any = None, ttl: Any = None) -> tuple[Any, ...]:
        return await self.store.set(_check_key(key), value, _check_ttl(ttl))

    async def add(self, key: Any = None, value: Any = None, ttl: Any = None) -> tuple[Any, ...]:
        return await self.store.add(_check_key(key), _check_add(value), _check_ttl(ttl))

    async def incr(self, key: Any = None, delta: Any = 1, init: Any = None, ttl: Any = None) -> tuple[Any, ...]:
        delta, init = _check_incr(delta, init)
        return await self.store.incr(_check_key(key), delta, init, _check_ttl(ttl))

    async def delete(self, key: Any = None) -> None:
        await self.store.delete(_check_key(key))

    async def keys(self, limit: Any = None) -> list[str]:
        return await self.store.keys(_check_limit(limit))


# The Lua side: a table of methods over the private exports (``SharedDict:get(k)``; a call with
# a dot, ``SharedDict.get(k)``, works too). Run in every engine after the exports are bound.
SHARED_DICT_LUA = """
local get, set, add, incr, delete, keys = PRIVATE._SharedGet, PRIVATE._SharedSet, PRIVATE._SharedAdd,
  PRIVATE._SharedIncr, PRIVATE._SharedDelete, PRIVATE._SharedKeys
local D = {}
local function method(f)
  return function(self, ...)
    if self == D then return f(...) end
    return f(self, ...)
  end
end
D.get, D.set, D.add, D.incr, D.delete, D.keys = method(get), method(set), method(add), method(incr),
  method(delete), method(keys)
G.SharedDict = D
"""
