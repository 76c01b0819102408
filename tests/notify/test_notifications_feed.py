"""Unit tests of the notification feed, its HTTP app and the hook logic (a stand-in ScriptHost).

The same behaviour through the real gateway, Lua and HTTP is in tests/test_notifications.py.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from dicomproxy.notify.events import AppEvent
from dicomproxy.notify.notifications import (
    NotificationError,
    NotificationFeed,
    NotificationsApp,
    Notifier,
    parse_notification,
)


def test_feed_is_bounded_and_newest_first() -> None:
    feed = NotificationFeed(size=3)
    for i in range(5):
        feed.add("script", f"n{i}")
    assert [n.title for n in feed.items()] == ["n4", "n3", "n2"]
    assert [n.id for n in feed.items()] == [5, 4, 3]
    assert [n.title for n in feed.items(limit=1)] == ["n4"]
    assert [n.title for n in feed.items(after=3)] == ["n4", "n3"]


def test_levels_and_json_shape() -> None:
    feed = NotificationFeed(10)
    failed = feed.add("import.failed", "Import failed", "why", "/dicomproxy/ui",
                      {"upload": "abc", "obj": object()})
    ok = feed.add("upload.imported", "Imported")
    assert failed.level == "error" and ok.level == "success" and feed.add("script", "x").level == "info"
    data = failed.to_json()
    assert set(data) == {"id", "time", "kind", "level", "title", "body", "link", "data"}
    assert data["data"]["upload"] == "abc" and isinstance(data["data"]["obj"], str)
    assert data["time"].endswith("Z")
    json.dumps(data)


def test_parse_notification_checks_fields() -> None:
    assert parse_notification({"Title": "T", "Body": "B", "Link": "/x"}, "S") == ("T", "B", "/x")
    link = "https://pacs.example/x"
    assert parse_notification({"title": "T", "link": link}, "S") == ("T", "", link)
    assert parse_notification("just a title", "S") == ("just a title", "", "")
    with pytest.raises(NotificationError, match="ShowNotification: Title: a non-empty title is required"):
        parse_notification({"Body": "b"}, "ShowNotification")
    with pytest.raises(NotificationError, match=r"ShowNotification: Link: .*'javascript:alert\(1\)'"):
        parse_notification({"Title": "t", "Link": "javascript:alert(1)"}, "ShowNotification")
    with pytest.raises(NotificationError, match=r"unknown field 'Text'"):
        parse_notification({"Title": "t", "Text": "x"}, "ShowNotification")
    with pytest.raises(NotificationError, match=r"Body: expected a string"):
        parse_notification({"Title": "t", "Body": {"a": 1}}, "ShowNotification")


async def test_slow_subscriber_is_dropped_not_buffered_forever() -> None:
    feed = NotificationFeed(100, subscriber_backlog=2)
    sub = feed.subscribe()
    for i in range(3):
        feed.add("script", f"n{i}")
    assert feed.subscriber_count == 0
    with pytest.raises(EOFError):
        await sub.next(1)


@dataclass
class FakeDispatch:
    handled: bool = False
    args: list[Any] = field(default_factory=list)


class FakeHost:
    """Stands in for ScriptHost: ``script`` plays onNotificationShow."""

    def __init__(self, script: Any) -> None:
        self.script = script
        self.calls: list[dict[str, Any]] = []

    def defines(self, name: str) -> bool:
        return name == "onNotificationShow"

    async def dispatch(self, name: str, table: dict[str, Any]) -> FakeDispatch:
        self.calls.append(dict(table))
        handled = self.script(table)
        return FakeDispatch(bool(handled), [table])


async def test_hook_can_suppress_and_edit() -> None:
    def script(n: dict[str, Any]) -> bool:
        if n["Kind"] == "upstream.down":
            return True
        n["Title"] = n["Title"].upper()
        return False

    feed = NotificationFeed(10)
    notifier = Notifier(feed, FakeHost(script), fail_open=False)
    await notifier.start()
    assert await notifier.show("pacs down", kind="upstream.down") is None
    shown = await notifier.show("imported", "3 instances", "/x", kind="upload.imported")
    assert shown is not None and shown.title == "IMPORTED" and shown.body == "3 instances"
    assert [n.title for n in feed.items()] == ["IMPORTED"]
    assert notifier.suppressed == 1
    await notifier.stop()


async def test_events_from_other_threads_reach_the_feed() -> None:
    feed = NotificationFeed(10)
    notifier = Notifier(feed, FakeHost(lambda n: False), fail_open=False)
    await notifier.start()
    event = AppEvent("forward.failed", "Forward failed", "gave up", "", {"sop": "1.2.3"})
    await asyncio.to_thread(notifier.on_event, event)
    for _ in range(100):
        if feed.items():
            break
        await asyncio.sleep(0.01)
    (item,) = feed.items()
    assert item.kind == "forward.failed" and item.data == {"sop": "1.2.3"}
    await notifier.stop()


async def _call(app: NotificationsApp, path: str, headers: dict[str, str] | None = None,
                query: str = "", until: int = 1, wait: float = 5) -> tuple[int, dict[str, str], str]:
    """Drive the ASGI app; stop reading after ``until`` SSE events (or the end of the body)."""
    scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": query.encode(), "headers": [(k.lower().encode(), v.encode())
                                                         for k, v in (headers or {}).items()]}
    status, got_headers, body = 0, {}, []
    done = asyncio.Event()
    disconnect = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, got_headers
        if message["type"] == "http.response.start":
            status = message["status"]
            got_headers = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            body.append(message.get("body", b"").decode())
            if "".join(body).count("event: notification") >= until or not message.get("more_body"):
                done.set()

    task = asyncio.create_task(app(scope, receive, send))
    await asyncio.wait_for(done.wait(), wait)
    disconnect.set()
    await asyncio.wait_for(task, wait)
    return status, got_headers, "".join(body)


async def test_http_json_and_sse_replay_and_live() -> None:
    feed = NotificationFeed(10)
    app = NotificationsApp(feed)
    feed.add("script", "first")
    feed.add("script", "second")
    status, headers, body = await _call(app, "/dicomproxy/notifications")
    assert status == 200 and headers["content-type"] == "application/json"
    assert [n["title"] for n in json.loads(body)] == ["second", "first"]
    status, _, body = await _call(app, "/dicomproxy/notifications", query="after=1&limit=5")
    assert [n["title"] for n in json.loads(body)] == ["second"]
    status, _, _ = await _call(app, "/dicomproxy/notifications", query="limit=x")
    assert status == 400

    # SSE: Last-Event-ID 1 replays #2, then a live one arrives.
    loop = asyncio.get_running_loop()
    loop.call_later(0.2, feed.add, "script", "third")
    status, headers, body = await _call(app, "/dicomproxy/notifications/stream",
                                        headers={"Last-Event-ID": "1"}, until=2)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [block for block in body.split("\n\n") if "event: notification" in block]
    assert [json.loads(e.split("data: ", 1)[1])["title"] for e in events] == ["second", "third"]
    assert events[0].startswith("id: 2\n")

    # Accept: text/event-stream on the feed URL is the stream too
    loop.call_later(0.1, feed.add, "script", "fourth")
    _, headers, body = await _call(app, "/dicomproxy/notifications", headers={"Accept": "text/event-stream"})
    assert headers["content-type"].startswith("text/event-stream") and '"fourth"' in body


async def test_stream_ends_when_the_feed_closes() -> None:
    feed = NotificationFeed(10)
    app = NotificationsApp(feed)
    asyncio.get_running_loop().call_later(0.2, feed.close)
    status, _, body = await _call(app, "/dicomproxy/notifications/stream", until=99)
    assert status == 200 and body.startswith("retry: 2000")
