"""The audit event model: what happened, who took part, from where, which objects it touched.

An :class:`AuditEvent` is what a feature hands to ``host.audit.record``: plain slotted data,
built in a few microseconds, with no XML in it (the message is built later, on the audit
writer's thread, :mod:`~dicomproxy.audit.message`). The factories below are the messages of
PS3.15 A.5.3 this gateway sends, so that a call site is one line and every message of a kind
has the participants and objects the standard asks for:

* Application Activity (A.5.3.1): start and stop, the application and the account that launched it;
* User Authentication (A.5.3.11): HTTP logins and DICOM associations, success and failure;
* DICOM Instances Transferred (A.5.3.4) per study, with its SOP classes and the patient;
* Begin Transferring DICOM Instances (A.5.3.2) when a retrieve starts;
* DICOM Instances Accessed (A.5.3.5): an operator's retry (U) or discard (D) of failed instances
  in the spool, from the status page or ``/dicomproxy/spool``;
* Query (A.5.3.12): C-FIND with the identifier's bytes, QIDO-RS with the URL;
* Security Alert (A.5.3.10): blocked AE, refused certificate, login bursts, scripts (re)loaded,
  a task re-run by an operator (Use of Restricted Function, success).

What an event knows of the gateway itself (its AE title, host, AuditSourceID) is added by
the trail, so features only say what they know.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from dicomproxy.audit import codes
from dicomproxy.audit.codes import Code

# The gateway itself as a participant: the trail fills in its name and address.
SELF = "\x00self"


@dataclass(slots=True)
class Participant:
    """An ActiveParticipant: a user, an application entity, a node."""

    user_id: str
    requestor: bool
    role: Code | None = None
    address: str = ""
    address_type: str = codes.IP_ADDRESS
    alt_user_id: str = ""
    user_name: str = ""


@dataclass(slots=True)
class Study:
    """What a transfer touched of one study: its SOP classes with instance counts, its patient."""

    uid: str
    patient_id: str = ""
    patient_name: str = ""
    sop_classes: dict[str, int] = field(default_factory=dict)
    accession: str = ""

    def add(self, sop_class: str, n: int = 1) -> None:
        self.sop_classes[sop_class] = self.sop_classes.get(sop_class, 0) + n

    @property
    def instances(self) -> int:
        return sum(self.sop_classes.values())


@dataclass(slots=True)
class ParticipantObject:
    """A ParticipantObjectIdentification (patient, study, query, node, file)."""

    id: str
    id_type: Code
    type_code: str = codes.SYSTEM_OBJECT
    role: str = ""
    name: str = ""
    query: bytes = b""
    details: tuple[tuple[str, bytes], ...] = ()
    study: Study | None = None  # its SOP classes go into ParticipantObjectDescription


@dataclass(slots=True)
class AuditEvent:
    """One audit record. ``time`` is when it happened (epoch seconds); the trail stamps ``seq``."""

    event_id: Code
    action: str
    outcome: int = codes.SUCCESS
    type_codes: tuple[Code, ...] = ()
    participants: list[Participant] = field(default_factory=list)
    objects: list[ParticipantObject] = field(default_factory=list)
    description: str = ""
    time: float = field(default_factory=time.time)

    @property
    def kind(self) -> str:
        """The event's name in logs, the JSON file and metrics (``Query``, ``Security Alert``...)."""
        return self.event_id.meaning


def outcome_of(ok: bool) -> int:
    return codes.SUCCESS if ok else codes.MINOR_FAILURE


# --------------------------------------------------------------------------- participant objects
def patient(patient_id: str, name: str = "") -> ParticipantObject:
    return ParticipantObject(patient_id, codes.PATIENT_NUMBER, codes.PERSON, codes.ROLE_PATIENT,
                             name=name or patient_id)


def study_object(study: Study) -> ParticipantObject:
    """A study with its SOP classes (the schema requires a name: the accession number, else the UID)."""
    return ParticipantObject(study.uid, codes.STUDY_INSTANCE_UID, codes.SYSTEM_OBJECT, codes.ROLE_REPORT,
                             name=study.accession or study.uid, study=study)


def study_objects(studies: Iterable[Study]) -> list[ParticipantObject]:
    """Each study, then each distinct patient (A.5.3.4: the patients of the transferred studies)."""
    out: list[ParticipantObject] = []
    patients: dict[str, str] = {}
    for s in studies:
        out.append(study_object(s))
        if s.patient_id:
            patients.setdefault(s.patient_id, s.patient_name)
    out.extend(patient(pid, name) for pid, name in patients.items())
    return out


def node(node_id: str, what: str = "") -> ParticipantObject:
    """An alert's subject that is a node (a remote AE, a collector)."""
    return ParticipantObject(node_id, codes.NODE_ID, codes.SYSTEM_OBJECT, codes.ROLE_SECURITY_RESOURCE,
                             name=what or node_id)


def alert_detail(text: str) -> tuple[tuple[str, bytes], ...]:
    return (("Alert Description", text.encode("utf-8")),)


