"""What happens to one received instance, whichever listener received it.

Decode only if a script wants the dataset (``onCStore`` / ``ReceivedInstanceFilter``), apply
the script's edits, write the instance durably to the spool, hand it to the forwarder, and only
then answer success. With no such script the received bytes are spooled as they are (never
decoded and re-encoded), so compressed pixel data and every element's original encoding pass
through untouched.

Statuses a modality can see: 0x0124 (refused by a script), 0x0110 (a script failed, unless
``Lua:FailOpen``), 0xC210 (the dataset cannot be parsed), 0xA700 (the spool cannot be written:
disk full...).

Entry points: :meth:`StoreService.store_received` for the association threads of
``storage_scp.py``, with the data set already streamed into a :class:`.spool.SpoolWriter` (the
unscripted hot path never leaves that thread); :meth:`StoreService.store_blocking` for a data
set in memory (pynetdicom's threads, on a Query/Retrieve association that also stores); and
:meth:`StoreService.store` on the event loop (scripted instances: Lua runs there; the fsync'ed
write then runs in a small thread pool).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, NamedTuple

from dicomproxy.dicom import datasets
from dicomproxy.dicom.audit import DicomAudit
from dicomproxy.dicom.destinations import Destinations
from dicomproxy.dicom.routing import DEFAULT, Router, tag_key
from dicomproxy.dicom.session import AssocSession, LuaBridge
from dicomproxy.dicom.spool import Spool, SpoolEntry, SpoolWriter

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_REFUSED = 0x0124
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_OUT_OF_RESOURCES = 0xA700


class StoreService:
    def __init__(
        self,
        bridge: LuaBridge,
        spool: Spool,
        enqueue: Callable[[SpoolEntry], None],
        counters: dict[str, Any] | None = None,
        writers: int = 4,
        audit: DicomAudit | None = None,
        router: Router | None = None,
        destinations: Destinations | None = None,
    ) -> None:
        self.bridge = bridge
        self.router = router or Router(())
        self.destinations = destinations
        self.audit = audit
        self.spool = spool
        self.enqueue = enqueue
        self.counters = counters or {}
        self._executor = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="dicom-spool")
        self.loop: asyncio.AbstractEventLoop | None = None  # set by the component at start

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def _count(self, name: str) -> None:
        metric = self.counters.get(name)
        if metric is not None:
            metric.inc()

    def _scripted_store(self) -> bool:
        return self.bridge.defines("onCStore", "ReceivedInstanceFilter", "ReceivedCStoreInstanceFilter")

    def store_received(self, session: AssocSession, writer: SpoolWriter, *, timed: bool = True) -> tuple[int, str]:
        """From an association's thread, the data set in ``writer``: ``(status, error comment)``.

        Unscripted, everything happens on the calling thread (read the header, commit and fsync
        the spool file) and the loop is only told to forward; with a script the whole store
        runs on the event loop, where Lua lives. Timed into ``dicomproxy_dicom_store_seconds``
        (unless ``timed`` is False: the relay times its answers itself)."""
        started = time.perf_counter()
        try:
            return self._store_received(session, writer)
        finally:
            if timed:
                self.observe_answer(time.perf_counter() - started)

    def observe_answer(self, seconds: float) -> None:
        """One C-STORE answered ``seconds`` after its data set was complete."""
        metric = self.counters.get("store_seconds")
        if metric is not None:
            metric.observe(seconds)

    def _store_received(self, session: AssocSession, writer: SpoolWriter) -> tuple[int, str]:
        ts, sop_class, sop_instance = writer.transfer_syntax, writer.sop_class, writer.sop_instance
        if self._scripted_store():
            raw = writer.dataset()
            writer.discard()
            assert self.loop is not None, "StoreService.loop is set when the component starts"
            future = asyncio.run_coroutine_threadsafe(self.store(session, raw, ts, sop_class, sop_instance), self.loop)
            return future.result(self.bridge.timeout * 2 + 60)
        try:
            with writer.open_dataset() as stream:
                header = self._header(session, stream, ts, sop_instance)
        except OSError as e:
            header = self._put_failed(session, sop_instance, e)
        if isinstance(header, tuple):
            writer.discard()
            return header
        try:
            entry = writer.commit(
                study=header.get("StudyInstanceUID", ""),
                series=header.get("SeriesInstanceUID", ""),
                patient_id=header.get("PatientID", ""),
                destinations=self.router.choose(session.calling, session.called, header) if self.router else DEFAULT,
            )
        except OSError as e:
            writer.discard()
            return self._put_failed(session, sop_instance, e)
        if self.audit is not None:
            self.audit.received(session, entry)  # a tally on the session: recorded when the association ends
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self.enqueue, entry)
        self._count("received")
        return STATUS_SUCCESS, ""

    def edit_blocking(
        self, session: AssocSession, raw: bytes, ts: str, sop_instance: str
    ) -> Edited | tuple[int, str]:
        """From a thread (the relay): run ``onCStore`` / ``ReceivedInstanceFilter`` on the loop; the
        data set to send (edited or not), or the ``(status, comment)`` to answer instead."""
        assert self.loop is not None, "StoreService.loop is set when the component starts"
        future = asyncio.run_coroutine_threadsafe(self._scripted(session, raw, ts, sop_instance), self.loop)
        return future.result(self.bridge.timeout * 2 + 60)

    def scripted(self) -> bool:
        """A script wants to see (and may edit) each instance."""
        return self._scripted_store()

    def store_blocking(
        self, session: AssocSession, raw: bytes, ts: str, sop_class: str, sop_instance: str
    ) -> tuple[int, str]:
        """From a thread, a data set in memory (see :meth:`store_received`)."""
        writer = self.spool.begin(
            sop_class=sop_class, sop_instance=sop_instance, transfer_syntax=ts, origin=session.table()
        )
        try:
            writer.write(memoryview(raw))
        except OSError as e:
            writer.discard()
            return self._put_failed(session, sop_instance, e)
        return self.store_received(session, writer)

    async def store(
        self, session: AssocSession, raw: bytes, ts: str, sop_class: str, sop_instance: str
    ) -> tuple[int, str]:
        """On the event loop: ``(status, error comment)`` for the C-STORE response."""
        if self._scripted_store():
            outcome = await self._scripted(session, raw, ts, sop_instance)
            if not isinstance(outcome, Edited):
                return outcome
            raw, header, sop_instance, destinations = outcome
        else:
            checked = self._header(session, raw, ts, sop_instance)
            if isinstance(checked, tuple):
                return checked
            header = checked
            destinations = self.router.choose(session.calling, session.called, header) if self.router else DEFAULT
        put = functools.partial(self._put, session, raw, ts, sop_class, sop_instance, header, destinations)
        try:
            entry = await asyncio.get_running_loop().run_in_executor(self._executor, put)
        except OSError as e:
            return self._put_failed(session, sop_instance, e)
        self.enqueue(entry)
        self._count("received")
        return STATUS_SUCCESS, ""

    def _header(
        self, session: AssocSession, raw: bytes | BinaryIO, ts: str, sop_instance: str
    ) -> dict[str, str] | tuple[int, str]:
        try:
            header = datasets.header_uids(raw, ts, self.router.tags)
        except Exception as e:
            log.error("C-STORE %s from %s: cannot parse the dataset (%s)", sop_instance, session.calling, e)
            self._count("store_errors")
            return STATUS_CANNOT_UNDERSTAND, "dataset cannot be parsed"
        if header.get("SOPInstanceUID") != sop_instance:
            log.error(
                "C-STORE %s from %s: cannot parse the dataset (its SOPInstanceUID is %r)",
                sop_instance,
                session.calling,
                header.get("SOPInstanceUID"),
            )
            self._count("store_errors")
            return STATUS_CANNOT_UNDERSTAND, "SOPInstanceUID does not match the request"
        return header

    def _put(
        self, session: AssocSession, raw: bytes, ts: str, sop_class: str, sop_instance: str, header: dict[str, str],
        destinations: tuple[str, ...] = DEFAULT,
    ) -> SpoolEntry:
        entry = self.spool.put(
            raw,
            sop_class=sop_class,
            sop_instance=sop_instance,
            transfer_syntax=ts,
            study=header.get("StudyInstanceUID", ""),
            series=header.get("SeriesInstanceUID", ""),
            patient_id=header.get("PatientID", ""),
            origin=session.table(),
            destinations=destinations,
        )
        if self.audit is not None:
            self.audit.received(session, entry)
        return entry

    def _put_failed(self, session: AssocSession, sop_instance: str, e: OSError) -> tuple[int, str]:
        log.error("C-STORE %s from %s: spool write failed: %s", sop_instance, session.calling, e)
        self._count("store_errors")
        return STATUS_OUT_OF_RESOURCES, "gateway spool write failed"

    async def _scripted(
        self, session: AssocSession, raw: bytes, ts: str, sop_instance: str
    ) -> Edited | tuple[int, str]:
        try:
            ds = datasets.decode(raw, ts)
            table = datasets.dataset_to_table(ds)
        except Exception as e:
            log.error("C-STORE %s from %s: cannot decode the dataset (%s)", sop_instance, session.calling, e)
            self._count("store_errors")
            return STATUS_CANNOT_UNDERSTAND, "dataset cannot be decoded"
        changed = False
        chosen: tuple[str, ...] = ()
        try:
            d = await self.bridge.call_async("onCStore", table, session.table(), session=session)
            if d is not None:
                if d.rejected:
                    log.info("C-STORE %s from %s rejected by onCStore", sop_instance, session.calling)
                    self._count("rejected")
                    return STATUS_REFUSED, "rejected by onCStore"
                try:
                    chosen = self._chosen(d.results)
                except ValueError as e:  # refused whatever Lua:FailOpen says: it would go to the wrong place
                    log.error("C-STORE %s from %s: onCStore: %s", sop_instance, session.calling, e)
                    self._count("store_errors")
                    return STATUS_PROCESSING_FAILURE, "onCStore returned an unknown destination"
                edited = d.args[0] if d.args and isinstance(d.args[0], dict) else table
                changed = datasets.apply_table(ds, table, edited)
            if self.bridge.defines("ReceivedInstanceFilter"):
                info = {"HasPixelData": "PixelData" in ds, "TransferSyntaxUID": ts}
                view = datasets.dataset_to_table(ds) if changed else table
                d = await self.bridge.call_async(
                    "ReceivedInstanceFilter", view, session.origin(), info, session=session
                )
                if d is not None and d.rejected:
                    log.info("C-STORE %s from %s rejected by ReceivedInstanceFilter", sop_instance, session.calling)
                    self._count("rejected")
                    return STATUS_REFUSED, "rejected by ReceivedInstanceFilter"
            if self.bridge.defines("ReceivedCStoreInstanceFilter"):
                refused = await self._cstore_filter(session, ds, table if not changed else None, ts, sop_instance)
                if refused is not None:
                    return refused
        except Exception as e:
            what = "wrote an invalid value" if isinstance(e, datasets.TableError) else "failed"
            log.error("C-STORE %s from %s: script %s: %s", sop_instance, session.calling, what, e)
            if not self.bridge.fail_open:
                self._count("store_errors")
                return STATUS_PROCESSING_FAILURE, f"script {what}"
            ds, changed = datasets.decode(raw, ts), False
        if changed:
            try:
                raw = datasets.encode(ds, ts)
            except Exception as e:
                log.error("C-STORE %s: the edited dataset cannot be encoded: %s", sop_instance, e)
                return STATUS_PROCESSING_FAILURE, "edited dataset cannot be encoded"
        header = {
            "StudyInstanceUID": str(ds.get("StudyInstanceUID", "") or ""),
            "SeriesInstanceUID": str(ds.get("SeriesInstanceUID", "") or ""),
            "PatientID": str(ds.get("PatientID", "") or ""),
        }
        if not chosen and self.router:
            chosen = self.router.choose(session.calling, session.called, {**header, **_route_values(ds, self.router)})
        return Edited(raw, header, str(ds.get("SOPInstanceUID", sop_instance) or sop_instance), chosen or DEFAULT)

    def _chosen(self, results: list[Any]) -> tuple[str, ...]:
        """Destinations ``onCStore`` returned (a table of names: ``return {"archive", "ai-node"}``);
        () when it returned none (nothing, ``true``, the dataset table: today's forms). ValueError
        names an unknown one and the known ones."""
        for result in results:
            if isinstance(result, list) and result:
                if not all(isinstance(n, str) for n in result):
                    raise ValueError(f"the destinations it returned must be names (strings), got {result!r}")
                names = tuple(dict.fromkeys(result))
                known = self.destinations.known if self.destinations is not None else frozenset(DEFAULT)
                for name in names:
                    if name not in known:
                        raise ValueError(f"returned the destination {name!r}, which is none (known: "
                                         f"{', '.join(sorted(known))}; see Upstreams:Servers, Upstreams:Groups, "
                                         "Dicom:Modalities)")
                return names
        return ()

    async def _cstore_filter(
        self, session: AssocSession, ds: Any, table: dict[str, Any] | None, ts: str, sop_instance: str
    ) -> tuple[int, str] | None:
        """Orthanc's ``ReceivedCStoreInstanceFilter(dicom, origin, info)``: 0 accepts, any other number is
        the DIMSE status the modality gets (the instance is dropped). A non-number is a script failure."""
        info = {"HasPixelData": "PixelData" in ds, "TransferSyntaxUID": ts}
        view = table if table is not None else datasets.dataset_to_table(ds)
        d = await self.bridge.call_async("ReceivedCStoreInstanceFilter", view, session.origin(), info, session=session)
        for status in d.results if d is not None else ():
            if isinstance(status, bool) or not isinstance(status, int | float) or status != int(status):
                raise TypeError(f"ReceivedCStoreInstanceFilter must return a DIMSE status number, got {status!r}")
            if int(status) != STATUS_SUCCESS:
                code = int(status) & 0xFFFF
                log.info("C-STORE %s from %s refused by ReceivedCStoreInstanceFilter with status 0x%04X",
                         sop_instance, session.calling, code)
                self._count("rejected")
                return code, f"refused by ReceivedCStoreInstanceFilter (0x{code:04X})"
        return None


class Edited(NamedTuple):
    """A data set the scripts let through (edited or not), ready to be spooled."""

    raw: bytes
    header: dict[str, str]
    sop_instance: str
    destinations: tuple[str, ...] = DEFAULT  # onCStore's choice, else the first matching Dicom:Routes entry


def _route_values(ds: Any, router: Router) -> dict[str, str]:
    """The route conditions' elements of a decoded (maybe edited) data set, as :func:`.datasets.header_uids`
    gives them for the unscripted path."""
    out: dict[str, str] = {}
    for tag in router.tags:
        elem = ds.get(tag)
        if elem is None:
            continue
        value = elem.value
        out[tag_key(tag)] = "\\".join(str(v) for v in value) if type(value).__name__ == "MultiValue" else (
            "" if value is None else str(value))
    return out

