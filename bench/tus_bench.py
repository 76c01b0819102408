#!/usr/bin/env python3
"""TUS upload benchmark: a 1 GB upload with tuspy at 8 MB and 64 MB chunks.

Prints MB/s and the server's RSS growth (peak RSS during the upload minus RSS before it) for

* ``gateway``     the full gateway (``python -m dicomproxy serve``) with its TUS server,
* ``standalone``  the TUS ASGI app alone under uvicorn (same code, no gateway around it),
* ``@tus/server`` the reference: tus-node-server with its file store (needs node; the npm
  packages are installed into ``bench/js`` on first use),

all on 127.0.0.1 with fresh upload folders. Targets (issue 3): >= 400 MB/s, >= the
reference's MB/s, RSS growth < 100 MB.

    python bench/tus_bench.py                       # 1 GiB, 8 and 64 MB chunks, all servers
    python bench/tus_bench.py --size-mb 256 --targets standalone --write-mode aiofiles

Not a test: it takes a minute or two and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
JS_DIR = ROOT / "bench" / "js"
MB = 1024 * 1024

STANDALONE = """
import sys, logging
from pathlib import Path
import uvicorn
from dicomproxy.config.settings import TusSettings
from dicomproxy.tus.protocol import TusApp
port, folder, fsync, mode = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
batch = 0 if mode == "aiofiles" else int(mode)
settings = TusSettings(base_path="/files/", upload_folder=folder, max_size=0, expire_after=86400,
                       sweep_interval=60, keep_after_import=True, import_batch_size=50, lock_timeout=20)
async def done(upload):
    pass
app = TusApp(settings, done, fsync=fsync, write_batch=batch)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", loop="uvloop", http="httptools")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """Samples a process's RSS every 10 ms on a thread; ``peak`` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(0.01)

    def __enter__(self) -> RssSampler:
        self.peak = rss_bytes(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Server:
    name: str
    url: str  # the creation endpoint, ending in /
    proc: subprocess.Popen[bytes]
    pid: int  # the process whose RSS is measured
    folder: Path


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} (see its log)")
        with contextlib.suppress(requests.RequestException):
            requests.options(url, timeout=2)
            return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


@contextlib.contextmanager
def start_server(kind: str, work: Path, fsync: str, write_mode: str) -> Iterator[Server]:
    port = free_port()
    folder = work / f"uploads-{kind.replace('/', '_').replace('@', '')}"
    folder.mkdir(parents=True, exist_ok=True)
    log = open(work / f"{folder.name}.log", "wb")  # noqa: SIM115 - closed in finally
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if kind == "gateway":
        config = work / "appsettings.json"
        config.write_text(
            json.dumps(
                {
                    "Urls": f"http://127.0.0.1:{port}",
                    "Upstream": {"Url": f"http://127.0.0.1:{free_port()}"},
                    "Dicom": {"Port": 0},
                    "ExtraConfig": {
                        "TusUploadFolder": str(folder),
                        "DataFolder": str(work / "data"),
                        "ScriptsRoot": str(work / "scripts"),
                    },
                    "Tus": {"KeepAfterImport": True, "Fsync": fsync},
                    "Logging": {"Level": "WARNING"},
                }
            )
        )
        (work / "scripts").mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "dicomproxy", "serve", "--config", str(config)]
        url = f"http://127.0.0.1:{port}/files/"
    elif kind == "standalone":
        cmd = [sys.executable, "-c", STANDALONE, str(port), str(folder), fsync, write_mode]
        url = f"http://127.0.0.1:{port}/files/"
    else:
        ensure_node_packages()
        cmd = ["node", str(JS_DIR / "tus_server.js"), str(port), str(folder)]
        env["NODE_PATH"] = str(JS_DIR / "node_modules")
        url = f"http://127.0.0.1:{port}/files/"
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
    try:
        wait_http(url, proc)
        yield Server(kind, url, proc, proc.pid, folder)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def ensure_node_packages() -> None:
    if (JS_DIR / "node_modules" / "@tus" / "server").is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is missing (apt-get install nodejs npm)")
    print("installing @tus/server and @tus/file-store into bench/js (first run only) ...", flush=True)
    subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=JS_DIR, check=True)


