"""The notification feed shared by replicas on Redis (``Cluster:Redis``).

Publishing one notification is one atomic Lua script on Redis: ``INCR`` the cluster-wide id,
``LPUSH`` its JSON to ``dicomproxy:notifications`` and ``LTRIM`` it to ``Notifications:FeedSize``
(the shared, capped feed), ``PUBLISH`` it on ``dicomproxy:notifications:live``. Every replica -
the raising one too - subscribes to that channel and adds what arrives to its local window, so an
SSE client on replica A sees what replica B raised, with the same id (``Last-Event-ID`` works
across replicas). A replica that starts, or whose subscription comes back after Redis was down,
first reads the list, so nothing the feed still holds is missed.

Mail rules are not fanned out: they listen to the app events of their own replica, and an event
happens on exactly one replica (the one whose task failed, whose upload was imported), so each
rule sends once per event with any number of replicas and no dedupe key is needed. Only the
notification feed crosses replicas.

Redis down: the notification is still shown on this replica (a local id, logged) and health's
``cluster`` part says the feed is not shared; the subscriber reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import redis
import redis.asyncio

from dicomproxy.cluster.redis import PREFIX, unavailable
from dicomproxy.notify.notifications import Notification, NotificationFeed, _json_safe

log = logging.getLogger("dicomproxy.cluster.feed")

FEED = PREFIX + "notifications"
SEQ = PREFIX + "notifications:seq"
CHANNEL = PREFIX + "notifications:live"

PUBLISH = """
local id = redis.call('INCR', KEYS[2])
local item = cjson.decode(ARGV[1])
item['id'] = id
local text = cjson.encode(item)
redis.call('LPUSH', KEYS[1], text)
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
redis.call('PUBLISH', KEYS[3], text)
return id
"""


def _from_json(raw: str) -> Notification:
    d = json.loads(raw)
    return Notification(int(d["id"]), float(d["time"]), d["kind"], d["title"], d.get("body", ""),
                        d.get("link", ""), d.get("data") or {})


class ClusterFeed(NotificationFeed):
    """A :class:`NotificationFeed` whose items come from Redis. A gateway component."""

    def __init__(self, url: str, client: redis.asyncio.Redis, size: int, subscriber_backlog: int = 256) -> None:
        super().__init__(size, subscriber_backlog)
        self.url = url
        self.redis = client
        self.size = size
        self._last = 0
        self._listener: asyncio.Task[None] | None = None
        self._script: Any = None
        self.error: str | None = None
        self._connected = asyncio.Event()

    def insert(self, item: Notification) -> None:
        """Add one that came from Redis (any replica): once, in id order."""
        if item.id <= self._last:
            return
        self._last = item.id
        self._next_id = max(self._next_id, item.id + 1)
        self._items.append(item)
        for sub in list(self._subscribers):
            if not sub.push(item):
                log.info("notification stream subscriber fell behind; closing it")
                self._drop(sub)

    async def publish(self, kind: str, title: str, body: str = "", link: str = "",
                      data: Mapping[str, Any] | None = None) -> Notification:
        local = Notification(0, 0.0, kind, title, body, link, _json_safe(data or {}))
        record: dict[str, Any] = {"time": time.time(), "kind": kind, "title": title, "body": body, "link": link,
                  "data": local.data}
        try:
            if self._script is None:
                self._script = self.redis.register_script(PUBLISH)
            new_id = int(await self._script(keys=[FEED, SEQ, CHANNEL], args=[json.dumps(record), self.size]))
        except redis.RedisError as e:
            self.error = str(unavailable(self.url, e))
            log.error("notification %r shown on this replica only: %s", title, self.error)
            item = Notification(self._next_id, record["time"], kind, title, body, link, local.data)
            self.insert(item)
            return item
        return Notification(new_id, record["time"], kind, title, body, link, local.data)

    # ------------------------------------------------------------------ component
    async def start(self) -> None:
        self._listener = asyncio.get_running_loop().create_task(self._listen())
        with contextlib.suppress(TimeoutError):  # Redis down: start anyway, health says so
            async with asyncio.timeout(3):
                await self._connected.wait()

    def drain(self) -> None:
        pass

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    async def _listen(self) -> None:
        """Subscribe, catch up from the list, then add what is published; reconnect with backoff."""
        backoff = 0.1
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                held: Any = await self.redis.lrange(FEED, 0, self.size - 1)
                for raw in reversed(held):
                    self.insert(_from_json(raw))
                if self.error is not None:
                    log.warning("notification feed shared on Redis again")
                self.error = None
                backoff = 0.1
                self._connected.set()
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is not None and message.get("type") == "message":
                        self.insert(_from_json(message["data"]))
            except asyncio.CancelledError:
                raise
            except (redis.RedisError, OSError, ValueError, KeyError) as e:
                message_text = str(unavailable(self.url, e))
                if self.error is None:
                    log.error("notification feed: %s; retrying", message_text)
                self.error = message_text
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def status(self) -> dict[str, Any]:
        return {"shared": self.error is None, **({"error": self.error} if self.error else {})}
