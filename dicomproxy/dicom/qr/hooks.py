"""The Lua events of Query/Retrieve, run on the event loop (where Lua lives) before a request is
relayed and on each C-FIND match on its way back. An event is raised only when a script
defines it, so an unscripted request is never decoded.

On a C-FIND, in this order: ``onCFind(query, assoc)`` (false refuses); Orthanc's
``IncomingFindRequestFilter(query, origin)``, or ``IncomingWorklistRequestFilter(query, origin)``
for a Modality Worklist query (Orthanc's split: the first never sees worklist queries); then
``OutgoingFindRequestFilter(query, modality)``, Orthanc's hook for the C-FIND it issues as an
SCU, here the one the gateway sends to the PACS (``modality`` is the PACS's AE title, as
Orthanc passes the queried modality's). Each Orthanc filter returns the query to use (as in
Orthanc); ``false`` refuses it (an extension). Every match then passes ``onCFindResult(result,
assoc)`` (edit it, or false drops it). A retrieve passes ``onCMove(request, assoc)`` or
``onCGet(request, assoc)``. ``origin`` is Orthanc's: ``RemoteIp``, ``RemoteAet``,
``CalledAet``, ``Manufacturer``; ``assoc`` is the association's (``CallingAE``, ``CalledAE``,
``RemoteIp``, ``RemotePort``), the requester's real address.

A script that raises refuses the request (0xC000, "script failed"), or is ignored with
``Lua:FailOpen``.
"""

from __future__ import annotations

import logging
from typing import Any

from dicomproxy.dicom.qr.identifier import Identifier
from dicomproxy.dicom.session import AssocSession, LuaBridge

log = logging.getLogger(__name__)

QUERY_EVENTS = ("onCFind", "IncomingFindRequestFilter", "IncomingWorklistRequestFilter", "OutgoingFindRequestFilter")


class QrHooks:
    def __init__(self, bridge: LuaBridge, pacs_aet: str) -> None:
        self.bridge = bridge
        self.pacs_aet = pacs_aet

    @property
    def fail_open(self) -> bool:
        return self.bridge.fail_open

    def wants_results(self) -> bool:
        return self.bridge.defines("onCFindResult")

    async def echo(self, session: AssocSession) -> None:
        try:
            await self.bridge.call_async("onCEcho", session.table(), session=session)
        except Exception as e:
            log.error("onCEcho failed: %s", e)

    async def query(self, query: Identifier, session: AssocSession, *, worklist: bool) -> str | None:
        """Run the C-FIND events on ``query``; returns why it is refused, or None."""
        if not self.bridge.defines(*QUERY_EVENTS):
            return None
        incoming = "IncomingWorklistRequestFilter" if worklist else "IncomingFindRequestFilter"
        try:
            refused = await self._dicomproxy("onCFind", query, session)
            if refused is None:
                refused = await self._orthanc(incoming, query, session, find_origin(session))
            if refused is None:
                refused = await self._orthanc("OutgoingFindRequestFilter", query, session, self.pacs_aet)
        except Exception as e:
            return self._failed("C-FIND", session, e)
        return refused

    async def retrieve(self, request: Identifier, session: AssocSession, event: str) -> str | None:
        """``onCMove`` / ``onCGet``; returns why the request is refused, or None."""
        try:
            return await self._dicomproxy(event, request, session)
        except Exception as e:
            return self._failed(event[2:], session, e)

    async def result(self, match: Identifier, session: AssocSession) -> bool:
        """``onCFindResult``: False when the script dropped the match (edits go into ``match``).
        A failing script raises (the caller ends the C-FIND unless ``Lua:FailOpen``)."""
        table = match.table()
        d = await self.bridge.call_async("onCFindResult", table, session.table(), session=session)
        if d is None:
            return True
        if d.rejected:
            return False
        edited = d.args[0] if d.args and isinstance(d.args[0], dict) else table
        match.apply(table, edited)
        return True

    # -- the two table forms --------------------------------------------------------------------
    async def _dicomproxy(self, event: str, ident: Identifier, session: AssocSession) -> str | None:
        if not self.bridge.defines(event):
            return None
        table = ident.table()
        d = await self.bridge.call_async(event, table, session.table(), session=session)
        if d is None:
            return None
        if d.rejected:
            return f"refused by {event}"
        ident.apply(table, d.args[0] if d.args and isinstance(d.args[0], dict) else table)
        return None

    async def _orthanc(self, event: str, ident: Identifier, session: AssocSession, second: Any) -> str | None:
        if not self.bridge.defines(event):
            return None
        table = ident.orthanc_table()
        d = await self.bridge.call_async(event, table, second, session=session)
        if d is None:
            return None
        if d.rejected:
            return f"refused by {event}"
        returned = [r for r in d.results if isinstance(r, dict)]
        edited = returned[-1] if returned else (d.args[0] if d.args and isinstance(d.args[0], dict) else table)
        ident.apply(table, edited)
        return None

    def _failed(self, what: str, session: AssocSession, e: Exception) -> str | None:
        log.error("%s from %s: script failed: %s", what, session.calling, e)
        return None if self.fail_open else "script failed"


def find_origin(session: AssocSession) -> dict[str, str]:
    """The ``origin`` of Orthanc's C-FIND filters (its ``FormatOrigin``)."""
    return {
        "RemoteIp": session.ip, "RemoteAet": session.calling, "CalledAet": session.called, "Manufacturer": "Generic",
    }
