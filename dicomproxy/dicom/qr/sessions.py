"""Which :class:`~dicomproxy.dicom.session.AssocSession` each of pynetdicom's associations
belongs to.

The dispatcher decides an association (``onDicomAssociation`` included) before it splices it to
the AE, and registers its session under the loopback port of the splice: pynetdicom sees that
port as the requestor's, so its handlers find the modality's real address and AE titles, and the
same transient Lua scope the association request had.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from dicomproxy.dicom.session import AssocSession, LuaBridge


class QrSessions:
    def __init__(self, bridge: LuaBridge) -> None:
        self.bridge = bridge
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._expected: dict[int, AssocSession] = {}
        self._by_assoc: dict[int, AssocSession] = {}

    def expect(self, local_port: int, session: AssocSession) -> None:
        with self._lock:
            self._expected[local_port] = session

    def forget(self, local_port: int) -> None:
        with self._lock:
            self._expected.pop(local_port, None)

    def session(self, assoc: Any) -> AssocSession:
        """The session of a pynetdicom association (pynetdicom's threads)."""
        key = id(assoc)
        with self._lock:
            found = self._by_assoc.get(key)
            if found is not None:
                return found
            ip, port = str(assoc.requestor.address), int(assoc.requestor.port or 0)
            found = self._expected.get(port) if ip == "127.0.0.1" else None
            if found is None:  # a connection straight to the private port: build it from pynetdicom's view
                found = AssocSession(
                    self.bridge, str(assoc.requestor.ae_title or ""), str(assoc.acceptor.ae_title or ""), ip, port,
                    self.loop,
                )
            self._by_assoc[key] = found
            return found

    def closed(self, assoc: Any) -> None:
        with self._lock:
            session = self._by_assoc.pop(id(assoc), None)
        if session is not None:
            session.close()

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._by_assoc)

    def close_all(self) -> None:
        with self._lock:
            sessions = list(self._by_assoc.values())
            self._by_assoc.clear()
        for session in sessions:
            session.close()
