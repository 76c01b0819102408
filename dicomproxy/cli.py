"""``dicomproxy serve | check | config | hash-password | new-api-key | --version``.

``serve``, ``check`` and ``config`` take ``--config PATH``, ``--environment NAME`` and
ASP.NET-style overrides ``--Section:Key=value`` (or ``--Section:Key value``), the last layer of
the configuration. ``hash-password`` and ``new-api-key`` read no configuration: they print a
value to paste into it (``Authentication:Users:{name}:Password``, ``Authentication:ApiKeys``).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import faulthandler
import gc
import getpass
import json
import logging
import math
import shutil
import socket
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from dicomproxy import __version__
from dicomproxy.auth.apikeys import hash_key, new_key
from dicomproxy.auth.passwords import Kind, hash_password
from dicomproxy.config.settings import ConfigError, HttpsSettings, Settings, load_settings
from dicomproxy.http.listeners import GatewayServer, Listener, bind
from dicomproxy.http.renewal import CertificateStore
from dicomproxy.http.server import HeadLimits, connection_budget, protocol_class, raise_file_limit
from dicomproxy.lifecycle import Phase
from dicomproxy.metrics import mark_process_dead, multiprocess_metrics
from dicomproxy.workers import Supervisor, WorkerInfo

if TYPE_CHECKING:
    import uvicorn

    from dicomproxy.app import Gateway

BACKLOG = 4096


def _settings(args: argparse.Namespace) -> Settings:
    try:
        return load_settings(args.config, overrides=args.overrides, environment=args.environment)
    except ConfigError as e:
        print(f"dicomproxy: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """``--Section:Key=value`` / ``--Section:Key value`` -> ``{"Section:Key": "value"}``.

    Raises :class:`ConfigError` naming the first token that is neither.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        name, eq, value = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        if not name:
            raise ConfigError(f"command line: {token!r}: not an option of the command, nor --Section:Key=value")
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ConfigError(f"command line: {token}: expected a value (--{name}=value)")
            i, value = i + 1, tokens[i + 1]
        out[name] = value
        i += 1
    return out


