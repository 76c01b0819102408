"""Every kind of message the gateway sends validates against the PS3.15 A.5.1 schema and says
what the standard asks for (event ID, type, participants, objects)."""

from __future__ import annotations

import base64

from dicomproxy.audit import codes, events
from dicomproxy.audit.events import SELF, Participant, Study
from dicomproxy.audit.message import AuditSource, iso_time, to_xml
from tests.audit.atna import validate

SOURCE = AuditSource("DICOMPROXY@host", "SITE", "DICOMPROXY", "host", "4242")
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


def study() -> Study:
    s = Study("1.2.3.4", "PAT-1", "Doe^Jane")
    s.add(CT, 3)
    s.add(MR)
    return s


def all_events() -> list[events.AuditEvent]:
    modality = events.peer("CT01", "10.0.0.5", requestor=True, role=codes.SOURCE)
    gateway = Participant(SELF, False, codes.DESTINATION)
    return [
        events.application_activity(True, "root"),
        events.application_activity(False, "root"),
        events.user_authentication("alice", "127.0.0.1", True, via="HTTP basic authentication"),
        events.user_authentication("", "127.0.0.1", False, via="HTTP basic authentication", reason="bad"),
        events.instances_transferred([study()], modality, gateway, action="C"),
        events.instances_transferred([study(), Study("1.2.3.5")], gateway, modality, action="R", ok=False,
                                     reason="1 of 4 not delivered", requestor=modality),
        events.begin_transferring([study()], gateway, modality),
        events.query(modality, gateway, events.dimse_query("1.2.840.10008.5.1.4.1.2.2.1", b"\x08\x00\x52\x00", "1.2")),
        events.query(modality, gateway, events.qido_query("SearchForStudies", "/dicom-web/studies?PatientID=X")),
        events.security_alert(codes.NODE_AUTHENTICATION, events.node("EVIL@10.0.0.9"), "blocked", performer=modality),
        events.security_alert(codes.SOFTWARE_CONFIGURATION, events.script_file("/etc/lua/main.lua"), "reloaded",
                              ok=True),
        events.security_alert(codes.AUDIT_RECORDING_STOPPED, events.node("/data/audit"), "full"),
    ]


def test_every_message_validates_against_the_dicom_schema() -> None:
    for event in all_events():
        validate(to_xml(event, SOURCE))


def test_instances_transferred_names_studies_sop_classes_and_patient() -> None:
    doc = validate(to_xml(all_events()[4], SOURCE))
    ident = doc.find("EventIdentification")
    assert ident.get("EventActionCode") == "C" and ident.get("EventOutcomeIndicator") == "0"
    assert ident.find("EventID").get("csd-code") == "110104"
    roles = {p.get("UserID"): p.find("RoleIDCode").get("csd-code") for p in doc.findall("ActiveParticipant")}
    assert roles == {"CT01": "110153", "DICOMPROXY": "110152"}
    objects = doc.findall("ParticipantObjectIdentification")
    assert [o.get("ParticipantObjectID") for o in objects] == ["1.2.3.4", "PAT-1"]
    sop = {c.get("UID"): c.get("NumberOfInstances") for c in objects[0].iter("SOPClass")}
    assert sop == {CT: "3", MR: "1"}
    assert objects[1].get("ParticipantObjectTypeCodeRole") == "1"
    assert objects[1].findtext("ParticipantObjectName") == "Doe^Jane"
    source = doc.find("AuditSourceIdentification")
    assert (source.get("AuditSourceID"), source.get("AuditEnterpriseSiteID")) == ("DICOMPROXY@host", "SITE")


def test_query_carries_the_identifier_and_its_transfer_syntax() -> None:
    doc = validate(to_xml(all_events()[7], SOURCE))
    obj = doc.find("ParticipantObjectIdentification")
    assert base64.b64decode(obj.findtext("ParticipantObjectQuery")) == b"\x08\x00\x52\x00"
    detail = obj.find("ParticipantObjectDetail")
    assert detail.get("type") == "TransferSyntax" and base64.b64decode(detail.get("value")) == b"1.2"
    assert obj.get("ParticipantObjectTypeCodeRole") == "24"


def test_gateway_participant_is_its_ae_with_pid_and_host() -> None:
    doc = validate(to_xml(all_events()[0], SOURCE))
    app = doc.findall("ActiveParticipant")[0]
    assert (app.get("UserID"), app.get("AlternativeUserID"), app.get("NetworkAccessPointID"),
            app.get("NetworkAccessPointTypeCode")) == ("DICOMPROXY", "4242", "host", "1")
    assert doc.find("EventIdentification/EventTypeCode").get("csd-code") == "110120"


def test_hostile_text_stays_well_formed() -> None:
    event = events.user_authentication("<x>&\x00\x1b\"'", "1.2.3.4", False, via="HTTP", reason="]]><!--")
    doc = validate(to_xml(event, SOURCE))
    assert doc.find("ActiveParticipant").get("UserID") == "<x>&\"'"


def test_iso_time_is_xsd_datetime_with_milliseconds() -> None:
    assert iso_time(0.25) == "1970-01-01T00:00:00.250Z"
