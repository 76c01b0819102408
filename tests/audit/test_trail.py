"""AuditTrail's writer side: past full the newest are dropped and the gap is on record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dicomproxy.audit import events
from dicomproxy.audit.trail import AuditTrail
from dicomproxy.config.settings import load_settings
from dicomproxy.metrics import Metrics
from dicomproxy.notify.events import EventBus


def make(tmp_path: Path, **audit: Any) -> tuple[AuditTrail, list[Any]]:
    overrides = {"Audit:Enabled": "true", "Audit:BufferFolder": str(tmp_path / "buf"),
                 "Audit:File": str(tmp_path / "audit.jsonl"), **{f"Audit:{k}": v for k, v in audit.items()}}
    bus = EventBus()
    seen: list[Any] = []
    bus.subscribe(seen.append)
    trail = AuditTrail(load_settings(None, environ={}, overrides=overrides), bus, Metrics())
    trail._open()  # the writer's side only: no loop, no sender started
    return trail, seen


def login(i: int) -> events.AuditEvent:
    return events.user_authentication(f"user{i}", "10.0.0.1", True, via="HTTP basic authentication")


def test_full_buffer_drops_newest_and_records_the_gap(tmp_path: Path) -> None:
    trail, seen = make(tmp_path, BufferMaxMB="0.02", Collectors='["tls://127.0.0.1:9"]')
    n = 0
    while not trail.full:
        trail._persist([login(n)])
        n += 1
        assert n < 200
    trail._persist([login(n + i) for i in range(5)])
    assert trail.dropped == 6 and trail.health()["ok"] is False
    assert [e.kind for e in seen] == ["audit.buffer_full"] and "Audit:BufferMaxMB" in seen[0].body
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    alert = lines[n - 1]  # the n-th event did not fit: the alert took the headroom, then the event was dropped
    assert "Audit Recording Stopped" in alert["types"] and alert["seq"] > 0
    assert sum(1 for e in lines if e.get("buffered") is False) == 6  # still in the local file
    url = trail.senders[0].collector.url
    trail.journal.ack(url, trail.journal.last_seq)  # the collector took everything
    trail._persist([login(999)])
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert "Audit Recording Started" in lines[-2]["types"] and "6 audit message(s) were dropped" in lines[-2][
        "description"]
    assert lines[-1]["participants"][0]["userId"] == "user999" and not trail.full


def test_record_is_a_no_op_when_off_and_never_raises(tmp_path: Path) -> None:
    off = AuditTrail(load_settings(None, environ={}, overrides={}), EventBus(), Metrics())
    off.record(login(1))
    off.login("a", "b", False, via="x")
    assert not off._pending
    on, _ = make(tmp_path)
    on.record(object())  # type: ignore[arg-type]  # a broken event is queued, not raised
    on.defer(lambda: 1 / 0)
    on._persist(on._take())  # the writer logs and goes on
    on._persist([login(2)])
    assert json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])["seq"] == 1


def test_login_burst_raises_one_alert(tmp_path: Path) -> None:
    trail, _ = make(tmp_path, FailedLoginBurst="3")
    for _ in range(4):
        trail.login("mallory", "10.6.6.6", False, via="HTTP basic authentication", reason="wrong password")
    trail.login("alice", "10.0.0.2", True, via="HTTP basic authentication")
    trail.login("alice", "10.0.0.2", True, via="HTTP basic authentication")  # within the interval: not again
    kinds = [e.kind for e in trail._pending]
    assert kinds == ["User Authentication"] * 3 + ["Security Alert"] + ["User Authentication"] * 2
