"""A small, real HTTP upstream for proxy tests that Orthanc cannot serve.

Orthanc does not echo request headers, answer with a chosen status, stall on purpose or count
connections, so the tests of the proxy's header handling, timeouts, cancellation and pooling
run the gateway in front of this server instead. It is a separate process (aiohttp), started
on a free loopback port by :class:`LocalUpstream`, and reports what it saw at ``GET /_stats``.

Routes (any method unless noted)::

    /_stats                 JSON: requests seen, distinct connections, hang ids started/cancelled
    /_reset                 forget everything (POST)
    /echo...                JSON: method, raw path, raw query, header pairs, body length + crc32
    /status/<code>          answers <code> (no body for 204/304)
    /dup                    two Set-Cookie and two X-Dup response headers
    /hop                    hop-by-hop response headers (Keep-Alive, Proxy-Authenticate, Trailer,
                            and X-Hop-Resp named in Connection) next to an end-to-end X-Kept
    /chunked?size=N         N bytes, chunked;  /fixed?size=N  N bytes with Content-Length
    /big?size=N&mode=...&id=X   N bytes of :func:`pattern_blocks` (mode ``fixed`` or ``chunked``);
                            records X as aborted (with the bytes sent) if the reader goes away
    /sink                   reads the body; JSON: length, crc32, how it was framed
    /truncated              announces 100000 bytes, sends 40000, drops the connection
    /slow?delay=S           answers after S seconds
    /hang?id=X              waits up to 60 s for the client to go away; records X as cancelled

Run standalone: ``python -m tests.local_upstream PORT``.
"""

from __future__ import annotations

import asyncio
import http.client
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 1 << 20


def pattern_blocks(size: int) -> Iterator[bytes]:
    """Deterministic, non-repeating-per-MiB bytes: block ``i`` starts with ``i`` (8 bytes)."""
    base = bytes((i * 131 + 7) % 251 for i in range(BLOCK))
    sent = 0
    index = 0
    while sent < size:
        block = index.to_bytes(8, "big") + base[8:]
        block = block[: size - sent]
        sent += len(block)
        index += 1
        yield block


def pattern_crc(size: int) -> int:
    crc = 0
    for block in pattern_blocks(size):
        crc = zlib.crc32(block, crc)
    return crc


