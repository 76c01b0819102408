"""An in-process DICOM port for unit tests: the acceptor, the dispatcher, the storage SCP and the
Query/Retrieve service with a real spool in a tmp folder, no Lua, no forwarding (enqueued
entries are collected)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomproxy.config.settings import DicomSettings, load_settings
from dicomproxy.dicom.dispatch import Dispatcher
from dicomproxy.dicom.qr.service import QueryRetrieve
from dicomproxy.dicom.session import LuaBridge
from dicomproxy.dicom.spool import Spool, SpoolEntry
from dicomproxy.dicom.store import StoreService
from dicomproxy.dicom.ul.acceptor import Acceptor, Limits


@dataclass
class Stack:
    settings: DicomSettings
    spool: Spool
    acceptor: Acceptor
    dispatcher: Dispatcher
    qr: QueryRetrieve
    entries: list[SpoolEntry] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.acceptor.port


@asynccontextmanager
async def dicom_stack(tmp: Path, *, max_dataset: int = 0, limits: Limits | None = None,
                      tls: ssl.SSLContext | None = None, on_tls_refused: Any = None,
                      **dicom: Any) -> AsyncIterator[Stack]:
    config = tmp / "appsettings.json"
    config.write_text("{}")
    overrides = {"Dicom": {"Aet": "GW", "SpoolFolder": str(tmp / "spool"), **dicom}}
    settings = load_settings(config, environ={}, overrides=overrides).dicom
    spool = Spool(settings.spool_folder, fsync=False)
    spool.open()
    bridge = LuaBridge(None)
    entries: list[SpoolEntry] = []
    store = StoreService(bridge, spool, entries.append)
    store.loop = asyncio.get_running_loop()
    limits = limits or Limits(artim=2.0)
    qr = QueryRetrieve(settings, bridge, store, spool, max_pdu=limits.max_pdu, idle=10.0, timeout=10.0,
                       connect_timeout=5.0, max_dataset=max_dataset)
    dispatcher = Dispatcher(settings, limits, bridge, store, spool, qr, max_dataset=max_dataset)
    acceptor = Acceptor("127.0.0.1", 0, limits, dispatcher, tls=tls, on_tls_refused=on_tls_refused,
                        address_allowed=dispatcher.policy.address_allowed if tls is not None else None)
    await acceptor.start()
    stack = Stack(settings, spool, acceptor, dispatcher, qr, entries)
    try:
        yield stack
    finally:
        await acceptor.stop()
        await qr.stop()
        await asyncio.to_thread(lambda: [t.join(5) for t in dispatcher.stop()])
        store.close()
        spool.close()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for ``condition`` to hold (polling); fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)
