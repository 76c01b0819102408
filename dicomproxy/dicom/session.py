"""One association's view of the Lua side: its ``assoc`` table, its transient scope, and the
way DICOM events reach Lua from whichever thread serves the association.

Lua runs on the event loop. The association request is decided there (``onDicomAssociation``,
awaited by the acceptor); after that a storage association runs on its own thread and
pynetdicom's Query/Retrieve handlers on pynetdicom's, and their events go through
``host.dispatch_threadsafe`` (which blocks that thread, not the loop). An event is raised only
when a script defines the callback (``host.defines`` is cached), so an unscripted gateway pays
nothing per instance. Each association gets one transient scope, opened on the first event that
needs it and closed when the association ends, so ``main-transient.lua`` keeps its state for
the whole association, from ``onDicomAssociation`` to the last C-STORE or C-FIND.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any

from dicomproxy.dicom.policy import ALL_OPERATIONS, Operation, log_not_authorized

log = logging.getLogger(__name__)


class LuaBridge:
    """Wraps the ScriptHost for the DICOM side (event names, timeouts, fail-open policy)."""

    def __init__(self, host: Any, *, timeout: float = 10.0, fail_open: bool = False) -> None:
        self.host = host
        self.timeout = timeout
        self.fail_open = fail_open

    def defines(self, *names: str) -> bool:
        if self.host is None:
            return False
        return any(self.host.defines(n) for n in names)

    def call(self, name: str, *args: Any, session: AssocSession | None = None) -> Any | None:
        """Dispatch ``name`` if a script defines it; returns the host's ``Dispatch`` or None.

        Script errors propagate (the caller maps them to a DIMSE status).
        """
        if self.host is None or not self.host.defines(name):
            return None
        scope = session.scope() if session is not None else None
        return self.host.dispatch_threadsafe(name, *args, scope=scope, timeout=self.timeout)

    async def refuses(self, session: AssocSession) -> bool:
        """Ask ``onDicomAssociation`` (on the loop); True when it returns false, or fails unless
        ``Lua:FailOpen``. Every association request is decided here, storage or Query/Retrieve."""
        if not self.defines("onDicomAssociation"):
            return False
        try:
            d = await self.call_async("onDicomAssociation", session.table(), session=session)
            refused = d is not None and bool(d.rejected)
        except Exception as e:
            log.error("onDicomAssociation failed for %s: %s", session.calling, e)
            refused = not self.fail_open
        if refused:
            log.info("association from %s (%s:%s) to %s refused by onDicomAssociation",
                     session.calling, session.ip, session.port, session.called)
        return refused

    async def call_async(self, name: str, *args: Any, session: AssocSession | None = None) -> Any | None:
        """From the event loop (the acceptor, the scripted store, forwarder callbacks)."""
        if self.host is None or not self.host.defines(name):
            return None
        scope = session.scope() if session is not None else None
        return await self.host.dispatch(name, *args, scope=scope)


class AssocSession:
    """Per-association state, created when the association is requested."""

    def __init__(self, bridge: LuaBridge, calling: str, called: str, ip: str, port: int, loop: Any = None) -> None:
        self.bridge = bridge
        self.loop = loop
        self.calling = calling.strip()
        self.called = called.strip()
        self.ip = ip
        self.port = port
        self.operations: frozenset[Operation] = ALL_OPERATIONS  # Dicom:AePermissions, set when admitted
        self._scope: Any = None
        self._lock = threading.Lock()
        self.received: dict[str, Any] = {}  # study UID -> what arrived of it (the audit's tally)
        self._closed = False

    def permits(self, operation: Operation) -> bool:
        """True when ``Dicom:AePermissions`` lets the calling AE do ``operation``; else logs the one line."""
        if operation in self.operations:
            return True
        log_not_authorized(operation, self.calling, self.ip, self.port)
        return False

    def table(self) -> dict[str, Any]:
        """The ``assoc`` argument of the DicomProxy events."""
        return {"CallingAE": self.calling, "CalledAE": self.called, "RemoteIp": self.ip, "RemotePort": self.port}

    def origin(self) -> dict[str, Any]:
        """The ``origin`` argument of the Orthanc-compatible events."""
        return {
            "RequestOrigin": "DicomProtocol",
            "RemoteIp": self.ip,
            "RemoteAet": self.calling,
            "CalledAet": self.called,
        }

    def scope(self) -> Any:
        with self._lock:
            if self._scope is None and not self._closed and self.bridge.host is not None:
                scope = self.bridge.host.transient_scope()
                scope.__enter__()
                self._scope = scope
            return self._scope

    def close(self) -> None:
        with self._lock:
            self._closed = True
            scope, self._scope = self._scope, None
        if scope is None:
            return
        # The engine belongs to the event loop's thread: close it there.
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is not loop:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(scope.__exit__, None, None, None)
                    return
        with contextlib.suppress(Exception):
            scope.__exit__(None, None, None)
