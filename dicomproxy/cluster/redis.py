"""The Redis connection of a replica (``Cluster:Redis``), from redis-py (its asyncio API).

Every client made here has short timeouts and bounded retries with exponential backoff, so a
Redis that is down gives a clear error within about a second instead of a hung request; the
URL (which may carry a password) never reaches a log: :func:`where` names only host and port.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from dicomproxy.config.settings import Settings

PREFIX = "dicomproxy:"  # every key this gateway writes starts with it
TIMEOUT = 1.0  # seconds: connect and each command (blocking reads pass their own, shorter, block time)
RETRIES = 3
CALL_CONNECTIONS = 16  # connect_calls: a call holds one for ~0.2 ms, so 16 carry tens of thousands a second


class ClusterUnavailable(RuntimeError):
    """Redis (``Cluster:Redis``) cannot be reached; the message names where and what to check."""


def where(url: str) -> str:
    """``host:port`` of the URL, never its password."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


def unavailable(url: str, error: BaseException) -> ClusterUnavailable:
    return ClusterUnavailable(
        f"Redis at {where(url)} (Cluster:Redis) is unavailable: {type(error).__name__}: {error}; check that "
        "redis-server runs there and the URL and password are right")


def _options(settings: Settings) -> dict[str, Any]:
    password = settings.cluster.redis_password
    return {
        **({"password": password} if password else {}),  # Cluster:RedisPassword: never in the URL
        "socket_connect_timeout": TIMEOUT,
        "socket_timeout": TIMEOUT + 5.0,  # above the longest blocking read (XREADGROUP BLOCK)
        "health_check_interval": 15,
        "decode_responses": True,
    }


def connect(settings: Settings) -> redis.asyncio.Redis:
    """The asyncio client of ``Cluster:Redis`` (a pool: one per replica)."""
    retry = redis.asyncio.retry.Retry(ExponentialBackoff(cap=1.0, base=0.05), RETRIES)
    return redis.asyncio.Redis.from_url(settings.cluster.redis, retry=retry, **_options(settings))


def connect_calls(settings: Settings) -> redis.asyncio.Redis:
    """An asyncio client for short calls made on a request's path (``SharedDict`` from Lua):
    replies as bytes (a Lua string need not be UTF-8), every socket operation bounded by
    :data:`TIMEOUT` (no blocking reads here) and two retries, so a Redis that is down fails a call
    within a few seconds, never holds it. Its pool holds up to :data:`CALL_CONNECTIONS`: the
    caller bounds how many calls run at once below that (redis-py's pool refuses one more)."""
    retry = redis.asyncio.retry.Retry(ExponentialBackoff(cap=0.5, base=0.05), 2)
    opts = _options(settings)
    opts.update(socket_timeout=TIMEOUT, decode_responses=False)
    return redis.asyncio.Redis.from_url(settings.cluster.redis, retry=retry, max_connections=CALL_CONNECTIONS, **opts)


def connect_sync(settings: Settings) -> redis.Redis:
    """A blocking client for the few calls that must be durable before a synchronous caller
    returns (``submit``: Lua's ``LuaBackgroundWorker`` and the TUS finish are synchronous); one
    loopback round trip (~0.1 ms), bounded by :data:`TIMEOUT` when Redis is down."""
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), 2)
    opts = _options(settings)
    opts["socket_timeout"] = TIMEOUT
    return redis.Redis.from_url(settings.cluster.redis, retry=retry, **opts)
