"""What the DICOM side tells the rest of the gateway: the "instance stored" hook.

When the PACS accepts an instance the forwarder sent, every subscriber of
:class:`InstanceStored` gets a :class:`StoredInstance` (after the Lua ``onInstanceStored``
event, before the spool file is removed, so :meth:`StoredInstance.tags` can still read it).
The Orthanc layer subscribes to fire ``OnStoredInstance``; the DICOM side knows nothing of
Orthanc. Subscribers run in order on the event loop; one that raises is logged and the others
still run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from dicomproxy.dicom import datasets

log = logging.getLogger(__name__)

TAGS_IN_THREAD = 1 << 20
"""Data sets larger than this are decoded for :meth:`StoredInstance.tags` off the event loop."""


@dataclass(frozen=True)
class StoredInstance:
    sop_instance: str
    sop_class: str
    study: str
    series: str
    patient_id: str
    transfer_syntax: str
    origin: dict[str, Any]  # the modality's association: CallingAE, CalledAE, RemoteIp, RemotePort
    received: float  # when the gateway received it (time.time())
    via: str  # "dimse" or "dicomweb": how it reached the PACS
    status: int  # the PACS's answer (DIMSE status, or HTTP status for STOW-RS)
    instance_id: str = ""  # the PACS's id for it, when the PACS said
    read: Callable[[], Awaitable[bytes]] = field(default=lambda: _nothing(), repr=False)

    async def tags(self) -> dict[str, Any]:
        """Its data elements as the Lua events see them (bulk data left out)."""
        data = await self.read()
        if len(data) > TAGS_IN_THREAD:
            return await asyncio.to_thread(_table, data, self.transfer_syntax)
        return _table(data, self.transfer_syntax)


async def _nothing() -> bytes:
    return b""


def _table(data: bytes, transfer_syntax: str) -> dict[str, Any]:
    return datasets.dataset_to_table(datasets.decode(data, transfer_syntax))


Subscriber = Callable[[StoredInstance], Awaitable[None]]


class InstanceStored:
    """The hook (one per gateway: ``host.hooks.get(InstanceStored)``)."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._wants: list[Callable[[], bool]] = []
        self.forwarded_as: str | None = None
        """The calling AE title the PACS sees on instances the DICOM side forwards over DIMSE
        (``Dicom:Aet``); None when it forwards over DICOMweb or is off."""

    def subscribe(self, subscriber: Subscriber, wants: Callable[[], bool] | None = None) -> None:
        """``wants()`` (cheap, called per instance) says whether the subscriber would do anything
        now; when no subscriber wants the event, the DICOM side does not even build it."""
        self._subscribers.append(subscriber)
        self._wants.append(wants or (lambda: True))

    @property
    def wanted(self) -> bool:
        return any(wants() for wants in self._wants)

    async def emit(self, instance: StoredInstance) -> None:
        for subscriber in self._subscribers:
            try:
                await subscriber(instance)
            except Exception:
                log.exception("an 'instance stored' subscriber failed for %s", instance.sop_instance)
