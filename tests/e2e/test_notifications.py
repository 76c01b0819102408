"""Notifications through the real gateway: ShowNotification, onNotificationShow, app events,
the JSON feed and the Server-Sent Events stream."""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.peers import GatewayProcess, wait_until

SCRIPT = r"""
function onNotificationShow(n)
  if n.Title == "secret" then return true end
  if n.Title == "edit me" then
    n.Title = "edited"
    n.Body = n.Body .. " (seen by onNotificationShow)"
  end
  if n.Kind == "script.failed" then n.Link = "/dicomproxy/ui" end
  return false
end

local notes = {
  ["/test/notify/plain"] = {Title = "plain one", Body = "hello", Link = "/dicomproxy/ui"},
  ["/test/notify/edit"] = {Title = "edit me", Body = "body"},
  ["/test/notify/secret"] = {Title = "secret", Body = "never shown"},
  ["/test/notify/bad"] = {Title = "x", Link = "javascript:alert(1)"},
  ["/test/notify/untitled"] = {Body = "no title"},
}

function onHttpRequest(req)
  local n = notes[req.Path]
  if n == nil then return false end
  local ok, err = pcall(ShowNotification, n)
  req:ResponseWrite(ok and "shown" or ("error: " .. tostring(err)))
  return true
end
"""