def make_file(path: Path, size: int) -> str:
    """``size`` bytes of incompressible data (a random 16 MB block, varied per block); sha256."""
    block = os.urandom(16 * MB)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        written = 0
        n = 0
        while written < size:
            piece = (n.to_bytes(8, "little") + block[8:])[: size - written]
            f.write(piece)
            digest.update(piece)
            written += len(piece)
            n += 1
    return digest.hexdigest()


def upload(server: Server, path: Path, chunk: int) -> tuple[float, int, str]:
    """tuspy upload; returns (seconds, peak RSS growth in bytes, upload url)."""
    from tusclient import client

    tus = client.TusClient(server.url)
    uploader = tus.uploader(str(path), chunk_size=chunk, metadata={"filename": path.name})
    base = rss_bytes(server.pid)
    with RssSampler(server.pid) as sampler:
        t0 = time.perf_counter()
        uploader.upload()
        elapsed = time.perf_counter() - t0
    return elapsed, max(0, sampler.peak - base), uploader.url


def run(args: argparse.Namespace) -> int:
    size = args.size_mb * MB
    chunks = [int(c) * MB for c in args.chunks.split(",")]
    targets = args.targets.split(",")
    if "@tus/server" in targets and shutil.which("node") is None:
        print("node is not installed: skipping the @tus/server reference", file=sys.stderr)
        targets.remove("@tus/server")
    work = Path(tempfile.mkdtemp(prefix="tus-bench-", dir=args.workdir))
    rows: list[tuple[str, int, float, float]] = []
    try:
        src = work / "payload.bin"
        print(f"writing a {args.size_mb} MB test file ...", flush=True)
        want = make_file(src, size)
        for target in targets:
            try:
                with start_server(target, work, args.fsync, args.write_mode) as server:
                    # Warm up (imports, first allocations) so the RSS baseline is the steady state.
                    warm = work / "warm.bin"
                    warm.write_bytes(os.urandom(4 * MB))
                    upload(server, warm, 4 * MB)
                    for chunk in chunks:
                        for f in server.folder.iterdir():
                            f.unlink()
                        elapsed, growth, url = upload(server, src, chunk)
                        stored = server.folder / url.rstrip("/").rsplit("/", 1)[1]
                        ok = stored.stat().st_size == size
                        if args.verify:
                            ok = ok and _sha256(stored) == want
                        mbps = size / MB / elapsed
                        rows.append((target, chunk // MB, mbps, growth / MB))
                        verdict = "ok" if ok else "SIZE/HASH MISMATCH"
                        print(
                            f"  {target:12} {chunk // MB:3d} MB chunks: {mbps:7.1f} MB/s, "
                            f"RSS +{growth / MB:6.1f} MB, {verdict}",
                            flush=True,
                        )
                        if not ok:
                            return 1
            except (RuntimeError, subprocess.CalledProcessError) as e:
                print(f"  {target}: not run: {e}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"| server | chunk | MB/s | RSS growth (MB) |   ({args.size_mb} MB upload, fsync={args.fsync})")
    print("|---|---:|---:|---:|")
    for target, chunk, mbps, growth in rows:
        print(f"| {target} | {chunk} MB | {mbps:.0f} | {growth:.1f} |")
    return 0


def _sha256(path: Path) -> str:
    d = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * MB):
            d.update(block)
    return d.hexdigest()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=1024)
    p.add_argument("--chunks", default="8,64", help="chunk sizes in MB, comma-separated")
    p.add_argument("--targets", default="gateway,@tus/server", help="comma-separated: gateway, standalone, @tus/server")
    p.add_argument("--fsync", default="complete", choices=("complete", "patch", "none"))
    p.add_argument(
        "--write-mode",
        default=str(4 * MB),
        help="standalone only: 'aiofiles' (a write per message) or a batch size in bytes",
    )
    p.add_argument("--verify", action="store_true", help="also compare sha256 of the stored file")
    p.add_argument("--workdir", default=None, help="where the temp folder goes (default: $TMPDIR)")
    return run(p.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
