"""The PS3.15 A.5 XML of an audit event (the DICOM Audit Message Schema, A.5.1).

Built with the standard library's ElementTree: the messages are small (0.5-3 KB), and the
builder runs on the audit writer's thread, never on a request's path. Element order follows
the schema's groups (EventID, EventTypeCode*, EventOutcomeDescription; RoleIDCode* in
ActiveParticipant; IDTypeCode, Name|Query, Detail*, Description* in a participant object),
and every coded value carries the ``originalText`` the schema requires. tests/audit validates
every kind of message against the schema itself (tests/audit/schema).

The gateway itself (:data:`~dicomproxy.audit.events.SELF` in an event) becomes its AE title
with its process id as AlternativeUserID and the machine's name as network access point,
as IHE ITI TF-2 3.20.7 asks of an application participant.
"""

from __future__ import annotations

import base64
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from dicomproxy.audit import codes
from dicomproxy.audit.codes import Code
from dicomproxy.audit.events import SELF, AuditEvent, Participant, ParticipantObject


@dataclass(frozen=True, slots=True)
class AuditSource:
    """Who reports: AuditSourceID, the enterprise site, and the gateway as a participant."""

    source_id: str
    site_id: str
    aet: str
    host: str
    pid: str
    type_code: str = codes.SOURCE_APPLICATION_SERVER


def iso_time(ts: float) -> str:
    """``xsd:dateTime`` in UTC with milliseconds (``2024-05-01T12:00:00.123Z``)."""
    whole = int(ts)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((ts - whole) * 1000):03d}Z"


def to_xml(event: AuditEvent, source: AuditSource) -> bytes:
    """The ``<AuditMessage>`` of ``event`` as UTF-8 bytes, one line, no XML declaration."""
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": event.action,
        "EventDateTime": iso_time(event.time),
        "EventOutcomeIndicator": str(event.outcome),
    })
    _code(ident, "EventID", event.event_id)
    for type_code in event.type_codes:
        _code(ident, "EventTypeCode", type_code)
    if event.description:
        ET.SubElement(ident, "EventOutcomeDescription").text = _clean(event.description)
    for participant in event.participants:
        _participant(root, participant, source)
    src = ET.SubElement(root, "AuditSourceIdentification", _attrs(
        AuditEnterpriseSiteID=source.site_id, AuditSourceID=source.source_id))
    ET.SubElement(src, "AuditSourceTypeCode", {"csd-code": source.type_code})
    for obj in event.objects:
        _object(root, obj)
    xml: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return xml


def _code(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code.code, "codeSystemName": code.system,
                                       "originalText": code.meaning})


def _participant(root: ET.Element, p: Participant, source: AuditSource) -> None:
    if p.user_id == SELF:
        p = Participant(source.aet, p.requestor, p.role, address=source.host, address_type=codes.MACHINE_NAME,
                        alt_user_id=source.pid)
    el = ET.SubElement(root, "ActiveParticipant", _attrs(
        UserID=_clean(p.user_id), AlternativeUserID=_clean(p.alt_user_id), UserName=_clean(p.user_name),
        UserIsRequestor="true" if p.requestor else "false",
        NetworkAccessPointID=_token(p.address), NetworkAccessPointTypeCode=p.address_type if p.address else ""))
    if p.role is not None:
        _code(el, "RoleIDCode", p.role)


def _object(root: ET.Element, obj: ParticipantObject) -> None:
    el = ET.SubElement(root, "ParticipantObjectIdentification", _attrs(
        ParticipantObjectID=_token(obj.id) or "-", ParticipantObjectTypeCode=obj.type_code,
        ParticipantObjectTypeCodeRole=obj.role))
    _code(el, "ParticipantObjectIDTypeCode", obj.id_type)
    if obj.query:
        ET.SubElement(el, "ParticipantObjectQuery").text = base64.b64encode(obj.query).decode("ascii")
    else:
        ET.SubElement(el, "ParticipantObjectName").text = _token(obj.name) or _token(obj.id) or "-"
    for kind, value in obj.details:
        ET.SubElement(el, "ParticipantObjectDetail", {"type": kind, "value": base64.b64encode(value).decode()})
    if obj.study is not None and obj.study.sop_classes:
        desc = ET.SubElement(el, "ParticipantObjectDescription")
        for uid, n in sorted(obj.study.sop_classes.items()):
            ET.SubElement(desc, "SOPClass", _attrs(UID=_token(uid), NumberOfInstances=str(n)))


def _attrs(**values: str) -> dict[str, str]:
    """The non-empty ones: an optional attribute is left out rather than written empty."""
    return {k: v for k, v in values.items() if v}


_CONTROL = dict.fromkeys(c for c in range(32) if c not in (9, 10, 13))


def _clean(text: str) -> str:
    """Text the XML 1.0 grammar allows (a C0 control character would make the message unparsable)."""
    return text.translate(_CONTROL)


def _token(text: str) -> str:
    """An ``xsd:token``: no control characters, inner whitespace collapsed, none at the ends."""
    return " ".join(_clean(text).split())
