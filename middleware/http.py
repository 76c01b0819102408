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

from middleware.runtime import LuaEngine, LuaExportError

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "transfer-encoding", "upgrade"}
)


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
        self.request_headers = HeaderList(
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", [])]
        )
        self.request_headers_changed = False
        self.response_headers = HeaderList([])  # what a script adds to the response
        self.response_removed: list[str] = []
        self.status = 200
        self.body: list[bytes] | None = None  # what ResponseWrite wrote, if anything
        client = scope.get("client")
        self.remote_ip: str = client[0] if client else ""
        self.user: str = scope.get("user") or ""

    def write(self, data: Any) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        elif isinstance(data, int | float) and not isinstance(data, bool):
            data = str(data).encode()
        elif not isinstance(data, bytes):
            raise LuaExportError(f"ResponseWrite expects a string, got {type(data).__name__}")
        if self.body is None:
            self.body = []
        self.body.append(data)


class _Base:
    def __init__(self, exchange: HttpExchange, engine: LuaEngine) -> None:
        self._x = exchange
        self._engine = engine
        self._headers: Any = None

    @property
    def Scheme(self) -> str:  # noqa: N802 - the seed's member names
        return self._x.scheme

    @property
    def Method(self) -> str:  # noqa: N802
        return self._x.method

    @property
    def Path(self) -> str:  # noqa: N802
        return self._x.path

    @property
    def QueryString(self) -> str:  # noqa: N802
        return self._x.query

    @property
    def RemoteIp(self) -> str:  # noqa: N802
        return self._x.remote_ip

    @property
    def User(self) -> str:  # noqa: N802
        return self._x.user

    @property
    def StatusCode(self) -> int:  # noqa: N802
        return self._x.status

    @StatusCode.setter
    def StatusCode(self, value: Any) -> None:  # noqa: N802
        self.SetStatusCode(value)

    def SetStatusCode(self, value: Any) -> None:  # noqa: N802
        try:
            code = int(value)
        except (TypeError, ValueError):
            raise LuaExportError(f"status code must be a number, got {value!r}") from None
        if not 100 <= code <= 599:
            raise LuaExportError(f"status code must be 100..599, got {code}")
        self._x.status = code

    def ResponseWrite(self, data: Any) -> None:  # noqa: N802
        self._x.write(data)


class LuaHttpRequest(_Base):
    """``onHttpRequest``'s argument: read the request, edit what goes upstream, or answer."""

    @property
    def Headers(self) -> Any:  # noqa: N802
        if self._headers is None:
            self._headers = self._x.request_headers.as_lua(self._engine)
        return self._headers

    def AddHeader(self, key: Any, value: Any) -> None:  # noqa: N802
        name, val = check_header(key, value)
        self._x.request_headers.set(name, val)
        self._x.request_headers_changed = True
        self._headers = None

    def RemoveHeader(self, key: Any) -> None:  # noqa: N802
        name, _ = check_header(key)
        self._x.request_headers.remove(name)
        self._x.request_headers_changed = True
        self._headers = None

    def AddResponseHeader(self, key: Any, value: Any) -> None:  # noqa: N802
        name, val = check_header(key, value)
        self._x.response_headers.set(name, val)

    def RemoveResponseHeader(self, key: Any) -> None:  # noqa: N802
        name, _ = check_header(key)
        self._x.response_headers.remove(name)
        self._x.response_removed.append(name.lower())


class LuaHttpResponse(_Base):
    """``onHttpResponse``'s argument: the response before any byte of its body is sent."""

    def __init__(self, exchange: HttpExchange, engine: LuaEngine, headers: HeaderList) -> None:
        super().__init__(exchange, engine)
        self._list = headers

    @property
    def Headers(self) -> Any:  # noqa: N802
        if self._headers is None:
            self._headers = self._list.as_lua(self._engine)
        return self._headers

    def AddHeader(self, key: Any, value: Any) -> None:  # noqa: N802
        name, val = check_header(key, value)
        if name.lower() in _HOP_BY_HOP:
            raise LuaExportError(f"{name} is a hop-by-hop header; the server manages it")
        self._list.set(name, val)
        self._headers = None

    def RemoveHeader(self, key: Any) -> None:  # noqa: N802
        name, _ = check_header(key)
        self._list.remove(name)
        self._headers = None

    AddResponseHeader = AddHeader
    RemoveResponseHeader = RemoveHeader
