"""Keep-alive connection pools: one per origin (:class:`ConnectionPool`), and a bounded set of
them for the calls that may go anywhere (:class:`Pools`: the Lua ``Http*`` functions).

Why a pool of our own rather than httpx's (httpcore) or aiohttp's: measured with the same
uvicorn app in front of a static upstream, aiohttp's client cost ~310 µs of CPU per 2 KB
answer and ~10.8 ms per 10 MB one, this client 160-180 µs and ~6-7 ms; httpcore's pool
collapsed under 32 concurrent streams. httpx stays the API of the gateway's own calls,
through :class:`~dicomproxy.upstream.transport.PoolTransport` on these pools.

A request takes an idle connection (the most recently used; one idle past the keep-alive
timeout is closed instead) or opens one within ``max_connections``, else waits its turn. A
request whose kept-alive connection turns out closed before any byte of the answer
(:class:`~dicomproxy.upstream.errors.Stale`) is replayed once on a new connection only if its
method is idempotent and none of its body was consumed (aiohttp's rule): a POST or PATCH,
bodiless or not, is never replayed.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from dicomproxy.upstream.connection import Body, Connection, Exchange
from dicomproxy.upstream.errors import ConnectError, ConnectTimeout, PoolTimeout, Stale
from dicomproxy.upstream.flow import Budget
from dicomproxy.upstream.framing import IDEMPOTENT_METHODS, Headers, HeadWriter, chosen_framing
from dicomproxy.upstream.limits import Limits, default_tls
from dicomproxy.upstream.watchdog import Watchdog


@dataclass(frozen=True)
class Origin:
    """``scheme://host:port``: what one pool connects to."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"URL {url!r} must look like http://host:port[/prefix] or https://...")
        return cls(parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def host_header(self) -> bytes:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = self.port == (443 if self.tls else 80)
        return (host if default else f"{host}:{self.port}").encode("idna")

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}"