# --------------------------------------------------------------------------- the server
def _build_app() -> Any:
    from aiohttp import web

    state: dict[str, Any] = {"requests": [], "peers": set(), "hang_started": [], "hang_cancelled": [],
                             "hang_completed": [], "big_aborted": [], "big_completed": []}

    def peer(request: web.Request) -> None:
        transport = request.transport
        if transport is not None:
            state["peers"].add(transport.get_extra_info("peername")[1])

    async def read_body(request: web.Request) -> tuple[int, int]:
        length, crc = 0, 0
        async for chunk in request.content.iter_any():
            length += len(chunk)
            crc = zlib.crc32(chunk, crc)
        return length, crc

    async def handle(request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == "/_stats":
            return web.json_response({
                "requests": state["requests"],
                "connections": len(state["peers"]),
                "hang_started": state["hang_started"],
                "hang_cancelled": state["hang_cancelled"],
                "hang_completed": state["hang_completed"],
                "big_aborted": state["big_aborted"],
                "big_completed": state["big_completed"],
            })
        if path == "/_reset":
            for value in state.values():
                value.clear()
            return web.json_response({"ok": True})
        peer(request)
        state["requests"].append({"method": request.method, "path": request.raw_path})
        q = request.query
        if path.startswith("/echo"):
            length, crc = await read_body(request)
            return web.json_response({
                "method": request.method,
                "path": request.raw_path.split("?", 1)[0],
                "query": request.query_string,
                "raw_query": request.raw_path.partition("?")[2],
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
                "body_length": length,
                "body_crc": crc,
            }, headers={"X-Upstream-Secret": "s3cret", "X-Echo": "1"})
        if path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            await read_body(request)
            if code in (204, 304):
                return web.Response(status=code, headers={"X-Status": str(code), "ETag": '"v1"'})
            return web.Response(status=code, text=f"status {code}", headers={"X-Status": str(code)})
        if path == "/dup":
            resp = web.Response(text="dup")
            resp.headers.add("Set-Cookie", "a=1; Path=/")
            resp.headers.add("Set-Cookie", "b=2; Path=/")
            resp.headers.add("X-Dup", "one")
            resp.headers.add("X-Dup", "two")
            return resp
        if path == "/hop":
            return web.Response(text="hop", headers={
                "Keep-Alive": "timeout=99", "Proxy-Authenticate": "Basic realm=x", "Trailer": "X-Trailer",
                "Connection": "X-Hop-Resp", "X-Hop-Resp": "drop me", "X-Kept": "keep me",
            })
        if path in ("/chunked", "/fixed", "/big"):
            size = int(q.get("size", "1000"))
            chunked = path == "/chunked" or q.get("mode") == "chunked"
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                               "X-Pattern-Crc": str(pattern_crc(size)) if size <= 16 * BLOCK else ""})
            if chunked:
                resp.enable_chunked_encoding()
            else:
                resp.content_length = size
            await resp.prepare(request)
            piece = 64 * 1024 if size <= 16 * BLOCK else BLOCK
            sent = 0
            try:
                for block in pattern_blocks(size):
                    for i in range(0, len(block), piece):
                        await resp.write(block[i:i + piece])
                        sent += len(block[i:i + piece])
                await resp.write_eof()
            except (ConnectionError, RuntimeError) as e:  # the reader went away mid-body
                state["big_aborted"].append({"id": q.get("id", ""), "sent": sent, "error": type(e).__name__})
                raise
            state["big_completed"].append(q.get("id", ""))
            return resp
        if path == "/sink":
            length, crc = await read_body(request)
            return web.json_response({
                "length": length, "crc": crc,
                "content_length": request.headers.get("Content-Length"),
                "transfer_encoding": request.headers.get("Transfer-Encoding"),
            })
        if path == "/truncated":  # promises more than it sends, then drops the connection
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            resp.content_length = 100_000
            await resp.prepare(request)
            await resp.write(b"x" * 40_000)
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.abort()
            return resp
        if path == "/slow":
            await asyncio.sleep(float(q.get("delay", "5")))
            return web.Response(text="slow done")
        if path == "/hang":
            hang_id = q.get("id", "")
            state["hang_started"].append(hang_id)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                transport = request.transport
                if transport is None or transport.is_closing():
                    state["hang_cancelled"].append(hang_id)
                    return web.Response(text="gone")
                await asyncio.sleep(0.05)
            state["hang_completed"].append(hang_id)
            return web.Response(text="hang done")
        return web.Response(status=404, text=f"no route {path}")

    app = web.Application(client_max_size=1 << 40)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main(argv: list[str]) -> None:
    from aiohttp import web

    port = int(argv[0])
    web.run_app(_build_app(), host="127.0.0.1", port=port, access_log=None, print=None,
                handle_signals=True, shutdown_timeout=1)


# --------------------------------------------------------------------------- test side
def raw_request(
    base: str, method: str, target: str, headers: list[tuple[str, str]] = (), body: bytes | None = None,
    timeout: float = 30,
) -> tuple[int, list[tuple[str, str]], bytes]:
    """One request with exactly these bytes on the wire (no client-side URL or header rewriting)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.putrequest(method, target, skip_host=any(k.lower() == "host" for k, _ in headers),
                        skip_accept_encoding=True)
        for k, v in headers:
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, resp.getheaders(), data
    finally:
        conn.close()


def header_values(headers: list[tuple[str, str]] | list[list[str]], name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name.lower()]


class LocalUpstream:
    """Runs the server above as a subprocess on a free loopback port."""

    def __init__(self, workdir: Path) -> None:
        from tests.peers import free_port

        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = self.workdir / "local-upstream.log"
        self.proc: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15) -> LocalUpstream:
        import requests

        from tests.peers import REPO_ROOT, _popen, wait_until

        cmd = [sys.executable, "-m", "tests.local_upstream", str(self.port)]
        self.proc = _popen(cmd, self.log_path, cwd=REPO_ROOT)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"local upstream exited: {self.log_path.read_text()}")
            return requests.get(self.url + "/_stats", timeout=1).status_code == 200

        wait_until(up, timeout=timeout, what="the local upstream to answer /_stats")
        return self

    def stop(self) -> None:
        from tests.peers import _terminate

        _terminate(self.proc, 5)

    def stats(self) -> dict[str, Any]:
        import requests

        return requests.get(self.url + "/_stats", timeout=5).json()

    def reset(self) -> None:
        import requests

        requests.post(self.url + "/_reset", timeout=5).raise_for_status()

    def paths_seen(self) -> list[str]:
        return [r["path"] for r in self.stats()["requests"]]


if __name__ == "__main__":
    main(sys.argv[1:])
