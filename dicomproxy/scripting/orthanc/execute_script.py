"""``POST /tools/execute-script``: Orthanc's "run this Lua", answered by the gateway.

Mounted only with ``Orthanc:ExecuteLuaEnabled: true`` (default false); otherwise the route goes
to the PACS like any other. What Orthanc does (OrthancRestSystem.cpp, ``ExecuteScript``, checked
against Orthanc 1.10 in tests/e2e/test_execute_script.py) and so what this does:

* the body runs in the one Lua context that also runs the callbacks, here the singleton engine:
  its globals stay for later calls, and a callback it defines takes effect at once (until
  main.lua is next reloaded: ``ScriptSet.execute``);
* the answer is ``200 text/plain`` with what ``print`` wrote, each call a line, arguments joined
  by ``", "`` (``print(42)`` answers ``42\\n``); a script that fails (syntax, error, time budget,
  memory) answers ``500`` with Orthanc's JSON error (``Message: "Cannot execute a Lua command"``,
  ``Details``: the Lua error).

Who may: Orthanc has only the switch. Here the caller must hold the ``admin`` role
(``scope["roles"]``, set by the authentication layer; the built-in rule already refuses others).
With no authentication configured every caller is anonymous, and running code in the gateway is
the whole process's power (its network position, the PACS's REST API, SharedDict, scripts'
exports): refused unless ``Orthanc:ExecuteLuaAllowAnonymous`` says the site wants exactly that.
Each run is logged at WARNING with the user and the script's size and digest (an audit trail
comes later); the script's text is not logged (it may hold credentials). The time budget
(``Lua:TimeoutMs``) and the sandbox are the singleton's.

Limits: a body over :data:`MAX_SCRIPT_BYTES` is refused (413); ``print`` output over
:data:`MAX_OUTPUT_BYTES` fails the script. While the script awaits an export, other callbacks of
the singleton may run (as they do between any two awaits); what they ``print`` then goes into
this answer too.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

from dicomproxy_middleware import LuaEngine, LuaError, LuaExportError

from dicomproxy.scripting.host import ScriptHost

log = logging.getLogger("dicomproxy.orthanc")
lua_log = logging.getLogger("dicomproxy.lua")

PATH = "/tools/execute-script"
MAX_SCRIPT_BYTES = 1 << 20
MAX_OUTPUT_BYTES = 16 << 20
ADMIN = "admin"
CANNOT_EXECUTE = "Cannot execute a Lua command"
ORTHANC_STATUS = 2031  # Orthanc's ErrorCode_CannotExecuteLua

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class LuaPrinter:
    """Orthanc's ``print`` (the ``_OrthancPrint`` export): a log line, and, while an
    execute-script call runs in that engine, a line of its answer."""

    def __init__(self) -> None:
        self._captures: dict[LuaEngine, list[int | str]] = {}

    def __call__(self, engine: LuaEngine, text: Any = "") -> None:
        lua_log.info("[%s %s] Lua says: %s", engine.name, engine.script.rsplit("/", 1)[-1], text)
        if engine.output is not None:
            engine.output("info", str(text))
        out = self._captures.get(engine)
        if out is None:
            return
        line = f"{text}\n"
        size = int(out[0]) + len(line.encode("utf-8", "surrogatepass"))
        if size > MAX_OUTPUT_BYTES:
            raise LuaExportError(f"execute-script: the output is over {MAX_OUTPUT_BYTES} bytes")
        out[0] = size
        out.append(line)

    @contextmanager
    def capture(self, engine: LuaEngine, out: list[int | str]) -> Iterator[None]:
        """Collect what ``engine`` prints meanwhile into ``out``: ``[size, line, line, ...]``."""
        self._captures[engine] = out
        try:
            yield
        finally:
            self._captures.pop(engine, None)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None once it is over ``limit`` bytes."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def _answer(send: Send, status: int, body: bytes, content_type: bytes,
                  headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        *headers, (b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _json(send: Send, status: int, value: dict[str, Any], headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    await _answer(send, status, json.dumps(value, indent=1).encode() + b"\n", b"application/json", headers)


class ExecuteScript:
    """The ASGI app mounted at :data:`PATH`."""

    def __init__(self, lua: ScriptHost, printer: LuaPrinter, *, allow_anonymous: bool) -> None:
        self.lua = lua
        self.printer = printer
        self.allow_anonymous = allow_anonymous

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] != "POST":
            await _answer(send, 405, b"", b"text/plain", ((b"allow", b"POST"),))
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            log.warning("%s %s refused: %s", scope["method"], PATH, refusal)
            await _json(send, 403, {"error": refusal})
            return
        body = await _read_body(receive, MAX_SCRIPT_BYTES)
        if body is None:
            await _json(send, 413, {"error": f"a script is at most {MAX_SCRIPT_BYTES} bytes"})
            return
        user = scope.get("user") or "anonymous"
        log.warning("execute-script by %s from %s: %d bytes, sha256 %s", user, _client(scope), len(body),
                    hashlib.sha256(body).hexdigest()[:16])
        await self._run(scope, send, body)

    def _refusal(self, scope: Scope) -> str | None:
        if "user" not in scope:  # no authentication configured: every caller is anonymous
            if self.allow_anonymous:
                return None
            return ("running Lua in the gateway needs an authenticated admin: configure Authentication, or set "
                    "Orthanc:ExecuteLuaAllowAnonymous to true for a gateway nobody else can reach")
        if ADMIN not in scope.get("roles", ()):
            return f"user {scope['user']!r} lacks the admin role"
        return None

    async def _run(self, scope: Scope, send: Send, body: bytes) -> None:
        out: list[int | str] = [0]
        try:
            await self.lua.execute(body, "execute-script", during=lambda engine: self.printer.capture(engine, out))
        except LuaError as e:
            log.warning("execute-script failed: %s", e.traceback)
            await _json(send, 500, {
                "Details": str(e), "HttpError": "Internal Server Error", "HttpStatus": 500,
                "Message": CANNOT_EXECUTE, "Method": scope["method"], "OrthancError": CANNOT_EXECUTE,
                "OrthancStatus": ORTHANC_STATUS, "Uri": PATH,
            })
            return
        text = "".join(str(line) for line in out[1:])
        await _answer(send, 200, text.encode("utf-8", "replace"), b"text/plain; charset=utf-8")


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}" if client else "?"