def _logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-5s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("pynetdicom", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    logging.getLogger("pynetdicom.utils").addFilter(_not_a_decode_traceback)


def _not_a_decode_traceback(record: logging.LogRecord) -> bool:
    """Drop what pynetdicom's ``decode_bytes`` logs (with a traceback, once per codec tried) for a
    non-ASCII AE title or UID in a PDU: the upper layer aborts that association and logs why in one
    line (found by tests/fuzz/test_dicom_port.py: three tracebacks per hostile A-ASSOCIATE-RQ)."""
    return record.funcName != "decode_bytes"


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _tune_malloc() -> bool:
    """Keep the proxy's body buffers in the heap, reused, instead of mapped and unmapped.

    Every chunk read from the upstream is a new bytes object of up to 256 KB. glibc serves
    those with mmap (or trims the heap after them), so each 10 MB object costs hundreds of page
    faults and the zeroing of every page: measured 15-20 % of the gateway's CPU on 10 MB
    objects. Up to 64 MB of freed memory now stays in the process. Only this process is
    affected (the environment variables would reach the PACS and OsExecute children too).
    No-op outside glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 4 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 64 << 20))


def freeze_startup_heap() -> None:
    """Once the gateway serves: collect, then move every object alive (the imports, the config
    model, the Lua runtime, the metrics registry: ~125,000 tracked objects, twice 3f4216e's
    ~62,000) into the collector's permanent generation (``gc.freeze``).

    Why: a request leaves a few objects that outlive two young collections, so about once per
    10,000 requests the collector runs a full collection, which walks the whole heap; with the
    start-up heap frozen it walks only what was allocated since. Measured under callgrind
    (``bench/proxy_instructions.py --gateway``, 600 keep-alive requests in the window): one full
    collection fell inside the window and cost ~47 M instructions (~94 k of the 420 k counted
    per request, a ~10 ms pause of the event loop at full speed). What is frozen stays alive
    until the process ends, as it would anyway (modules, settings, engines); a request's
    objects are never frozen, so its cycles are collected as before. Process-level, so set by
    ``serve`` only (``Gateway.on_serving``: once started, before the requests held meanwhile are
    let through, so no request waits behind it later), never by an in-process gateway (tests
    build many in one process).
    """
    gc.collect()
    gc.freeze()
    logging.getLogger("dicomproxy").info("start-up heap frozen: %d objects left out of the collector's full passes",
                                         gc.get_freeze_count())


def _bind_all(settings: Settings, copies: int = 1) -> list[list[socket.socket]]:
    """``copies`` sets of bound sockets, one socket per entry of ``Urls`` in each (in the parent,
    before any worker starts); several copies share each port with ``SO_REUSEPORT``, one set per
    worker (dicomproxy/workers.py says why). Raises :class:`ConfigError` naming ``Urls``."""
    sets: list[list[socket.socket]] = []
    try:
        for _ in range(copies):
            sets.append([])
            for endpoint in settings.endpoints:
                sets[-1].append(bind(endpoint, BACKLOG, reuse_port=copies > 1))
    except ConfigError:
        for sock in (s for socks in sets for s in socks):
            sock.close()
        raise
    return sets


def _listeners(settings: Settings, gateway: Gateway, socks: list[socket.socket]) -> list[Listener]:
    """The listeners on the bound sockets; the certificate store (a component and a health check
    of the gateway) when one is https."""
    store = None
    if any(e.scheme == "https" for e in settings.endpoints):
        store = CertificateStore(settings.https, gateway.bus)
        gateway.add_component(store)
        gateway.add_health("https", store.status)
    return [Listener(endpoint, sock, store if endpoint.scheme == "https" else None)
            for endpoint, sock in zip(settings.endpoints, socks, strict=True)]


WATCHDOG_SLACK_SECONDS = 5.0  # past Server:ShutdownTimeoutSeconds: dump every thread's stack and exit 1


class DrainingServer(GatewayServer):
    """The listeners' server (http/listeners.py) with the gateway's shutdown: the first
    SIGTERM/SIGINT drains (ready 503, still serving for ``Server:DrainDelaySeconds``), then
    uvicorn's shutdown (TLS acceptors first) runs with the HTTP grace period left of the
    deadline; a second signal skips the delay. A
    watchdog (faulthandler) ends the process, stacks in the log, if the deadline is overrun.
    A service that stopped cleanly on request exits 0 (uvicorn would re-raise the signal: -15)."""

    def __init__(self, config: uvicorn.Config, listeners: list[Listener], limits: HeadLimits,
                 https: HttpsSettings, gateway: Gateway) -> None:
        super().__init__(config, listeners, limits, https)
        self.gateway = gateway
        self._drain_until: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        life = self.gateway.life
        was = life.phase
        if self.gateway.drain():
            faulthandler.dump_traceback_later(life.shutdown_timeout + WATCHDOG_SLACK_SECONDS, exit=True)
            if was is Phase.SERVING and life.drain_delay > 0:
                self._drain_until = time.monotonic() + life.drain_delay
            else:
                self.should_exit = True  # starting: nothing to drain yet
        else:
            super().handle_exit(sig, frame)
        self._captured_signals.clear()

    async def on_tick(self, counter: int) -> bool:
        if self._drain_until is not None and time.monotonic() >= self._drain_until:
            self.should_exit = True
        return bool(await super().on_tick(counter))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.gateway.drain()
        self.gateway.stop_accepting()
        self.config.timeout_graceful_shutdown = math.ceil(self.gateway.life.http_grace())
        await super().shutdown(sockets)


def serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _logging(settings.log_level)
    if not _tune_malloc():
        logging.getLogger("dicomproxy").debug("not glibc: malloc left as it is")
    count = settings.server.workers
    try:
        sets = _bind_all(settings, count)
    except ConfigError as e:
        print(f"dicomproxy: config error: {e}", file=sys.stderr)
        return 2
    if count == 1:
        return _serve_worker(settings, sets[0], WorkerInfo())
    run = settings.data_folder / "run"
    multiprocess_metrics(run / "metrics", first=True)
    shutil.rmtree(run / "shared", ignore_errors=True)  # SharedDict starts empty, as in one process

    def close_listeners() -> None:  # each worker keeps its copy until it has drained
        for sock in (s for socks in sets for s in socks):
            sock.close()

    def worker(info: WorkerInfo) -> int:
        for i, socks in enumerate(sets):  # the others' queues are not this worker's to accept from
            if i != info.index:
                for sock in socks:
                    sock.close()
        return _serve_worker(settings, sets[info.index], info)

    supervisor = Supervisor(count, worker, settings.server.shutdown_timeout, run / "workers.json",
                            close_listeners=close_listeners, on_dead=mark_process_dead)
    return supervisor.serve()


def _serve_worker(settings: Settings, socks: list[socket.socket], worker: WorkerInfo) -> int:
    """One gateway process on the bound sockets: the whole of ``serve`` with one worker, one of
    the supervisor's children with several (dicomproxy/workers.py)."""
    import uvicorn

    from dicomproxy.app import build_gateway

    try:
        gateway = build_gateway(settings, worker=worker)
        listeners = _listeners(settings, gateway, socks)
    except ConfigError as e:
        print(f"dicomproxy: config error: {e}", file=sys.stderr)
        return 2
    srv = settings.server
    soft_limit, _ = raise_file_limit()
    limits = HeadLimits(
        max_head_bytes=srv.max_head_bytes,
        max_url_bytes=srv.max_url_bytes,
        head_timeout=srv.head_timeout,
        max_connections=connection_budget(srv.max_connections, srv.reserved_fds, soft_limit),
    )
    config = uvicorn.Config(
        gateway,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        # said, not detected: Gateway.__call__ returns the request's awaitable without being a
        # coroutine function itself, which uvicorn's detection would take for an ASGI 2 app
        interface="asgi3",
        http=protocol_class(limits),
        lifespan="on",
        access_log=False,
        log_level="warning",
        server_header=False,
        proxy_headers=False,  # the proxy appends the peer to X-Forwarded-For itself; don't trust the client's
        timeout_keep_alive=30,
        # In-flight requests get what is left of Server:ShutdownTimeoutSeconds (DrainingServer.shutdown);
        # live SSE streams are ended when the listeners close (Gateway.stop_accepting).
        timeout_graceful_shutdown=math.ceil(gateway.life.http_grace()),
        backlog=BACKLOG,
    )
    server = DrainingServer(config, listeners, limits, settings.https, gateway)
    gateway.on_start_failed = lambda: setattr(server, "should_exit", True)
    gateway.on_serving = freeze_startup_heap
    server.run()
    status = 0 if server.started and not gateway.start_failed else 1
    who = f" worker {worker.index}" if worker.multi else ""
    logging.getLogger("dicomproxy").info("DicomProxy%s stopped (exit status %d)", who, status)
    return status


def check(args: argparse.Namespace) -> int:
    """Load every script the way the gateway would; print each error as ``file:line: message``."""
    from dicomproxy.app import build_gateway

    settings = _settings(args)
    logging.basicConfig(level=logging.CRITICAL)
    gateway = build_gateway(settings)
    root = settings.lua.scripts_root
    if not root.is_dir():
        print(f"{root}: the scripts folder does not exist (ExtraConfig:ScriptsRoot)", file=sys.stderr)
        return 1
    results = asyncio.run(gateway.lua.check())
    for r in results:
        print(f"{r['script']}: ok" if r["ok"] else r["error"])
    if not results:
        print(f"{root}: no .lua scripts")
    return 1 if any(not r["ok"] for r in results) else 0


def show_config(args: argparse.Namespace) -> int:
    """Print the effective configuration as JSON: every key, secrets as ``***``."""
    settings = _settings(args)
    print(json.dumps(settings.tree.as_dict(), indent=2))
    return 0


def hash_password_command(args: argparse.Namespace) -> int:
    """Read a password (twice from a terminal, else one line of standard input); print its hash."""
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("dicomproxy: the two passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("dicomproxy: empty password", file=sys.stderr)
        return 1
    try:
        print(hash_password(password, Kind(args.scheme)))
    except ValueError as e:
        print(f"dicomproxy: {e}", file=sys.stderr)
        return 1
    return 0


def new_api_key_command(args: argparse.Namespace) -> int:
    """Print a new API key (for the client, shown once) and the config entry holding its hash."""
    key = new_key()
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    entry = {"Authentication": {"ApiKeys": {args.name: {"Hash": hash_key(key), "Roles": roles}}}}
    print(f"API key (give it to the client as the X-API-Key header; it is shown only now): {key}")
    print("Add to appsettings.json:")
    print(json.dumps(entry, indent=2))
    return 0


COMMANDS = (
    ("serve", serve, "run the gateway (HTTP on Urls, DICOM on Dicom:Port)"),
    ("check", check, "load every script; print errors as file:line: message"),
    ("config", show_config, "print the effective configuration as JSON (secrets as ***)"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dicomproxy", description="A Lua-scriptable gateway in front of a PACS.",
                                     epilog="Each command also takes --Section:Key=value overrides (last layer).")
    parser.add_argument("--version", action="version", version=f"dicomproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in COMMANDS:
        p = sub.add_parser(name, help=text, description=text + "; --Section:Key=value overrides a key")
        p.add_argument("--config", help="appsettings.json to use (default: ./appsettings.json)")
        p.add_argument("--environment", help="also read appsettings.{ENVIRONMENT}.json (default: "
                       "$DICOMPROXY_ENVIRONMENT)")
        p.set_defaults(func=func)
    p = sub.add_parser("hash-password", help="print the hash of a password for Authentication:Users",
                       description=hash_password_command.__doc__)
    p.add_argument("--scheme", choices=[k.value for k in Kind if k is not Kind.PLAIN], default=Kind.ARGON2.value,
                   help="hash function (default: argon2, i.e. argon2id)")
    p.set_defaults(func=hash_password_command, plain=True)
    p = sub.add_parser("new-api-key", help="make an API key and print its Authentication:ApiKeys entry",
                       description=new_api_key_command.__doc__)
    p.add_argument("--name", default="client", help="the key's name in the config and the logs")
    p.add_argument("--roles", default="viewer", help="comma-separated roles (default: viewer)")
    p.set_defaults(func=new_api_key_command, plain=True)
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "plain", False):
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return int(args.func(args))
    try:
        args.overrides = parse_overrides(rest)
    except ConfigError as e:
        print(f"dicomproxy: config error: {e}", file=sys.stderr)
        return 2
    if args.config is not None and not Path(args.config).exists():
        print(f"dicomproxy: config error: {args.config}: the config file does not exist", file=sys.stderr)
        return 2
    return int(args.func(args))