class ConnectionPool:
    """Keep-alive connections to one origin, at most ``max_connections`` of them."""

    def __init__(self, origin: Origin | str, limits: Limits | None = None, max_connections: int = 100) -> None:
        self.origin = Origin.of(origin) if isinstance(origin, str) else origin
        self.limits = limits or Limits()
        self.max_connections = max_connections
        self.host_header = self.origin.host_header
        self.heads = HeadWriter(self.host_header)
        self.budget = Budget(self.limits.read_ahead, self.limits.buffer_budget)
        self.connections_made = 0
        self.closed = False
        self._tls: ssl.SSLContext | None = None
        self._idle: list[Connection] = []
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: Watchdog | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def watchdog(self) -> Watchdog:
        """The one timer of this pool's running exchanges (:mod:`~dicomproxy.upstream.watchdog`)."""
        if self._watchdog is None:
            self._watchdog = Watchdog(self.loop)
        return self._watchdog

    @property
    def busy(self) -> int:
        """Connections open and carrying an exchange."""
        return self._open - len(self._idle)

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: Body = None,
        content_length: int | None = None,
        limits: Limits | None = None,
        host: bytes | None = None,
        checked: bytes = b"",
    ) -> Exchange:
        """Send a request and return its :class:`Exchange` once the answer's head is in.

        ``target`` goes on the request line as it is (path and query). ``headers`` may hold
        anything: the head writer drops ``Host``, ``Content-Length``, ``Transfer-Encoding`` and
        the hop-by-hop names and writes its own. A ``bytes`` body is sent with its length; a
        streamed one with ``content_length`` if given (exactly that many bytes, or the
        connection is dropped), else chunked. ``limits`` replaces the pool's for this request;
        ``host`` the ``Host`` header (``Upstream:PreserveHost``; the writer checks it); ``checked``
        header lines from :func:`~dicomproxy.upstream.framing.checked_lines`, sent after ``headers``.
        """
        if type(body) is bytes:
            content_length = len(body)
        framing, length = chosen_framing(method, content_length, body is not None)
        head = self.heads.encode(method, target, headers, framing, length, host, checked)
        limits = limits or self.limits
        loop, watchdog = self._loop, self._watchdog  # the properties once set: no call per request
        if loop is None or watchdog is None:
            loop, watchdog = self.loop, self.watchdog
        for attempt in (0, 1):
            conn = self._idle_connection(limits) if not attempt else None
            if conn is None:  # none idle: a coroutine to open one (or wait for a turn)
                conn = await self._acquire(limits, fresh=attempt == 1)
            exchange = Exchange(conn, loop, self.budget, limits, method, self._release, watchdog)
            conn.exchange = exchange
            try:
                await exchange.send(head, framing, length, body)
                return exchange
            except Stale:
                exchange.close()
                if attempt or method not in IDEMPOTENT_METHODS or exchange.body_consumed:
                    raise
            except BaseException:
                exchange.close()
                raise
        raise AssertionError("unreachable")

    # ---------------------------------------------------------------- connections
    async def _connect(self, limits: Limits) -> Connection:
        origin = self.origin
        tls = None
        if origin.tls:
            tls = self._tls = self._tls or limits.tls or default_tls()
        try:
            async with asyncio.timeout(limits.connect_timeout or None):
                _, conn = await self.loop.create_connection(
                    lambda: Connection(origin.label), origin.host, origin.port, ssl=tls,
                    server_hostname=origin.host if tls else None,
                )
        except TimeoutError:
            raise ConnectTimeout(f"no connection to {origin.label} within {limits.connect_timeout:g} s") from None
        except (OSError, ssl.SSLError) as e:
            raise ConnectError(f"cannot connect to {origin.label}: {e.strerror or e}") from e
        self.connections_made += 1
        return conn

    def _idle_connection(self, limits: Limits) -> Connection | None:
        """The most recently used idle connection still fit for use (the others found on the way
        are closed), or None. Synchronous: a kept-alive request costs no ``_acquire`` coroutine."""
        idle = self._idle
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.closed or now - conn.idle_since >= limits.keepalive_timeout:
                self._discard(conn)
                continue
            return conn
        return None

    async def _acquire(self, limits: Limits, fresh: bool = False) -> Connection:
        """An idle connection, or a new one within ``max_connections``.

        ``fresh`` (a replay after a stale connection): drop every idle connection, which have
        likely all outlived the upstream's keep-alive timeout, and open a new one.
        """
        while True:
            if fresh:
                while self._idle:
                    self._discard(self._idle.pop())
            else:
                conn = self._idle_connection(limits)
                if conn is not None:
                    return conn
            if self._open < self.max_connections:
                break
            await self._wait_turn(limits)
        self._open += 1
        try:
            return await self._connect(limits)
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise

    async def _wait_turn(self, limits: Limits) -> None:
        waiter = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(limits.pool_timeout or None):
                await waiter
        except BaseException as e:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # pass the turn on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            if isinstance(e, TimeoutError):
                raise PoolTimeout(
                    f"all {self.max_connections} connections to {self.origin.label} stayed busy for "
                    f"{limits.pool_timeout:g} s"
                ) from None
            raise

    def _discard(self, conn: Connection) -> None:
        conn.abort()
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _release(self, conn: Connection, reusable: bool) -> None:
        if not reusable or conn.closed or self.closed:
            self._discard(conn)
            return
        conn.used = True
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
        self._wake_one()

    def close_idle(self) -> None:
        """Close the idle connections and take no new ones; running exchanges close theirs at their end."""
        self.closed = True
        while self._idle:
            self._discard(self._idle.pop())

    async def close(self) -> None:
        self.close_idle()


class Pools:
    """A :class:`ConnectionPool` per origin, made on first use, with the same :class:`Limits`.

    At most ``max_origins`` pools (the least recently used is closed first; ``pinned`` ones,
    such as the PACS's, never are), each of at most ``per_origin`` connections.
    """

    def __init__(self, limits: Limits, pinned: tuple[ConnectionPool, ...] = (), max_origins: int = 32,
                 per_origin: int = 8) -> None:
        self.limits = limits
        self.max_origins = max_origins
        self.per_origin = per_origin
        self._pinned = {pool.origin: pool for pool in pinned}
        self._pools: collections.OrderedDict[Origin, ConnectionPool] = collections.OrderedDict()

    def get(self, scheme: str, host: str, port: int | None) -> ConnectionPool:
        origin = Origin(scheme, host, port or (443 if scheme == "https" else 80))
        pool = self._pinned.get(origin)
        if pool is not None:
            return pool
        pool = self._pools.get(origin)
        if pool is not None:
            self._pools.move_to_end(origin)
            return pool
        while len(self._pools) >= self.max_origins:
            self._pools.popitem(last=False)[1].close_idle()
        pool = self._pools[origin] = ConnectionPool(origin, self.limits, self.per_origin)
        return pool

    def __len__(self) -> int:
        return len(self._pools)

    async def close(self) -> None:
        for pool in (*self._pinned.values(), *self._pools.values()):
            pool.close_idle()
        self._pools.clear()
