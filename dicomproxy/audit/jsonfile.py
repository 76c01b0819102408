"""The local audit file (``Audit:File``): one JSON object per event and line, rotated by size.

What an auditor reads without a syslog collector: the same content as the XML message, as
JSON (``seq``, ``time``, ``event``, ``eventId``, ``action``, ``outcome``, ``types``,
``participants``, ``objects``, ``description``). An event the buffer had no room for is still
written here, with ``"buffered": false`` and no ``seq``.

Rotation is the standard library's ``RotatingFileHandler`` (``Audit:FileMaxMB``, keeping
``Audit:FileKeep`` old files as ``<File>.1`` ...), used directly, without a logger, from the
trail's writer thread.
"""

from __future__ import annotations

import base64
import json
import logging
import logging.handlers
from pathlib import Path
from typing import Any

from dicomproxy.audit.codes import Code
from dicomproxy.audit.events import SELF, AuditEvent, Participant, ParticipantObject
from dicomproxy.audit.message import AuditSource, iso_time


class JsonLinesFile:
    def __init__(self, path: Path, max_bytes: int, keep: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=keep,
                                                             encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(message)s"))

    def write(self, event: AuditEvent, source: AuditSource, seq: int) -> None:
        line = json.dumps(as_json(event, source, seq), ensure_ascii=False, separators=(",", ":"))
        self._handler.emit(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))

    def close(self) -> None:
        self._handler.close()


def as_json(event: AuditEvent, source: AuditSource, seq: int) -> dict[str, Any]:
    out: dict[str, Any] = {"seq": seq} if seq else {"buffered": False}
    out.update({
        "time": iso_time(event.time), "event": event.kind, "eventId": event.event_id.code,
        "action": event.action, "outcome": event.outcome, "types": [t.meaning for t in event.type_codes],
        "source": source.source_id,
        "participants": [_participant(p, source) for p in event.participants],
        "objects": [_object(o) for o in event.objects],
    })
    if event.description:
        out["description"] = event.description
    return out


def _code(code: Code | None) -> str:
    return f"{code.meaning} ({code.code}, {code.system})" if code is not None else ""


def _participant(p: Participant, source: AuditSource) -> dict[str, Any]:
    if p.user_id == SELF:
        return {"userId": source.aet, "requestor": p.requestor, "role": _code(p.role), "address": source.host,
                "pid": source.pid}
    out: dict[str, Any] = {"userId": p.user_id, "requestor": p.requestor}
    for key, value in (("role", _code(p.role)), ("address", p.address), ("alternativeUserId", p.alt_user_id),
                       ("userName", p.user_name)):
        if value:
            out[key] = value
    return out


def _object(o: ParticipantObject) -> dict[str, Any]:
    out: dict[str, Any] = {"id": o.id, "idType": o.id_type.meaning}
    if o.name and o.name != o.id:
        out["name"] = o.name
    if o.query:
        try:
            out["query"] = o.query.decode("utf-8")
        except UnicodeDecodeError:
            out["queryBase64"] = base64.b64encode(o.query).decode("ascii")
    for kind, value in o.details:
        out.setdefault("details", {})[kind] = value.decode("utf-8", "replace")
    if o.study is not None and o.study.sop_classes:
        out["sopClasses"] = dict(sorted(o.study.sop_classes.items()))
        out["instances"] = o.study.instances
    return out
