"""The DICOM side's audit events, so that each point in the listeners is one line.

* an association requested: a User Authentication (the calling AE title from its address),
  success or failure, and a Security Alert (Node Authentication) when the AE was blocked;
* instances received: tallied per study on the association (:attr:`AssocSession.received`)
  and recorded when it ends, one DICOM Instances Transferred (action C) per association with
  every study it brought, as PS3.15 A.5.3.4 recommends (not one message per instance);
* instances forwarded to the PACS: tallied per study and origin, recorded (action R) once the
  study has been quiet for ``QUIET_SECONDS`` (or at shutdown), failures apart;
* C-FIND: a Query with the identifier as received and its transfer syntax;
* C-MOVE / C-GET: Begin Transferring when the instances start to flow, DICOM Instances
  Transferred (action R) with the delivered instances when the retrieve ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from dicomproxy.audit import codes, events
from dicomproxy.audit.events import SELF, Participant, Study
from dicomproxy.audit.trail import AuditTrail
from dicomproxy.config.settings import DicomSettings
from dicomproxy.dicom.session import AssocSession
from dicomproxy.dicom.spool import SpoolEntry

log = logging.getLogger(__name__)

QUIET_SECONDS = 2.0


class DicomAudit:
    def __init__(self, trail: AuditTrail | None, settings: DicomSettings, pacs: str) -> None:
        self.trail = trail
        self.on = trail is not None and trail.enabled
        self.settings = settings
        up = settings.upstream
        self.pacs = (up.aet if pacs == "dimse" else pacs, up.host)
        self._forwarded: dict[tuple[str, str, str, bool], tuple[Study, str]] = {}
        self._quiet: dict[tuple[str, str, str, bool], float] = {}
        self._timer: asyncio.TimerHandle | None = None

    # -- associations ----------------------------------------------------------------------
    def association(self, session: AssocSession, refused: str = "", blocked: bool = False) -> None:
        """A requested association: accepted (``refused`` empty) or refused, and why."""
        if not self.on or self.trail is None:
            return
        via = f"DICOM association to {session.called or '?'}"
        self.trail.login(session.calling, session.ip, not refused, via=via, reason=refused)
        if blocked:
            self.trail.alert(codes.NODE_AUTHENTICATION, events.node(f"{session.calling}@{session.ip}", session.calling),
                             f"association from {session.calling} ({session.ip}) refused: {refused}",
                             performer=self._caller(session, requestor=True))

    def received(self, session: AssocSession, entry: SpoolEntry) -> None:
        """One instance received on ``session`` (tallied; recorded when the association ends)."""
        if self.on:
            study = session.received.get(entry.study)
            if study is None:
                study = session.received[entry.study] = Study(entry.study or "(none)", entry.patient_id)
            study.add(entry.sop_class)

    def ended(self, session: AssocSession) -> None:
        """The association is over: record what it brought, every study in one message."""
        if not self.on or self.trail is None or not session.received:
            return
        studies, session.received = list(session.received.values()), {}
        source = self._caller(session, requestor=True, role=codes.SOURCE)
        self.trail.record(events.instances_transferred(studies, source, Participant(SELF, False, codes.DESTINATION),
                                                       action="C"))

    # -- forwarding ------------------------------------------------------------------------
    def forwarded(self, entry: SpoolEntry, ok: bool = True, reason: str = "") -> None:
        """On the event loop: one instance the PACS accepted (or refused for good)."""
        if not self.on:
            return
        origin = str(entry.origin.get("CallingAE", ""))
        key = (entry.study, origin, reason, ok)
        tally = self._forwarded.get(key)
        if tally is None:
            tally = self._forwarded[key] = (Study(entry.study or "(none)", entry.patient_id), reason)
        tally[0].add(entry.sop_class)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on the loop (should not happen): no tally to wait on
            self._quiet[key] = 0.0
            self.flush()
            return
        self._quiet[key] = loop.time() + QUIET_SECONDS
        if self._timer is None:
            self._timer = loop.call_later(QUIET_SECONDS, self.flush)

    def flush(self, everything: bool = False) -> None:
        """Record the studies that have been quiet (or all of them, at shutdown)."""
        self._timer = None
        if self.trail is None:
            return
        now = float("inf") if everything else _now()
        for key in [k for k, t in self._quiet.items() if t <= now]:
            del self._quiet[key]
            study, reason = self._forwarded.pop(key)
            pacs = events.peer(self.pacs[0], self.pacs[1], requestor=False, role=codes.DESTINATION)
            self.trail.record(events.instances_transferred(
                [study], Participant(SELF, True, codes.SOURCE), pacs, action="R", ok=key[3], reason=reason))
        if self._quiet and not everything:
            with contextlib.suppress(RuntimeError):
                self._timer = asyncio.get_running_loop().call_later(QUIET_SECONDS, self.flush)

    # -- queries and retrieves (event loop, from qr/operation.py) ------------------------------
    def query(self, session: AssocSession, model: str, identifier: bytes, transfer_syntax: str) -> None:
        """A C-FIND: the identifier's bytes as the requester sent them."""
        if not self.on or self.trail is None:
            return
        self.trail.record(events.query(self._caller(session, requestor=True, role=codes.SOURCE),
                                       Participant(SELF, False, codes.DESTINATION),
                                       events.dimse_query(model, identifier, transfer_syntax)))

    def retrieve_started(self, session: AssocSession, move_to: str, study: Study) -> None:
        """A C-MOVE (``move_to``: its destination) or C-GET (``move_to`` empty) the scripts let through."""
        if self.on and self.trail is not None:
            self.trail.record(events.begin_transferring([study], Participant(SELF, False, codes.SOURCE),
                                                        self._destination(session, move_to),
                                                        self._caller(session, requestor=True)))

    def retrieved(self, session: AssocSession, move_to: str, study: Study, completed: int, failed: int) -> None:
        """The retrieve's final response: ``completed`` and ``failed`` sub-operations (for a C-MOVE the
        PACS moved itself, the counts it reported)."""
        if not self.on or self.trail is None or not (completed or failed):
            return
        reason = f"{failed} of {completed + failed} instance(s) not delivered" if failed else ""
        self.trail.record(events.instances_transferred(
            [study], Participant(SELF, False, codes.SOURCE), self._destination(session, move_to), action="R",
            ok=not failed, reason=reason, requestor=self._caller(session, requestor=True)))

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _caller(session: AssocSession, *, requestor: bool, role: codes.Code | None = None) -> Participant:
        return events.peer(session.calling, session.ip, requestor=requestor, role=role)

    def _destination(self, session: AssocSession, move_to: str) -> Participant:
        """C-MOVE: the move destination (its address from Dicom:Modalities); C-GET: the requester."""
        if not move_to:
            return self._caller(session, requestor=False, role=codes.DESTINATION)
        host = next((ae.host for ae in self.settings.modalities.values() if ae.aet == move_to), "")
        return events.peer(move_to, host, requestor=False, role=codes.DESTINATION)


def _now() -> float:
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return float("inf")


def study_of(get: Callable[[str], str]) -> Study:
    """The study a retrieve names (``get(keyword)`` reads its identifier)."""
    return Study(get("StudyInstanceUID").strip() or "(none)", get("PatientID").strip())
