"""The objects ``onHttpRequest`` and ``onHttpResponse`` receive (the seed's ILuaHttpRequest /
ILuaHttpResponse), and how what a hook did comes back.

The objects are plain Lua tables built by the prelude (``prelude.lua``): fields, ``Headers`` (a
read-only, case-insensitive table; ``pairs()`` iterates it), the caller's identity (``User``,
``Roles``: a list of strings, ``Claims``: a token's claims, empty otherwise; from the plain scope
keys ``user``, ``roles`` and ``claims`` the gateway's authentication sets), ``ClientCertificate``
(the subject of the verified client certificate of an https connection, RFC 4514, e.g.
``CN=ct-01,O=Radiology``; empty otherwise; from the ASGI TLS extension's ``client_cert_name``),
``Upstream`` (the named upstream that serves the request: what ``Upstreams:Routes`` chose,
or what ``request:SetUpstream("name")`` set; in ``onHttpResponse`` the server that answered; empty
when the gateway has no upstream chooser) and methods callable with ``:`` or ``.``. A hook is one
call into Lua: the object is built, the script runs and the edits come back with its result, as
flat ``(op, name, value)`` triples.
Names and values a script sets are validated in Lua: a name or value with CR, LF or NUL is
refused, since it would let a script split the HTTP message.

Headers stay in their ASGI form (lists of ``(bytes, bytes)``) and are only copied when a script
edits them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

from .runtime import HTTP, LuaEngine, LuaError, LuaExportError

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")

RawHeaders = list[tuple[bytes, bytes]]


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


def lua_headers(raw: RawHeaders) -> list[bytes | str]:
    """Flat name, value arguments for Lua. ASCII bytes pass as they are (a Lua string is bytes);
    the rest is decoded so that what Lua sees, and may hand back, is valid UTF-8."""
    flat: list[bytes | str] = []
    for k, v in raw:
        flat.append(k if k.isascii() else k.decode("latin-1"))
        flat.append(v if v.isascii() else decode_value(v))
    return flat


def remove_header(raw: RawHeaders, name: str) -> None:
    low = name.lower().encode("latin-1")
    raw[:] = [(k, v) for k, v in raw if k.lower() != low]


def set_header(raw: RawHeaders, name: str, value: str) -> None:
    """Replace every ``name`` header by one (a script's string is UTF-8 bytes on the wire)."""
    remove_header(raw, name)
    raw.append((name.lower().encode("latin-1"), value.encode("utf-8", "surrogateescape")))


def apply_ops(raw: RawHeaders, ops: list[tuple[str, str, str]] | tuple[Any, ...]) -> None:
    for op, name, value in ops:
        if op[1] == "+":
            set_header(raw, name, value)
        else:
            remove_header(raw, name)


class HttpExchange:
    """One request/response pair as the hooks see it; shared by all engines of the request."""

    def __init__(self, scope: dict[str, Any]) -> None:
        self.scope = scope
        self.scheme: str = scope.get("scheme", "http")
        self.method: str = scope["method"]
        self.path: str = scope.get("path", "/")
        self.query: str = scope.get("query_string", b"").decode("latin-1")
        self.request_headers: RawHeaders = scope.get("headers", [])  # copied on the first edit
        self.request_headers_changed = False
        self._request_flat: list[bytes | str] | None = None
        self.response_ops: list[tuple[str, str, str]] = []  # what the request hooks did to the response headers
        self.status = 200
        self.body: list[bytes] | None = None  # what ResponseWrite wrote, if anything
        client = scope.get("client")
        self.remote_ip: str = client[0] if client else ""
        self.user: str = scope.get("user") or ""
        tls = scope.get("extensions", {}).get("tls") if "extensions" in scope else None
        self.client_certificate: str = (tls.get("client_cert_name") if tls else None) or ""
        # roles cross as one string (split in Lua on first read), claims as a Python mapping
        # converted on first read: a hook that never reads them pays for neither
        roles = scope.get("roles") or ()
        self.roles: str = "\n".join(roles)
        self.claims: Any = scope.get("claims") or None
        self.upstream = ""  # request.Upstream / response.Upstream
        self.upstream_set = False  # a hook called SetUpstream
        self.upstream_names: Callable[[], Collection[str]] | None = None  # what SetUpstream accepts

    def request_flat(self) -> list[bytes | str]:
        if self._request_flat is None:
            self._request_flat = lua_headers(self.request_headers)
        return self._request_flat

    def write(self, data: str | bytes) -> None:
        """Append what a hook wrote (the Lua side has already checked it is a string)."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        if self.body is None:
            self.body = []
        self.body.append(data)


def _apply(x: HttpExchange, response_headers: RawHeaders | None, result: tuple[Any, ...]) -> None:
    """Apply what a hook did (status, written body, header edits) to the exchange.

    ``result`` is what the prelude's HTTP operation returns after the hook's own return value:
    status, body, body kind ("s" text, "x" hex of binary bytes), then (op, name, value) triples
    with op "q+"/"q-" (request headers) or "r+"/"r-" (response headers).
    """
    x.status = int(result[0])
    if result[1] is not None:
        x.write(bytes.fromhex(result[1]) if result[2] == "x" else result[1])
    if len(result) == 3:
        return
    ops = list(zip(result[3::3], result[4::3], result[5::3], strict=True))
    for op, name, _ in ops:
        if op == "u":
            _set_upstream(x, name)
    request_ops = [op for op in ops if op[0][0] == "q"]
    if request_ops:
        if not x.request_headers_changed:
            x.request_headers = list(x.request_headers)
            x.request_headers_changed = True
        apply_ops(x.request_headers, request_ops)
        x._request_flat = None
    response_ops = [op for op in ops if op[0][0] == "r"]
    if not response_ops:
        return
    if response_headers is not None:  # a response hook edits the response itself
        apply_ops(response_headers, response_ops)
    else:
        x.response_ops.extend(response_ops)


def _set_upstream(x: HttpExchange, name: str) -> None:
    known = x.upstream_names() if x.upstream_names is not None else ()
    if name not in known:
        raise LuaError(f"request:SetUpstream({name!r}): no such upstream server or group (known: "
                       f"{', '.join(sorted(known)) or 'none'})")
    x.upstream = name
    x.upstream_set = True


def _claims_loader(engine: LuaEngine, claims: Any) -> Any:
    """What Lua calls on the first read of ``Claims``: the claims as a table (None: no claims)."""
    if not claims:
        return None
    return lambda: engine.to_lua(_plain(claims))


def _plain(value: Any, depth: int = 0) -> Any:
    """JSON-like claims as dicts and lists (a read-only mapping included), for ``table_from``."""
    if depth > 32:
        return None
    if isinstance(value, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, depth + 1) for v in value]
    return value


async def _hook(engine: LuaEngine, callback: str, kind: str, x: HttpExchange, headers: list[bytes | str]) -> Any:
    try:
        out = await engine.run_op(
            HTTP, callback, kind, x.scheme, x.method, x.path, x.query, x.remote_ip, x.user, x.client_certificate,
            x.roles, _claims_loader(engine, x.claims) if x.claims else None, x.status, x.upstream, *headers
        )
    except LuaError as e:
        if str(e).startswith("StatusCode must be"):  # raised after the hook returned: no line to name
            raise LuaError(f"{engine.script}: {e}", e.traceback) from None
        raise
    return out


async def call_request_hook(engine: LuaEngine, callback: str, x: HttpExchange) -> bool:
    """Run ``onHttpRequest`` in ``engine``; returns True when the script intercepts."""
    out = await _hook(engine, callback, "request", x, x.request_flat())
    _apply(x, None, out[1:])
    return out[0] is True


async def call_response_hook(engine: LuaEngine, callback: str, x: HttpExchange, headers: RawHeaders) -> None:
    """Run ``onHttpResponse`` in ``engine``; the status and body edits land in ``x``, the header
    edits in ``headers`` (the response's ASGI header list, edited in place)."""
    out = await _hook(engine, callback, "response", x, lua_headers(headers))
    _apply(x, headers, out[1:])
