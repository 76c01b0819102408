"""The objects ``onHttpRequest`` and ``onHttpResponse`` receive (the seed's ILuaHttpRequest /
ILuaHttpResponse).

Scripts call methods with ``:`` (NLua style) or ``.``; lupa passes the object itself as the first
argument of a ``:`` call and drops it for bound methods, so both spellings reach the same code.
``Headers`` is a read-only, case-insensitive Lua table (``pairs()`` iterates it); changes go
through ``AddHeader``/``RemoveHeader`` so that they can be validated: a name or value with CR,
LF or NUL is refused, since it would let a script split the HTTP message.
"""

from __future__ import annotations

import re
from typing import Any

from middleware.runtime import LuaEngine, LuaError, LuaExportError, lupa

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def check_header(name: Any, value: Any = "") -> tuple[str, str]:
    """Validate a header a script wants to set; raise a Lua-facing error naming the problem."""
    if not isinstance(name, str) or not _TOKEN.match(name):
        raise LuaExportError(f"invalid header name {name!r}: use letters, digits and -")
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise LuaExportError(f"header {name}: value must be a string, got {type(value).__name__}")
    if "\r" in value or "\n" in value or "\0" in value:
        raise LuaExportError(f"header {name}: value contains CR, LF or NUL; refused")
    return name, value


def decode_value(raw: bytes) -> str:
    """Header bytes as scripts see them: UTF-8 when valid (what a Lua string holds), else latin-1."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def encode_value(value: str) -> bytes:
    """The inverse for what goes on the wire: a script's string is UTF-8 bytes."""
    return value.encode("utf-8", "surrogateescape")


def decode_headers(raw: Any) -> HeaderList:
    return HeaderList([(k.decode("latin-1"), decode_value(v)) for k, v in raw])


def encode_headers(headers: HeaderList) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), encode_value(v)) for k, v in headers.items]


class HeaderList:
    """Ordered header pairs with case-insensitive editing; keeps duplicates."""

    __slots__ = ("items",)

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self.items = items

    def set(self, name: str, value: str) -> None:
        self.remove(name)
        self.items.append((name, value))

    def remove(self, name: str) -> None:
        low = name.lower()
        self.items = [(k, v) for k, v in self.items if k.lower() != low]

    def get(self, name: str) -> str | None:
        low = name.lower()
        for k, v in self.items:
            if k.lower() == low:
                return v
        return None

    def as_lua(self, engine: LuaEngine) -> Any:
        merged: dict[str, str] = {}
        for k, v in self.items:
            low = k.lower()
            merged[low] = f"{merged[low]}, {v}" if low in merged else v
        return engine.ci_table(engine.to_lua(merged))


class HttpExchange:
    """One request/response pair as the hooks see it; shared by all engines of the request."""

    def __init__(self, scope: dict[str, Any]) -> None:
        self.scope = scope
        self.scheme: str = scope.get("scheme", "http")
        self.method: str = scope["method"]
        self.path: str = scope.get("path", "/")
        self.query: str = scope.get("query_string", b"").decode("latin-1")
        self.request_headers = decode_headers(scope.get("headers", []))
        self.request_headers_changed = False
        self.response_headers = HeaderList([])  # what a script adds to the response
        self.response_removed: list[str] = []
        self.status = 200
        self.body: list[bytes] | None = None  # what ResponseWrite wrote, if anything
        client = scope.get("client")
        self.remote_ip: str = client[0] if client else ""
        self.user: str = scope.get("user") or ""

    def write(self, data: str | bytes) -> None:
        """Append what a hook wrote (the Lua side has already checked it is a string)."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        if self.body is None:
            self.body = []
        self.body.append(data)


def _apply(x: HttpExchange, response_headers: HeaderList | None, result: tuple[Any, ...]) -> None:
    """Apply what a hook did (status, written body, header edits) to the exchange."""
    x.status = int(result[0])
    if result[1] is not None:
        x.write(bytes.fromhex(result[1]) if result[2] == "x" else result[1])
    ops = result[3:]
    for i in range(0, len(ops), 3):
        op, name, value = ops[i], ops[i + 1], ops[i + 2]
        if op == "q+":
            x.request_headers.set(name, value)
            x.request_headers_changed = True
        elif op == "q-":
            x.request_headers.remove(name)
            x.request_headers_changed = True
        elif response_headers is not None:  # a response hook edits the response itself
            if op == "r+":
                response_headers.set(name, value)
            else:
                response_headers.remove(name)
        elif op == "r+":
            x.response_headers.set(name, value)
        else:
            x.response_headers.remove(name)
            x.response_removed.append(name.lower())


async def call_request_hook(engine: LuaEngine, callback: str, x: HttpExchange) -> bool:
    """Run ``onHttpRequest`` in ``engine``; returns True when the script intercepts."""
    obj, result = engine.http_object(
        "request", x.scheme, x.method, x.path, x.query, x.remote_ip, x.user, x.status,
        *[part for pair in x.request_headers.items for part in pair],
    )
    ret = await engine.call(callback, obj)
    _apply(x, None, _result(engine, result))
    return bool(ret) and ret[0] is True


async def call_response_hook(engine: LuaEngine, callback: str, x: HttpExchange, headers: HeaderList) -> None:
    """Run ``onHttpResponse`` in ``engine``; status, headers and body edits land in ``x``/``headers``."""
    obj, result = engine.http_object(
        "response", x.scheme, x.method, x.path, x.query, x.remote_ip, x.user, x.status,
        *[part for pair in headers.items for part in pair],
    )
    await engine.call(callback, obj)
    _apply(x, headers, _result(engine, result))


def _result(engine: LuaEngine, result: Any) -> tuple[Any, ...]:
    try:
        out = result()
    except lupa.LuaError as e:
        raise LuaError(f"{engine.script}: {e}".partition("\n")[0], str(e)) from None
    return out if isinstance(out, tuple) else (out,)
