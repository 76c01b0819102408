"""Per-upload locks on Redis, shared by every replica (``Cluster:Redis``), with tusd's semantics.

The protocol is :mod:`.locks`' (tusd's ``filelocker``) moved onto Redis, so a PATCH on any
replica continues an upload another began:

* the lock is the key ``dicomproxy:tus:lock:<id>`` holding a random token, taken with
  ``SET NX PX <lease>``: exactly one request of the cluster wins;
* the holder renews the lease every third of ``Cluster:LockLeaseSeconds`` (compare-and-renew in
  a Lua script: only while the token is still ours), so a replica killed with ``-9`` holds it
  at most one lease longer; a holder whose renewal fails (the key expired while Redis or the
  network was away) is told to stop at once, as it no longer excludes anybody;
* a request that finds the lock taken *asks the holder to let go* by publishing on
  ``dicomproxy:tus:release:<id>`` (tusd's ``.stop`` file) and retries every 100 ms up to
  ``Tus:LockTimeoutSeconds``; the holder, subscribed to ``dicomproxy:tus:release:*`` (one
  pattern subscription per replica, not one per upload), stops reading its body, stores what
  it has and answers ``ERR_UPLOAD_INTERRUPTED``, as tusd's handler does;
* release is compare-and-delete (never another holder's lock after our lease ran out).

Inside the process, held locks are also in a registry, so a second request on the same replica
waits on an event, as in :mod:`.locks`. Client library: ``redis`` (redis-py's asyncio API, the
maintained client; any Redis-protocol server: Redis, Valkey, KeyDB, Dragonfly).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any

import redis.asyncio as aioredis

from dicomproxy.tus import errors
from dicomproxy.tus.locks import ReleaseRequest

log = logging.getLogger(__name__)

LOCK_PREFIX = "dicomproxy:tus:lock:"
RELEASE_PREFIX = "dicomproxy:tus:release:"
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_ASK_EVERY = 1.0  # an acquirer publishes its release request again this often (a holder may have just taken it)


class RedisLock:
    """A held lock; ``release()`` it once (``async with`` does)."""

    def __init__(self, manager: RedisLockManager, upload_id: str, token: str, on_release: ReleaseRequest) -> None:
        self.upload_id = upload_id
        self.token = token
        self._manager = manager
        self._on_release = on_release
        self._asked = False
        self.released = asyncio.Event()
        self.renewer: asyncio.Task[None] | None = None

    def request_release(self) -> None:
        if self._asked or self.released.is_set():
            return
        self._asked = True
        log.debug("tus: asked to release the lock of %s", self.upload_id)
        try:
            self._on_release()
        except Exception:
            log.exception("tus: release callback for %s failed", self.upload_id)

    async def release(self) -> None:
        await self._manager._release(self)

    async def __aenter__(self) -> RedisLock:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


class RedisLockManager:
    """Hands out :class:`RedisLock` objects; ``start()`` subscribes, ``aclose()`` lets go of all."""

    def __init__(self, url: str, *, password: str = "", lease: float = 10.0, poll: float = 0.1) -> None:
        kwargs: dict[str, Any] = {"password": password} if password else {}
        self.redis: aioredis.Redis = aioredis.Redis.from_url(url, **kwargs)
        self.lease_ms = int(lease * 1000)
        self.poll = poll
        self._held: dict[str, RedisLock] = {}
        self._listener: asyncio.Task[None] | None = None
        self._pubsub: Any = None
        self._subscribed = asyncio.Event()

    def is_held(self, upload_id: str) -> bool:
        return upload_id in self._held

    async def start(self) -> None:
        await self.redis.ping()  # a wrong URL or password fails at start-up, naming it
        self._pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.psubscribe(RELEASE_PREFIX + "*")
        self._listener = asyncio.get_running_loop().create_task(self._listen(), name="tus-lock-release-listener")

    async def aclose(self) -> None:
        for lock in list(self._held.values()):
            await self._release(lock)
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        await self.redis.aclose()

    async def _listen(self) -> None:
        """Release requests for any upload; those for a lock held here reach its holder."""
        while True:
            try:
                async for message in self._pubsub.listen():
                    if message.get("type") != "pmessage":
                        continue
                    channel = message["channel"]
                    upload_id = (channel.decode() if isinstance(channel, bytes) else str(channel))[len(RELEASE_PREFIX):]
                    lock = self._held.get(upload_id)
                    if lock is not None:
                        lock.request_release()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis went away: resubscribe when it is back
                log.warning("tus: lock release channel lost (%s); resubscribing", e)
                await asyncio.sleep(1)
                with contextlib.suppress(Exception):
                    await self._pubsub.psubscribe(RELEASE_PREFIX + "*")

    async def acquire(self, upload_id: str, on_release_request: ReleaseRequest, within: float) -> RedisLock:
        """Take the lock, asking its holder (on any replica) to let go; ``LOCK_TIMEOUT`` after ``within`` s."""
        deadline = time.monotonic() + within
        asked_at = 0.0
        while True:
            local = self._held.get(upload_id)
            if local is not None:
                local.request_release()
                try:
                    await asyncio.wait_for(local.released.wait(), max(deadline - time.monotonic(), 0))
                except TimeoutError:
                    raise errors.LOCK_TIMEOUT from None
                continue
            lock = await self._try(upload_id, on_release_request)
            if lock is not None:
                return lock
            now = time.monotonic()
            if now - asked_at >= _ASK_EVERY:
                asked_at = now
                await self.redis.publish(RELEASE_PREFIX + upload_id, b"release")
            remaining = deadline - now
            if remaining <= 0:
                raise errors.LOCK_TIMEOUT
            await asyncio.sleep(min(self.poll, remaining))

    async def try_acquire(self, upload_id: str) -> RedisLock | None:
        """Take the lock only if nobody holds it; interrupts nobody (sweeps, deletes after import)."""
        if upload_id in self._held:
            return None
        return await self._try(upload_id, lambda: None)

    async def _try(self, upload_id: str, on_release: ReleaseRequest) -> RedisLock | None:
        token = secrets.token_hex(16)
        if not await self.redis.set(LOCK_PREFIX + upload_id, token, nx=True, px=self.lease_ms):
            return None
        if upload_id in self._held:  # a local request won the race while we awaited Redis
            await self.redis.eval(_RELEASE, 1, LOCK_PREFIX + upload_id, token)
            return None
        lock = RedisLock(self, upload_id, token, on_release)
        self._held[upload_id] = lock
        lock.renewer = asyncio.get_running_loop().create_task(self._renew(lock), name=f"tus-lock-{upload_id[:8]}")
        return lock

    async def _renew(self, lock: RedisLock) -> None:
        every = self.lease_ms / 3000
        while not lock.released.is_set():
            await asyncio.sleep(every)
            try:
                ok = await self.redis.eval(_RENEW, 1, LOCK_PREFIX + lock.upload_id, lock.token, self.lease_ms)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("tus: renewing the lock of %s failed: %s", lock.upload_id, e)
                continue  # the lease still runs; the next attempt may succeed
            if not ok:
                log.error("tus: the lock of upload %s was lost (its lease ran out); stopping its request",
                          lock.upload_id)
                lock.request_release()
                return

    async def _release(self, lock: RedisLock) -> None:
        if lock.released.is_set():
            return
        if self._held.get(lock.upload_id) is lock:
            del self._held[lock.upload_id]
        if lock.renewer is not None:
            lock.renewer.cancel()
        try:
            await self.redis.eval(_RELEASE, 1, LOCK_PREFIX + lock.upload_id, lock.token)
        except Exception as e:  # the lease runs out on its own
            log.warning("tus: releasing the lock of %s failed (%s); it expires with its lease", lock.upload_id, e)
        finally:
            lock.released.set()