class SseReader:
    """Reads an SSE response on a thread; ``events`` collects the parsed ``notification`` events.

    Plain ``http.client`` so that ``close()`` can shut the socket down under the reading thread.
    """

    def __init__(self, base_url: str, path: str, headers: dict[str, str] | None = None) -> None:
        parts = urlsplit(base_url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        self.conn.request("GET", path, headers=headers or {})
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.content_type = self.response.getheader("Content-Type", "")
        self.events: list[dict[str, Any]] = []
        self.ids: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        event: dict[str, str] = {}
        try:
            while raw := self.response.readline():
                line = raw.decode().rstrip("\r\n")
                if line == "":
                    if event.get("event") == "notification":
                        self.ids.append(event.get("id", ""))
                        self.events.append(json.loads(event["data"]))
                    event = {}
                elif not line.startswith(":") and ":" in line:
                    key, _, value = line.partition(":")
                    event[key] = value[1:] if value.startswith(" ") else value
        except Exception:  # close() pulls the socket away mid-read
            pass

    def titles(self) -> list[str]:
        return [e["title"] for e in self.events]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.conn.sock is not None:
                self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()
        self._thread.join(5)
        assert not self._thread.is_alive()


@pytest.fixture
def gateway(gateway_factory: Callable[..., GatewayProcess]) -> GatewayProcess:
    return gateway_factory({"Notifications": {"FeedSize": 5}}, {"main.lua": SCRIPT})


@pytest.fixture
def stream(gateway: GatewayProcess) -> Iterator[Callable[..., SseReader]]:
    readers: list[SseReader] = []

    def open_stream(path: str = "/dicomproxy/notifications/stream", **headers: str) -> SseReader:
        reader = SseReader(gateway.url, path, headers)
        assert reader.status == 200
        assert reader.content_type.startswith("text/event-stream")
        readers.append(reader)
        return reader

    yield open_stream
    for reader in readers:
        reader.close()


def show(gateway: GatewayProcess, what: str) -> str:
    resp = gateway.get(f"/test/notify/{what}", timeout=10)
    assert resp.status_code == 200, (resp.status_code, resp.text, gateway.log_text()[-3000:])
    return resp.text


def feed(gateway: GatewayProcess, query: str = "") -> list[dict[str, Any]]:
    resp = gateway.get("/dicomproxy/notifications" + query)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    return resp.json()


def test_show_notification_hook_feed_and_stream(
    gateway: GatewayProcess, stream: Callable[..., SseReader]
) -> None:
    live = stream()
    via_accept = stream("/dicomproxy/notifications", Accept="text/event-stream")
    assert show(gateway, "secret") == "shown"  # the call succeeds; the hook suppresses it
    show(gateway, "edit")
    show(gateway, "plain")
    wait_until(lambda: len(live.events) >= 2 and len(via_accept.events) >= 2, what="2 events on both streams")
    # counted as suppressed once onNotificationShow returned true: it will never be published
    wait_until(lambda: gateway.metric("dicomproxy_notifications_total", kind="script", outcome="suppressed") == 1,
               what="the secret one counted as suppressed")
    assert live.titles() == ["edited", "plain one"]
    assert via_accept.titles() == ["edited", "plain one"]
    edited, plain = live.events
    assert edited["body"] == "body (seen by onNotificationShow)" and edited["kind"] == "script"
    assert (plain["title"], plain["body"], plain["link"]) == ("plain one", "hello", "/dicomproxy/ui")
    assert plain["level"] == "info" and plain["id"] > edited["id"]
    assert live.ids == [str(edited["id"]), str(plain["id"])]

    items = feed(gateway)
    assert [n["title"] for n in items] == ["plain one", "edited"]  # newest first
    assert "secret" not in json.dumps(items)
    assert [n["title"] for n in feed(gateway, f"?after={edited['id']}")] == ["plain one"]
    assert gateway.metric("dicomproxy_notifications_total", kind="script", outcome="shown") == 2
    assert gateway.metric("dicomproxy_notification_streams") == 2

    # A reconnecting EventSource sends Last-Event-ID and gets what it missed first.
    again = stream(**{"Last-Event-ID": str(edited["id"])})
    wait_until(lambda: again.events, what="the replayed event")
    assert again.titles() == ["plain one"]


def test_show_notification_errors_name_the_field(gateway: GatewayProcess) -> None:
    text = show(gateway, "bad")
    assert text.startswith("error: ") and "ShowNotification: Link:" in text
    assert "'javascript:alert(1)'" in text
    assert "ShowNotification: Title: a non-empty title is required" in show(gateway, "untitled")
    # refused before anything was queued: a good one shown afterwards is the only one in the feed
    show(gateway, "plain")
    items = wait_until(lambda: feed(gateway), what="the good notification in the feed")
    assert [n["title"] for n in items] == ["plain one"]


def test_feed_is_bounded(gateway: GatewayProcess) -> None:
    for _ in range(7):
        show(gateway, "plain")
    items = wait_until(lambda: (f := feed(gateway)) and f[0]["id"] == 7 and f, what="7 notifications")
    assert [n["id"] for n in items] == [7, 6, 5, 4, 3]  # Notifications:FeedSize 5


def test_app_event_becomes_a_notification(gateway: GatewayProcess, stream: Callable[..., SseReader]) -> None:
    live = stream()
    # A broken edit: the old script stays (with its onNotificationShow) and script.failed is raised.
    gateway.write_script("main.lua", SCRIPT + "\nthis is not lua (\n")
    wait_until(lambda: live.events, timeout=20, what="a script.failed notification on the stream")
    event = live.events[0]
    assert event["kind"] == "script.failed" and event["level"] == "error"
    assert "main.lua" in event["title"] + event["body"]
    assert event["link"] == "/dicomproxy/ui"  # set by the old script's onNotificationShow
    assert feed(gateway)[0]["id"] == event["id"]
    show(gateway, "plain")  # the old script still answers
    wait_until(lambda: len(live.events) == 2, what="the next notification")


def test_open_stream_does_not_hold_up_shutdown(gateway: GatewayProcess,
                                               stream: Callable[..., SseReader]) -> None:
    live = stream()
    show(gateway, "plain")
    wait_until(lambda: live.events, what="the first event")
    started = time.monotonic()
    # SIGTERM: a graceful exit (uvicorn re-raises the signal, hence -SIGTERM), not the SIGKILL
    # stop() sends after 9 s when the open stream holds the shutdown up.
    assert gateway.stop(timeout=9) in (0, -signal.SIGTERM)
    assert time.monotonic() - started < 8


def test_pacs_unreachable_and_back(gateway_factory: Callable[..., GatewayProcess],
                                   orthanc_factory: Callable[..., Any]) -> None:
    pacs = orthanc_factory()
    gateway = gateway_factory({}, {"main.lua": SCRIPT}, orthanc=pacs)
    probe = "/dicomproxy/health?probe=1"  # the monitor probes every 10 s; this probes now
    assert gateway.get(probe).json()["upstream"]["reachable"] is True
    pacs.stop()
    assert gateway.get(probe).json()["upstream"]["reachable"] is False
    down = wait_until(lambda: [n for n in feed(gateway) if n["kind"] == "upstream.down"],
                      what="an upstream.down notification")[0]
    assert down["title"] == "PACS unreachable" and down["level"] == "error"
    assert pacs.http_url in down["body"]
    pacs.start()
    assert gateway.get(probe).json()["upstream"]["reachable"] is True
    up = wait_until(lambda: [n for n in feed(gateway) if n["kind"] == "upstream.up"],
                    what="an upstream.up notification")[0]
    assert up["level"] == "success" and up["id"] > down["id"]
