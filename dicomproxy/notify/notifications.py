"""Notifications: what the gateway wants a person to see, in a bounded feed and a live stream.

Sources: every app event on the :class:`~dicomproxy.notify.events.EventBus` (an upload imported, an
import or forward failed, the PACS went down or came back, a script failed to load, a task or
a mail failed) and ``ShowNotification({Title=, Body=, Link=})`` from scripts. Before one is
shown, ``onNotificationShow(notification)`` runs (singleton, then transient engine): ``true``
suppresses it, edits to ``Title``/``Body``/``Link`` are kept. The table also carries ``Kind``
(the event kind, or ``"script"``) so a script can decide by kind; changing it has no effect.

HTTP (mounted at ``/dicomproxy/notifications``):

* ``GET /dicomproxy/notifications`` - JSON array, newest first. ``?limit=N`` caps it,
  ``?after=ID`` keeps only newer ones than ``ID``.
* ``GET /dicomproxy/notifications/stream`` (or the same URL as above with
  ``Accept: text/event-stream``) - Server-Sent Events: ``event: notification``, ``id:`` the
  notification id, ``data:`` its JSON. A reconnecting ``EventSource`` sends ``Last-Event-ID``
  and gets what it missed (as far as the feed still holds it) before the live ones.

The feed holds the last ``Notifications:FeedSize`` notifications, in memory: it is a window on
what is happening now, not an audit log (the log has everything).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from dicomproxy_middleware import LuaExportError
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from dicomproxy.host import Host
from dicomproxy.http.mount import mount_subpath
from dicomproxy.metrics import Counter
from dicomproxy.notify.events import AppEvent, create_task_threadsafe
from dicomproxy.notify.mail import to_python

log = logging.getLogger(__name__)

PREFIX = "/dicomproxy/notifications"
NOTIFICATION_FIELDS = ("Title", "Body", "Link")
MAX_TITLE = 300
MAX_BODY = 8000
ERROR_KINDS = frozenset({"import.failed", "forward.failed", "script.failed", "task.failed",
                         "upstream.down", "mail.failed", "certificate.failed"})
SUCCESS_KINDS = frozenset({"upload.imported", "upstream.up"})


class NotificationError(ValueError):
    """A notification that cannot be shown as given; the message names the field and value."""


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _json_safe(data: Mapping[str, Any]) -> dict[str, Any]:
    """Event data for the JSON feed: what JSON can carry, the rest as its ``str``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        try:
            json.dumps(value)
            out[str(key)] = value
        except (TypeError, ValueError):
            out[str(key)] = str(value)
    return out


def check_link(value: str, where: str) -> str:
    """A link is a path on this gateway or an http(s) URL: anything else (``javascript:``)
    would run in the status page when clicked."""
    if value == "" or value.startswith("/") and not value.startswith("//"):
        return value
    if value.lower().startswith(("http://", "https://")):
        return value
    raise NotificationError(f"{where}: Link: expected a path (/...) or an http(s) URL, got {value!r}")


def parse_notification(obj: Any, where: str) -> tuple[str, str, str]:
    """``{Title, Body, Link}`` from Lua, checked: ``Title`` is required, no unknown fields."""
    obj = to_python(obj)
    if isinstance(obj, str | bytes):  # ShowNotification("text") is a natural shorthand
        obj = {"Title": obj}
    if not isinstance(obj, Mapping):
        raise NotificationError(f"{where}: expected a table {{Title=, Body=, Link=}}, got {obj!r}")
    fields: dict[str, str] = {}
    for key, value in obj.items():
        name = next((f for f in (*NOTIFICATION_FIELDS, "Kind") if isinstance(key, str)
                     and f.lower() == key.lower()), None)
        if name is None:
            raise NotificationError(
                f"{where}: unknown field {key!r} (expected {', '.join(NOTIFICATION_FIELDS)})")
        if name == "Kind":
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if value is None:
            value = ""
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise NotificationError(f"{where}: {name}: expected a string, got {value!r}")
        fields[name] = str(value)
    title = fields.get("Title", "").strip()
    if not title:
        raise NotificationError(f"{where}: Title: a non-empty title is required, got {obj!r}")
    link = check_link(fields.get("Link", "").strip(), where)
    return _clip(title, MAX_TITLE), _clip(fields.get("Body", ""), MAX_BODY), link


