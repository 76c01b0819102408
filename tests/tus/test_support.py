"""Helpers for the TUS tests (no tests here): real TUS servers on free loopback ports.

* :class:`TusThreadServer` runs :class:`dicomproxy.tus.TusApp` under a real uvicorn in a
  thread of the test process (fast to start; its completions are visible to the test).
* :class:`TusProcessServer` runs the same app in a separate process, for what needs one:
  ``kill -9`` in the middle of a PATCH, and locking across processes.
* :func:`raw_request` speaks HTTP/1.1 over a socket, to send a path exactly as written
  (``../``), a body slower than the server reads it, or to vanish mid-body.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import uvicorn

from dicomproxy.config.settings import TusSettings
from dicomproxy.tus import TusApp, Upload
from tests.peers import REPO_ROOT, free_port, wait_until

TUS = {"Tus-Resumable": "1.0.0"}
OCTET = "application/offset+octet-stream"


def tus_settings(folder: Path, **overrides: Any) -> TusSettings:
    base = TusSettings(
        base_path="/files/",
        upload_folder=folder,
        max_size=0,
        expire_after=86400,
        sweep_interval=60,
        keep_after_import=False,
        import_batch_size=50,
        lock_timeout=20,
    )
    return base.model_copy(update=overrides)


class TusThreadServer:
    """A TusApp under uvicorn (uvloop + httptools, as in production) in a background thread."""

    def __init__(
        self,
        folder: Path,
        *,
        holder_poll: float = 0.2,
        read_timeout: float = 60,
        fsync: str = "complete",
        **settings: Any,
    ) -> None:
        self.folder = folder
        self.settings = tus_settings(folder, **settings)
        self.completed: list[Upload] = []
        self.app = TusApp(self.settings, self._on_complete, holder_poll=holder_poll, read_timeout=read_timeout,
                          fsync=fsync)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}{self.settings.base_path}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, loop="uvloop", http="httptools",
                                lifespan="on", log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def _on_complete(self, upload: Upload) -> None:
        self.completed.append(upload)

    def start(self) -> TusThreadServer:
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=10, what="the TUS test server to start")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def create(self, length: int | None = None, headers: dict[str, str] | None = None, **kw: Any) -> str:
        """POST; returns the absolute upload URL (asserts 201)."""
        hdrs = {**TUS, **(headers or {})}
        if length is not None:
            hdrs["Upload-Length"] = str(length)
        r = requests.post(self.url, headers=hdrs, timeout=30, **kw)
        assert r.status_code == 201, (r.status_code, r.text)
        return r.headers["Location"]

    def patch(self, url: str, offset: int, data: bytes, headers: dict[str, str] | None = None) -> requests.Response:
        hdrs = {**TUS, "Content-Type": OCTET, "Upload-Offset": str(offset), **(headers or {})}
        return requests.patch(url, data=data, headers=hdrs, timeout=30)

    def head(self, url: str) -> requests.Response:
        return requests.head(url, headers=TUS, timeout=30)


STANDALONE = """
import sys, logging
from pathlib import Path
import uvicorn
from dicomproxy.tus import TusApp
from tests.tus.test_support import tus_settings
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
port, folder, lock_timeout = int(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
async def done(upload):
    print("COMPLETE", upload.id, flush=True)
app = TusApp(tus_settings(folder, lock_timeout=lock_timeout), done, holder_poll=0.2)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", loop="uvloop", http="httptools")
"""


class TusProcessServer:
    """The TUS app in its own process (``kill9()`` simulates a crash); same folder on restart."""

    def __init__(self, folder: Path, log_path: Path, lock_timeout: float = 20) -> None:
        self.folder = folder
        self.log_path = log_path
        self.lock_timeout = lock_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/files/"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> TusProcessServer:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-c", STANDALONE, str(self.port), str(self.folder), str(self.lock_timeout)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
        )
        log.close()

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"TUS server process died: {self.log_path.read_text()[-2000:]}", pytrace=False)
            with contextlib.suppress(requests.RequestException):
                return requests.options(self.url, timeout=1).status_code == 200
            return False

        wait_until(up, timeout=20, what="the TUS server process to answer")
        return self

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# --------------------------------------------------------------------------- raw HTTP
class RawRequest:
    """An HTTP/1.1 request written by hand on a socket; the body is sent when the test says."""

    def __init__(self, port: int, method: str, path: str, headers: dict[str, str]) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
        """Read one response (status, lower-case headers, body by Content-Length)."""
        self.sock.settimeout(timeout)
        buf = b""
        while b"\r\n\r\n" not in buf:
            piece = self.sock.recv(65536)
            if not piece:
                raise ConnectionError(f"connection closed before a response: {buf!r}")
            buf += piece
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        length = int(hdrs.get("content-length", "0"))
        while len(rest) < length:
            piece = self.sock.recv(65536)
            if not piece:
                break
            rest += piece
        return status, hdrs, rest[:length]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def raw_request(
    port: int, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    if body or method in ("POST", "PATCH"):
        headers = {**headers, "Content-Length": str(len(body))}
    req = RawRequest(port, method, path, headers)
    try:
        if body:
            req.send(body)
        return req.response()
    finally:
        req.close()


def sha256_file(path: Path) -> str:
    d = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            d.update(block)
    return d.hexdigest()


def upload_id(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[1]


def read_info(folder: Path, uid: str) -> dict[str, Any]:
    return json.loads((folder / f"{uid}.info").read_text())


def wait_file_size(path: Path, minimum: int, timeout: float = 15) -> int:
    return wait_until(lambda: path.exists() and (n := path.stat().st_size) >= minimum and n,
                      timeout=timeout, what=f"{path.name} to reach {minimum} bytes")


@contextlib.contextmanager
def thread_server(folder: Path, **kw: Any) -> Iterator[TusThreadServer]:
    server = TusThreadServer(folder, **kw).start()
    try:
        yield server
    finally:
        server.stop()


def completed_ids(tus: TusThreadServer, n: int = 1) -> list[str]:
    """Wait until ``n`` completion callbacks ran; the ids of all that ran."""
    return wait_until(lambda: len(tus.completed) >= n and [u.id for u in tus.completed], timeout=10,
                      what=f"{n} completion callback(s)")