# --------------------------------------------------------------------------- messages (A.5.3)
def application_activity(started: bool, launcher: str, application: str = SELF) -> AuditEvent:
    """A.5.3.1: the application (the gateway) and the account that launched it."""
    return AuditEvent(
        codes.APPLICATION_ACTIVITY, "E",
        type_codes=(codes.APPLICATION_START if started else codes.APPLICATION_STOP,),
        participants=[Participant(application, False, codes.APPLICATION),
                      Participant(launcher, True, codes.APPLICATION_LAUNCHER, address="", address_type="")],
    )


def user_authentication(user: str, address: str, ok: bool, *, via: str, reason: str = "",
                        logout: bool = False) -> AuditEvent:
    """A.5.3.11: ``user`` (an HTTP user or a calling AE title) authenticating from ``address``."""
    return AuditEvent(
        codes.USER_AUTHENTICATION, "E", outcome_of(ok),
        type_codes=(codes.LOGOUT if logout else codes.LOGIN,),
        participants=[Participant(user or "(none)", True, address=address), Participant(SELF, False)],
        description=f"{via}: {reason}" if reason else via,
    )


def instances_transferred(studies: Iterable[Study], source: Participant, destination: Participant, *,
                          action: str, ok: bool = True, reason: str = "",
                          requestor: Participant | None = None) -> AuditEvent:
    """A.5.3.4 for one or more studies: ``action`` C when the receiver reports, R when the sender does."""
    participants = [source, destination] + ([requestor] if requestor is not None else [])
    return AuditEvent(codes.INSTANCES_TRANSFERRED, action, outcome_of(ok), participants=participants,
                      objects=study_objects(studies), description=reason)


def instances_accessed(studies: Iterable[Study], user: Participant, *, action: str, ok: bool = True,
                       description: str = "") -> AuditEvent:
    """A.5.3.5: ``user`` changed (U: queued again) or deleted (D) instances the gateway holds."""
    return AuditEvent(codes.INSTANCES_ACCESSED, action, outcome_of(ok), participants=[user, Participant(SELF, False)],
                      objects=study_objects(studies), description=description)


def begin_transferring(studies: Iterable[Study], source: Participant, destination: Participant,
                       requestor: Participant | None = None) -> AuditEvent:
    """A.5.3.2: a retrieve (C-MOVE, C-GET) starts sending."""
    participants = [source, destination] + ([requestor] if requestor is not None else [])
    return AuditEvent(codes.BEGIN_TRANSFERRING, "E", participants=participants, objects=study_objects(studies))


def query(requestor: Participant, responder: Participant, query_object: ParticipantObject, *,
          ok: bool = True, reason: str = "") -> AuditEvent:
    """A.5.3.12: who asked, who answers, and the query itself."""
    return AuditEvent(codes.QUERY, "E", outcome_of(ok), participants=[requestor, responder],
                      objects=[query_object], description=reason)


def dimse_query(sop_class: str, identifier: bytes, transfer_syntax: str) -> ParticipantObject:
    """A C-FIND's query object: the model's SOP class, the identifier as sent, its transfer syntax."""
    return ParticipantObject(sop_class, codes.SOP_CLASS_UID, codes.SYSTEM_OBJECT, codes.ROLE_QUERY,
                             query=identifier, details=(("TransferSyntax", transfer_syntax.encode()),))


def qido_query(search: str, url: str) -> ParticipantObject:
    """A QIDO-RS query object: the search (``SearchForStudies``...) and the URL with its query."""
    return ParticipantObject(search, codes.QIDO_QUERY, codes.SYSTEM_OBJECT, codes.ROLE_QUERY,
                             query=url.encode("utf-8"))


def security_alert(kind: Code, subject: ParticipantObject, text: str, *, ok: bool = False,
                   performer: Participant | None = None) -> AuditEvent:
    """A.5.3.10: the gateway reports ``kind`` about ``subject``; ``performer`` caused it, if known."""
    subject.details = subject.details or alert_detail(text)
    participants = [Participant(SELF, False)] + ([performer] if performer is not None else [])
    return AuditEvent(codes.SECURITY_ALERT, "E", outcome_of(ok), type_codes=(kind,),
                      participants=participants, objects=[subject], description=text)


def task_object(task_id: str, title: str) -> ParticipantObject:
    """A background task as an alert's subject (its API URL)."""
    return ParticipantObject(f"/dicomproxy/tasks/{task_id}", codes.URI, codes.SYSTEM_OBJECT,
                             codes.ROLE_SECURITY_RESOURCE, name=title or task_id)


def script_file(path: str) -> ParticipantObject:
    return ParticipantObject("file://" + path, codes.URI, codes.SYSTEM_OBJECT, codes.ROLE_SECURITY_RESOURCE,
                             name=path.rsplit("/", 1)[-1])


def peer(user_id: str, address: str, *, requestor: bool, role: Code | None = None,
         alt_user_id: str = "") -> Participant:
    """A remote party: an AE title or user at an IP address."""
    return Participant(user_id or "(unknown)", requestor, role, address=address, alt_user_id=alt_user_id)