# ----------------------------------------------------------------------------- the feed
@dataclass(frozen=True)
class Notification:
    id: int
    time: float
    kind: str
    title: str
    body: str = ""
    link: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def level(self) -> str:
        """``error``/``success``/``info``: how the status page colours it."""
        if self.kind in ERROR_KINDS:
            return "error"
        return "success" if self.kind in SUCCESS_KINDS else "info"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.time))
            + f".{int(self.time * 1000) % 1000:03d}Z",
            "kind": self.kind,
            "level": self.level,
            "title": self.title,
            "body": self.body,
            "link": self.link,
            "data": self.data,
        }


class Subscription:
    """One live listener (an SSE client). Closed by the feed when it falls too far behind."""

    def __init__(self, maxsize: int) -> None:
        self.queue: asyncio.Queue[Notification | None] = asyncio.Queue(maxsize)
        self.closed = False

    def push(self, item: Notification | None) -> bool:
        if self.closed:
            return False
        try:
            self.queue.put_nowait(item)
            return True
        except asyncio.QueueFull:
            return False

    async def next(self, wait: float) -> Notification | None:
        """The next notification; ``None`` after ``wait`` s. Raises ``EOFError`` once closed."""
        try:
            item = await asyncio.wait_for(self.queue.get(), wait)
        except TimeoutError:
            if self.closed and self.queue.empty():
                raise EOFError from None
            return None
        if item is None:
            raise EOFError
        return item


class NotificationFeed:
    """The last ``size`` notifications and the live subscribers. Event-loop thread only."""

    def __init__(self, size: int, subscriber_backlog: int = 256) -> None:
        self._items: deque[Notification] = deque(maxlen=size)
        self._next_id = 1
        self._subscribers: set[Subscription] = set()
        self._backlog = subscriber_backlog
        self.closed = False

    def add(self, kind: str, title: str, body: str = "", link: str = "",
            data: Mapping[str, Any] | None = None) -> Notification:
        item = Notification(self._next_id, time.time(), kind, title, body, link, _json_safe(data or {}))
        self._next_id += 1
        self._items.append(item)
        for sub in list(self._subscribers):
            if not sub.push(item):
                # Too far behind: end its stream; EventSource reconnects with Last-Event-ID
                # and gets the gap from the feed. A stuck client must not grow memory.
                log.info("notification stream subscriber fell behind; closing it")
                self._drop(sub)
        return item

    async def publish(self, kind: str, title: str, body: str = "", link: str = "",
                      data: Mapping[str, Any] | None = None) -> Notification:
        """Add one (the shared feed, :class:`dicomproxy.cluster.feed.ClusterFeed`, goes through Redis)."""
        return self.add(kind, title, body, link, data)

    def items(self, limit: int | None = None, after: int | None = None) -> list[Notification]:
        """Newest first."""
        out = [n for n in reversed(self._items) if after is None or n.id > after]
        return out[:limit] if limit is not None else out

    def subscribe(self) -> Subscription:
        sub = Subscription(self._backlog)
        if self.closed:
            self._drop(sub)
        else:
            self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    def _drop(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)
        while not sub.queue.empty():
            sub.queue.get_nowait()
        sub.push(None)  # the end-of-stream marker
        sub.closed = True

    def close(self) -> None:
        """End every live stream (shutdown)."""
        self.closed = True
        for sub in list(self._subscribers):
            self._drop(sub)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)


# ----------------------------------------------------------------------------- Notifier
# Set while onNotificationShow runs: a ShowNotification from inside it skips the hook.
_IN_SHOW_HOOK: contextvars.ContextVar[bool] = contextvars.ContextVar("in_onNotificationShow", default=False)


class Notifier:
    """Runs ``onNotificationShow`` and adds what survives to the feed. A gateway component.

    Bus events may be emitted from any thread (the DICOM side runs in pynetdicom threads);
    they are moved onto the event loop here, where Lua and the feed live.
    """

    def __init__(self, feed: NotificationFeed, host: Any, fail_open: bool, counter: Counter | None = None) -> None:
        self.feed = feed
        self.counter = counter  # dicomproxy_notifications_total{kind, outcome=shown|suppressed}
        self.host = host
        self.fail_open = fail_open
        self.suppressed = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    def drain(self) -> None:
        """Shutdown began: end the live streams (EventSource reconnects, elsewhere or after restart)."""
        self.feed.close()

    async def stop(self) -> None:
        self.feed.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def show(self, title: str, body: str = "", link: str = "", kind: str = "script",
                   data: Mapping[str, Any] | None = None) -> Notification | None:
        """Run the hook, then add to the feed. ``None`` when a script suppressed it."""
        where = f"notification {kind!r}"
        if not _IN_SHOW_HOOK.get() and self.host.defines("onNotificationShow"):
            token = _IN_SHOW_HOOK.set(True)
            try:
                result = await self.host.dispatch(
                    "onNotificationShow", {"Title": title, "Body": body, "Link": link, "Kind": kind})
            except Exception as e:
                if not self.fail_open:
                    log.error("%s %r not shown: onNotificationShow failed: %s", where, title, e)
                    return None
                log.error("%s: onNotificationShow failed (%s); shown unedited (Lua:FailOpen)", where, e)
                result = None
            finally:
                _IN_SHOW_HOOK.reset(token)
            if result is not None:
                if result.handled:
                    self.suppressed += 1
                    self._count(kind, "suppressed")
                    log.info("%s %r suppressed by onNotificationShow", where, title)
                    return None
                if result.args:
                    try:
                        title, body, link = parse_notification(
                            result.args[0], f"{where} (after onNotificationShow)")
                    except NotificationError as e:
                        log.error("%s: edits from onNotificationShow ignored: %s", where, e)
        item = await self.feed.publish(kind, title, body, link, data)
        self._count(kind, "shown")
        log.info("notification #%d [%s] %s", item.id, kind, title)
        return item

    def _count(self, kind: str, outcome: str) -> None:
        if self.counter is not None:
            self.counter.inc(kind=kind, outcome=outcome)

    def _spawn(self, coro: Any) -> None:
        loop = self._loop
        if loop is None:  # an event during start-up, before start() ran: we are on the loop
            try:
                loop = self._loop = asyncio.get_running_loop()
            except RuntimeError:
                coro.close()
                log.warning("notification dropped: the notifier is not started")
                return
        create_task_threadsafe(loop, coro, self._tasks, self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("showing a notification failed: %r", task.exception())

    def on_event(self, event: AppEvent) -> None:
        """Bus listener: every app event becomes a notification."""
        self._spawn(self.show(event.title, event.body, event.link, event.kind, event.data))

    def lua_show_notification(self, notification: Any) -> bool:
        """``ShowNotification({Title=, Body=, Link=})``: checked now, shown right after.

        A bad table is a Lua error naming the field. The hook runs after the script's call
        returns, so a script that shows a notification is never stalled by another script.
        """
        try:
            title, body, link = parse_notification(notification, "ShowNotification")
        except NotificationError as e:  # the runtime prefixes the export's name itself
            raise LuaExportError(str(e).removeprefix("ShowNotification: ")) from None
        self._spawn(self.show(title, body, link, "script"))
        return True


# ----------------------------------------------------------------------------- HTTP
class NotificationsApp:
    """ASGI app for ``/dicomproxy/notifications``: the JSON feed and the SSE stream."""

    def __init__(self, feed: NotificationFeed, prefix: str = PREFIX, heartbeat: float = 15.0) -> None:
        self.feed = feed
        self.prefix = prefix.rstrip("/")
        self.heartbeat = heartbeat

    def _subpath(self, scope: Scope) -> str:
        return mount_subpath(scope, self.prefix)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        sub = self._subpath(scope)
        response: Response
        if request.method not in ("GET", "HEAD"):
            response = PlainTextResponse("use GET\n", 405, headers={"Allow": "GET, HEAD"})
        elif sub == "/stream" or sub == "/" and "text/event-stream" in request.headers.get("accept", ""):
            response = self._stream(request)
        elif sub == "/":
            response = self._list(request)
        else:
            response = PlainTextResponse(
                f"not found; see {self.prefix} (JSON) or {self.prefix}/stream (SSE)\n", 404)
        await response(scope, receive, send)

    @staticmethod
    def _int_param(request: Request, name: str) -> int | None:
        raw = request.query_params.get(name)
        if raw is None or raw == "":
            return None
        try:
            return max(0, int(raw))
        except ValueError:
            return -1

    def _list(self, request: Request) -> Response:
        limit, after = self._int_param(request, "limit"), self._int_param(request, "after")
        if limit == -1 or after == -1:
            return JSONResponse({"error": "limit and after must be integers"}, 400)
        items = [n.to_json() for n in self.feed.items(limit, after)]
        return JSONResponse(items, headers={"Cache-Control": "no-store"})

    def _stream(self, request: Request) -> Response:
        last = request.headers.get("last-event-id") or request.query_params.get("after")
        try:
            after = int(last) if last else None
        except ValueError:
            after = None
        sub = self.feed.subscribe()  # before the replay, so nothing falls between the two
        backlog = list(reversed(self.feed.items(after=after))) if after is not None else []
        return StreamingResponse(
            self._events(sub, backlog),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def _events(self, sub: Subscription, backlog: list[Notification]) -> AsyncIterator[str]:
        try:
            yield "retry: 2000\n: connected\n\n"
            sent = 0
            for item in backlog:
                sent = item.id
                yield _sse(item)
            while True:
                try:
                    nxt = await sub.next(self.heartbeat)
                except EOFError:
                    return
                if nxt is None:
                    yield ": keep-alive\n\n"
                elif nxt.id > sent:
                    yield _sse(nxt)
        finally:
            self.feed.unsubscribe(sub)


def _sse(item: Notification) -> str:
    return f"id: {item.id}\nevent: notification\ndata: {json.dumps(item.to_json())}\n\n"


# ----------------------------------------------------------------------------- install
def install(gateway: Host) -> Notifier:
    """The feed, its HTTP routes, ``ShowNotification``, and every app event as a notification."""
    size = gateway.settings.notifications.feed_size
    feed: NotificationFeed
    if gateway.settings.cluster.redis:  # shared by the replicas (dicomproxy/cluster/feed.py)
        from dicomproxy.cluster.feed import ClusterFeed
        from dicomproxy.cluster.redis import connect

        feed = shared = ClusterFeed(gateway.settings.cluster.redis, connect(gateway.settings), size)
        gateway.add_component(shared)
    else:
        feed = NotificationFeed(size)
    counter = gateway.metrics.counter("dicomproxy_notifications_total",
                                      "Notifications by kind and outcome: shown, suppressed by onNotificationShow",
                                      labels=("kind", "outcome"))
    gateway.metrics.gauge("dicomproxy_notification_streams", "Open notification SSE streams",
                          lambda: feed.subscriber_count)
    notifier = Notifier(feed, gateway.lua, gateway.settings.lua.fail_open, counter)
    gateway.add_component(notifier)
    gateway.bus.subscribe(notifier.on_event)
    gateway.lua.add_export("ShowNotification", notifier.lua_show_notification)
    gateway.mount(PREFIX, NotificationsApp(feed))
    gateway.add_health("notifications", lambda: {
        "ok": getattr(feed, "error", None) is None,
        **(feed.status() if hasattr(feed, "status") else {}),
        "feed": len(feed.items()),
        "streams": feed.subscriber_count,
        "suppressed_by_script": notifier.suppressed,
    })
    return notifier
