"""The durable spool between C-STORE acceptance and forwarding.

An instance is acknowledged to the modality only once it is on disk here, so nothing the
gateway said "success" to can be lost by a crash, a kill -9 or a PACS outage.

Layout (under ``Dicom:SpoolFolder``)::

    queue/     000000000042.dcm ... one file per instance, the name is the arrival sequence
               000000000042.state  its forwarding state once an attempt failed (JSON: attempts,
                                   next attempt, first and last error), written atomically
    tmp/       scratch (emptied at start)
    failed/    <seq>-<SOPInstanceUID>.dcm + .json (why) for instances the PACS refused for good
               or that used up their attempts (``Dicom:ForwardMaxAttempts``)

Sequence numbers are unique across ``queue/`` and ``failed/`` (a restart continues after the
highest of both), so a failed instance's id (its file name's stem) names it for good; the
``/dicomproxy/spool`` API (:mod:`.spool_api`) lists, retries and discards them.

Each spool file is a valid DICOM Part 10 file: the dataset bytes exactly as received, behind a
file meta group that also carries the spool's own metadata (the association's AE titles and
address, the study it belongs to) as JSON in (0002,0102) *Private Information*, under our
(0002,0100) creator UID, with the dataset's length. One file per instance, fsync'ed before
the C-STORE is answered; a short file (a crash mid-write, never acknowledged) is recognised by
that length and dropped. An operator can re-send any spool or failed file with a plain storescu.

Receiving streams (:class:`SpoolWriter`): a data set is kept in memory up to
:data:`SPILL_BYTES` and written in one go when complete, as a small instance always was; a
larger one is written to its file fragment by fragment as the PDUs arrive, behind a file meta
whose JSON slot is padded to a fixed size (and says ``"length": -1`` until the instance is
complete, so a crash leaves a file recovery drops), then the final metadata is written over the
slot and the file fsync'ed. A 300 MB instance then costs the gateway a few PDU buffers of
memory, not two copies of itself. ``Dicom:MaxDatasetMB`` bounds what one C-STORE may write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import shutil
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomproxy.dicom.implementation import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION

log = logging.getLogger(__name__)

PRIVATE_CREATOR_UID = "1.2.826.0.1.3680043.10.1426.1.1"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


MEMORY_COPY_MAX = 16 << 20
"""An instance up to this size also stays in memory for the forwarder (within its cache budget)."""
SPILL_BYTES = 1 << 20
"""A data set larger than this is written to its file as it arrives instead of when complete."""
META_SLOT = 2048
"""Bytes reserved for the JSON of a streamed file (padded with spaces; rewritten when complete)."""


class SpoolError(Exception):
    """A spool file is unreadable (truncated or not ours); the message names the file."""


class DatasetTooLarge(Exception):
    """A data set grew past ``Dicom:MaxDatasetMB``."""


@dataclass
class SpoolEntry:
    """One queued instance. ``origin`` holds CallingAE, CalledAE, RemoteIp, RemotePort."""

    seq: int
    path: Path
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    study: str = ""
    series: str = ""
    patient_id: str = ""
    origin: dict[str, Any] = field(default_factory=dict)
    received: float = 0.0
    data_offset: int = 0
    attempts: int = 0
    data: bytes | None = field(default=None, repr=False)  # in-memory copy, spares the forwarder a read
    length: int = -1  # data set bytes (-1: unknown, read to the end of the file)
    next_at: float = 0.0  # wall-clock time of the next attempt (0: now)
    first_error: str = ""
    first_error_at: float = 0.0
    last_error: str = ""
    last_error_at: float = 0.0
    destinations: tuple[str, ...] = ()  # where it goes (``Dicom:Routes``/``onCStore``); (): ``default`` alone
    dest: str = ""  # the destination this copy is for (one copy per destination; "": the single default)
    done: frozenset[str] = frozenset()  # destinations it was delivered to (or failed for) before a restart

    @property
    def key(self) -> str:
        """What the forwarder orders by: the study (or the instance, when it has none)."""
        return self.study or self.sop_instance

    @property
    def state_path(self) -> Path:
        """Its forwarding state: ``<seq>.state``, or ``<seq>.<destination>.state`` for a routed copy."""
        if not self.dest:
            return self.path.with_suffix(".state")
        return self.path.with_name(f"{self.path.stem}.{safe_name(self.dest)}.state")

    def done_path(self, dest: str) -> Path:
        """The marker saying the instance was delivered to (or failed for good at) ``dest``."""
        return self.path.with_name(f"{self.path.stem}.done-{safe_name(dest)}")

    def failed_attempt(self, error: str, now: float, next_at: float) -> None:
        if not self.first_error:
            self.first_error, self.first_error_at = error, now
        self.last_error, self.last_error_at, self.next_at = error, now, next_at

    def state(self) -> dict[str, Any]:
        """The forwarding state that survives a restart (``<seq>.state``)."""
        return {"attempts": self.attempts, "nextAt": self.next_at, "firstError": self.first_error,
                "firstErrorAt": self.first_error_at, "lastError": self.last_error, "lastErrorAt": self.last_error_at}

    def set_state(self, state: dict[str, Any]) -> None:
        self.attempts = int(state.get("attempts", 0))
        self.next_at = float(state.get("nextAt", 0.0))
        self.first_error, self.last_error = str(state.get("firstError", "")), str(state.get("lastError", ""))
        self.first_error_at = float(state.get("firstErrorAt", 0.0))
        self.last_error_at = float(state.get("lastErrorAt", 0.0))

    def info(self) -> dict[str, Any]:
        return {
            "SOPInstanceUID": self.sop_instance,
            "SOPClassUID": self.sop_class,
            "StudyInstanceUID": self.study,
            "SeriesInstanceUID": self.series,
            "PatientID": self.patient_id,
            "TransferSyntaxUID": self.transfer_syntax,
            "RemoteAE": self.origin.get("CallingAE", ""),
            "Destination": self.dest or "default",
            "Destinations": list(self.destinations or ("default",)),
        }


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else ""


@dataclass(slots=True)
class FailedSummary:
    """What the failed folder's views need of one failed instance, kept in memory (the note's
    JSON is read once, when the index is first built): grouping 100 000 failed instances by
    study then reads no file. Repeated strings are interned (one copy per study and reason).
    Measured (tracemalloc, process CPU, synthetic summaries): ~210 bytes an instance; grouping
    100 000 takes 0.13 s in 2 000 studies, 0.75 s in 100 000 (on the API's worker thread)."""

    id: str
    study: str
    patient: str
    sop_class: str
    calling_ae: str
    reason: str
    status: int | None
    attempts: int
    failed_at: str
    size: int

    @classmethod
    def of(cls, failed_id: str, note: dict[str, Any], size: int) -> FailedSummary:
        status = note.get("status")
        raw = note.get("origin")
        origin: dict[str, Any] = raw if isinstance(raw, dict) else {}
        return cls(failed_id, sys.intern(str(note.get("StudyInstanceUID", ""))),
                   sys.intern(str(note.get("PatientID", ""))), sys.intern(str(note.get("SOPClassUID", ""))),
                   sys.intern(str(origin.get("CallingAE", ""))), sys.intern(str(note.get("reason", "no note"))),
                   status if isinstance(status, int) else None, int(note.get("attempts", 0) or 0),
                   str(note.get("failedAt", "")), size)


MAX_REASONS = 3  # distinct reasons shown per study group (the most frequent), with their counts


def group_failed(items: list[FailedSummary]) -> list[dict[str, Any]]:
    """The failed instances by study, the study that failed first first."""
    groups: dict[str, dict[str, Any]] = {}
    reasons: dict[str, dict[str, int]] = {}
    for f in sorted(items, key=lambda f: f.id):
        g = groups.get(f.study)
        if g is None:
            g = groups[f.study] = {"study": f.study, "patientId": f.patient, "callingAe": f.calling_ae,
                                   "instances": 0, "bytes": 0, "attempts": 0, "statuses": [],
                                   "firstFailedAt": f.failed_at, "lastFailedAt": f.failed_at, "firstId": f.id}
            reasons[f.study] = {}
        g["instances"] += 1
        g["bytes"] += max(f.size, 0)
        g["attempts"] = max(g["attempts"], f.attempts)
        if f.status is not None and f.status not in g["statuses"] and len(g["statuses"]) < MAX_REASONS:
            g["statuses"].append(f.status)
        g["firstFailedAt"] = min(g["firstFailedAt"], f.failed_at) if f.failed_at else g["firstFailedAt"]
        g["lastFailedAt"] = max(g["lastFailedAt"], f.failed_at)
        counts = reasons[f.study]
        counts[f.reason] = counts.get(f.reason, 0) + 1
    for study, g in groups.items():
        top = sorted(reasons[study].items(), key=lambda kv: -kv[1])
        g["reasons"] = [{"reason": r, "instances": n} for r, n in top[:MAX_REASONS]]
        g["otherReasons"] = max(0, len(top) - MAX_REASONS)
    return list(groups.values())


_FAILED_ID = re.compile(r"^(?:unreadable-)?[0-9]{1,20}(?:-[0-9A-Za-z._]{1,64}){0,2}$")
_UNSAFE = re.compile(r"[^0-9A-Za-z_]")


def safe_name(dest: str) -> str:
    """A destination name as a file name part (its letters, digits and ``_``; others ``_``)."""
    return _UNSAFE.sub("_", dest)[:64] or "_"



# --------------------------------------------------------------------------- file meta
def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr in (b"UI", b"OB") else b" "
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def file_meta(
    sop_class: str, sop_instance: str, transfer_syntax: str, source_aet: str = "", private: bytes = b""
) -> bytes:
    """Preamble + ``DICM`` + an explicit-VR-little-endian file meta group, built by hand.

    pydicom's writer costs about a millisecond per call; this is on the C-STORE hot path.
    """
    body = [
        _element(2, 0x0001, b"OB", b"\x00\x01"),
        _element(2, 0x0002, b"UI", sop_class.encode()),
        _element(2, 0x0003, b"UI", sop_instance.encode()),
        _element(2, 0x0010, b"UI", transfer_syntax.encode()),
        _element(2, 0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode()),
        _element(2, 0x0013, b"SH", IMPLEMENTATION_VERSION.encode()),
    ]
    if source_aet:
        body.append(_element(2, 0x0016, b"AE", source_aet.strip().encode("ascii", "replace")[:16]))
    if private:
        body.append(_element(2, 0x0100, b"UI", PRIVATE_CREATOR_UID.encode()))
        body.append(_element(2, 0x0102, b"OB", private))
    group = b"".join(body)
    return b"\0" * 128 + b"DICM" + _element(2, 0x0000, b"UL", struct.pack("<I", len(group))) + group


def read_file_meta(head: bytes) -> tuple[dict[int, bytes], int]:
    """Parse a Part 10 header: ``({element: raw value}, offset of the dataset)``."""
    if len(head) < 132 or head[128:132] != b"DICM":
        raise SpoolError("not a DICOM Part 10 file (no DICM prefix)")
    pos = 132
    out: dict[int, bytes] = {}
    while pos + 8 <= len(head):
        group, elem = struct.unpack_from("<HH", head, pos)
        if group != 2:
            break
        vr = head[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", head, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            start = pos + 8
        if start + length > len(head):
            raise SpoolError("file meta group truncated")
        out[elem] = head[start : start + length]
        pos = start + length
    return out, pos


def _text(raw: bytes | None) -> str:
    return (raw or b"").rstrip(b"\0 ").decode("ascii", "replace")


# --------------------------------------------------------------------------- the spool
class Spool:
    """Thread-safe: C-STORE handlers ``put`` from pynetdicom threads, the forwarder removes."""

    def __init__(self, folder: Path, *, fsync: bool = True) -> None:
        self.folder = Path(folder)
        self.queue_dir = self.folder / "queue"
        self.tmp_dir = self.folder / "tmp"
        self.failed_dir = self.folder / "failed"
        self.fsync = fsync
        self._lock = threading.Lock()
        self._next_seq = 1
        self._depth = 0
        self._failed = 0
        self._unlinks: list[tuple[str, Path]] = []
        self._index: dict[str, FailedSummary] | None = None  # the failed folder, built when first asked
        self._index_lock = threading.Lock()
        self._unlink_cond = threading.Condition()
        self._unlink_stop = False
        self._unlink_thread: threading.Thread | None = None
        self._pending: dict[int, set[str]] = {}  # a routed instance's destinations not yet resolved

    # -- start-up -------------------------------------------------------------------------
    def open(self) -> list[SpoolEntry]:
        """Create the folders, drop unacknowledged tmp files, return the queue in arrival order."""
        for d in (self.queue_dir, self.tmp_dir, self.failed_dir):
            d.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp_dir.iterdir():
            log.info("spool: removing %s (interrupted write, never acknowledged)", leftover.name)
            leftover.unlink(missing_ok=True)
        entries: list[SpoolEntry] = []
        for path in sorted(self.queue_dir.glob("*.dcm")):
            try:
                entries.append(self.load(path))
            except SpoolError as e:
                if str(e).startswith("truncated"):
                    log.warning("spool: dropping %s (%s): a write interrupted before it was acknowledged", path, e)
                    path.unlink(missing_ok=True)
                    continue
                target = self.failed_dir / f"unreadable-{path.name}"
                log.error("spool: %s is unreadable (%s); moved to %s", path, e, target)
                os.replace(path, target)
            except (OSError, ValueError) as e:
                target = self.failed_dir / f"unreadable-{path.name}"
                log.error("spool: %s is unreadable (%s); moved to %s", path, e, target)
                os.replace(path, target)
        entries.sort(key=lambda e: e.seq)
        failed = [p.stem for p in self.failed_dir.glob("*.dcm")]
        self._failed = len(failed)
        highest = max([entries[-1].seq if entries else 0, *(_seq_of(stem) for stem in failed)])
        for orphan in [*self.queue_dir.glob("*.state"), *self.queue_dir.glob("*.done-*")]:
            # a state or delivery marker whose instance is gone (a crash after its removal)
            if not (self.queue_dir / f"{orphan.name.split('.', 1)[0]}.dcm").exists():
                orphan.unlink(missing_ok=True)
        with self._lock:
            self._depth = len(entries)
            self._next_seq = highest + 1
        if self._unlink_thread is None:
            self._unlink_stop = False
            self._unlink_thread = threading.Thread(target=self._unlinker, name="dicom-spool-unlink", daemon=True)
            self._unlink_thread.start()
        if entries:
            log.info("spool: %d instance(s) waiting to be forwarded from a previous run", len(entries))
        return entries

    def close(self) -> None:
        """Finish pending deletions (blocking; call from a thread)."""
        if self._unlink_thread is not None:
            with self._unlink_cond:
                self._unlink_stop = True
                self._unlink_cond.notify()
            self._unlink_thread.join(timeout=30)
            self._unlink_thread = None

    def load(self, path: Path) -> SpoolEntry:
        with open(path, "rb") as f:
            head = f.read(8192)
        meta, offset = read_file_meta(head)
        if 0x0102 not in meta or _text(meta.get(0x0100)) != PRIVATE_CREATOR_UID:
            raise SpoolError("no DicomProxy spool metadata in the file meta")
        info = json.loads(meta[0x0102].rstrip(b"\0 ").decode("utf-8"))
        if "length" in info and path.stat().st_size != offset + int(info["length"]):
            raise SpoolError(f"truncated: {path.stat().st_size} bytes, expected {offset + int(info['length'])}")
        entry = SpoolEntry(
            seq=_seq_of(path.stem),
            path=path,
            sop_class=_text(meta.get(0x0002)),
            sop_instance=_text(meta.get(0x0003)),
            transfer_syntax=_text(meta.get(0x0010)),
            study=info.get("study", ""),
            series=info.get("series", ""),
            patient_id=info.get("patient", ""),
            origin=info.get("origin", {}),
            received=float(info.get("received", 0)),
            data_offset=offset,
            length=int(info.get("length", -1)),
            destinations=tuple(str(d) for d in info.get("destinations", ())),
        )
        if entry.destinations:
            entry.done = frozenset(d for d in entry.destinations if entry.done_path(d).exists())
        state = path.with_suffix(".state")
        if state.exists():
            try:
                entry.set_state(json.loads(state.read_text()))
            except (OSError, ValueError) as e:
                log.warning("spool: ignoring the unreadable forwarding state %s (%s)", state, e)
        return entry

    # -- hot path -------------------------------------------------------------------------
    def begin(
        self, *, sop_class: str, sop_instance: str, transfer_syntax: str, origin: dict[str, Any] | None = None,
        max_bytes: int = 0,
    ) -> SpoolWriter:
        """Start receiving one instance (see :class:`SpoolWriter`); ``max_bytes`` 0: no limit."""
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
        return SpoolWriter(self, seq, sop_class, sop_instance, transfer_syntax, origin or {}, max_bytes)

    def put(
        self,
        dataset: bytes,
        *,
        sop_class: str,
        sop_instance: str,
        transfer_syntax: str,
        study: str,
        series: str = "",
        patient_id: str = "",
        origin: dict[str, Any] | None = None,
        destinations: tuple[str, ...] = (),
    ) -> SpoolEntry:
        """Write one instance durably and return its entry. Raises OSError (disk full...)."""
        writer = self.begin(
            sop_class=sop_class, sop_instance=sop_instance, transfer_syntax=transfer_syntax, origin=origin
        )
        try:
            writer.write(memoryview(dataset))
            return writer.commit(study=study, series=series, patient_id=patient_id, destinations=destinations)
        except BaseException:
            writer.discard()
            raise

    def _committed(self) -> None:
        with self._lock:
            self._depth += 1

    def read_dataset(self, entry: SpoolEntry) -> bytes:
        """The dataset bytes as received (no file meta)."""
        with open(entry.path, "rb") as f:
            if not entry.data_offset:
                _, entry.data_offset = read_file_meta(f.read(8192))
            f.seek(entry.data_offset)
            return f.read()

    def copies(self, entry: SpoolEntry) -> list[SpoolEntry]:
        """One entry per destination still to serve (the entry itself for the single default),
        each with its own forwarding state; remembered until each is :meth:`remove`\\ d or
        :meth:`fail`\\ ed. Empty when every destination was served (a restart after the last
        marker): the instance is removed. Blocking (reads state files): call from a thread at start."""
        if not entry.destinations:
            return [entry]
        remaining = [d for d in dict.fromkeys(entry.destinations) if d not in entry.done]
        if not remaining:
            self._forget(entry)
            return []
        with self._lock:
            self._pending[entry.seq] = set(remaining)
        out = []
        for dest in remaining:
            copy = dataclasses.replace(entry, dest=dest)
            state = copy.state_path
            if state.exists():
                try:
                    copy.set_state(json.loads(state.read_text()))
                except (OSError, ValueError) as e:
                    log.warning("spool: ignoring the unreadable forwarding state %s (%s)", state, e)
            out.append(copy)
        return out

    def copies_new(self, entry: SpoolEntry) -> list[SpoolEntry]:
        """:meth:`copies` for an instance just received (no state yet: nothing read from disk)."""
        if not entry.destinations:
            return [entry]
        dests = list(dict.fromkeys(entry.destinations))
        with self._lock:
            self._pending[entry.seq] = set(dests)
        return [dataclasses.replace(entry, dest=d) for d in dests]

    def _resolve(self, entry: SpoolEntry) -> bool:
        """``entry``'s destination is served; True when it was the instance's last one."""
        if not entry.dest:
            return True
        with self._lock:
            pending = self._pending.get(entry.seq)
            if pending is None:
                return True
            pending.discard(entry.dest)
            if pending:
                return False
            del self._pending[entry.seq]
            return True

    def remove(self, entry: SpoolEntry) -> None:
        """The PACS has the instance: forget it (the unlink itself happens in a background
        thread: on a busy disk it can take milliseconds, and the caller is the event loop). A
        routed copy with other destinations still to serve leaves a delivery marker instead, so
        a restart does not send it there again."""
        if not self._resolve(entry):
            self._background(("touch", entry.done_path(entry.dest)), *(
                [("unlink", entry.state_path)] if entry.first_error else []))
            return
        self._forget(entry)

    def _forget(self, entry: SpoolEntry) -> None:
        with self._lock:
            self._depth -= 1
        paths = [entry.path]
        if not entry.destinations:
            if entry.first_error:  # an attempt failed before: its state was written
                paths.append(entry.path.with_suffix(".state"))
        else:  # a routed instance: its markers and per-destination states (most do not exist)
            for dest in entry.destinations:
                paths += [entry.done_path(dest), entry.path.with_name(f"{entry.path.stem}.{safe_name(dest)}.state")]
        self._background(*(("unlink", p) for p in paths))

    def _background(self, *actions: tuple[str, Path]) -> None:
        with self._unlink_cond:
            idle = not self._unlinks  # the thread sleeps only when the list is empty
            self._unlinks.extend(actions)
            if idle:
                self._unlink_cond.notify()

    def _unlinker(self) -> None:
        while True:
            with self._unlink_cond:
                while not self._unlinks and not self._unlink_stop:
                    self._unlink_cond.wait()
                batch, self._unlinks = self._unlinks, []
                stop = self._unlink_stop
            for action, path in batch:
                try:
                    if action == "touch":
                        path.touch()
                    else:
                        path.unlink()
                except FileNotFoundError:
                    pass
                except OSError as e:
                    log.error("spool: cannot %s %s: %s", "write" if action == "touch" else "delete", path, e)
            if stop:
                return

    def save_state(self, entry: SpoolEntry) -> None:
        """Write the entry's forwarding state atomically (after a failed attempt; blocking)."""
        target = entry.state_path
        tmp = self.tmp_dir / target.name
        with open(tmp, "w") as f:
            json.dump(entry.state(), f)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)

    def fail(self, entry: SpoolEntry, reason: str, **details: Any) -> Path:
        """Move an instance the PACS refused for good (or that used up its attempts) to
        ``failed/`` with a JSON note saying why (blocking)."""
        where = f"-{safe_name(entry.dest)}" if entry.dest else ""
        stem = f"{entry.seq:012d}{where}-{entry.sop_instance or 'unknown'}"
        target = self.failed_dir / f"{stem}.dcm"
        note = {
            "reason": reason,
            "failedAt": _iso(time.time()),
            "attempts": entry.attempts,
            "firstError": entry.first_error or reason,
            "firstErrorAt": _iso(entry.first_error_at or time.time()),
            "lastError": entry.last_error or reason,
            "lastErrorAt": _iso(entry.last_error_at or time.time()),
            **entry.info(),
            "origin": entry.origin,
            "received": _iso(entry.received),
            **details,
        }
        (self.failed_dir / f"{stem}.json").write_text(json.dumps(note, indent=2))
        last = self._resolve(entry)
        if not last:  # other destinations still want it: the failed folder gets its own link
            try:
                os.link(entry.path, target)
            except OSError:
                shutil.copyfile(entry.path, target)
            entry.done_path(entry.dest).touch()
            entry.state_path.unlink(missing_ok=True)
            with self._lock:
                self._failed += 1
            return target
        os.replace(entry.path, target)
        entry.state_path.unlink(missing_ok=True)
        for dest in entry.destinations:
            entry.done_path(dest).unlink(missing_ok=True)
            entry.path.with_name(f"{entry.path.stem}.{safe_name(dest)}.state").unlink(missing_ok=True)
        with self._lock:
            self._depth -= 1
            self._failed += 1
        with self._index_lock:
            if self._index is not None:
                self._index[stem] = FailedSummary.of(stem, note, entry.length)
        return target

    # -- the failed folder (the API; blocking: call from a thread) -------------------------
    def failed_path(self, failed_id: str) -> Path | None:
        """The file of a failed instance by its id (the stem of its name), or None."""
        if not _FAILED_ID.match(failed_id):
            return None
        path = self.failed_dir / f"{failed_id}.dcm"
        return path if path.is_file() else None

    def failed_index(self) -> dict[str, FailedSummary]:
        """Every failed instance's summary, by id: read from the notes the first time (one JSON
        file each: 3.5 s wall for 20 000 here, ~17 s for 100 000, in the API's thread), kept up to date after."""
        with self._index_lock:
            if self._index is None:
                index: dict[str, FailedSummary] = {}
                for path in self.failed_dir.glob("*.dcm"):
                    stem = path.stem
                    try:
                        note = json.loads((self.failed_dir / f"{stem}.json").read_text())
                    except (OSError, ValueError):
                        note = {"reason": "unreadable spool file (no note)" if stem.startswith("unreadable-")
                                else "no note"}
                    try:
                        size = path.stat().st_size
                    except OSError:
                        size = -1
                    index[stem] = FailedSummary.of(stem, note, size)
                self._index = index
            return self._index

    def failed_studies(self, offset: int = 0, limit: int = 50) -> tuple[int, int, list[dict[str, Any]]]:
        """``(studies, instances, groups)``: the failed folder by study (:func:`group_failed`), a page of it."""
        index = self.failed_index()
        with self._index_lock:
            items = list(index.values())
        groups = group_failed(items)
        return len(groups), len(items), groups[offset : offset + limit]

    def failed_ids(self, study: str) -> list[str]:
        """The ids of a study's failed instances, oldest first."""
        index = self.failed_index()
        with self._index_lock:
            return sorted(f.id for f in index.values() if f.study == study)

    def _unindex(self, failed_id: str) -> FailedSummary | None:
        with self._index_lock:
            return self._index.pop(failed_id, None) if self._index is not None else None

    def failed_list(self, offset: int = 0, limit: int = 100, study: str | None = None
                    ) -> tuple[int, list[dict[str, Any]]]:
        """``(total, notes)``: the failed instances in arrival order (of ``study`` only, when
        given), each its note plus ``id``; the notes of the page only are read."""
        if study is not None:
            stems = self.failed_ids(study)
        else:
            stems = sorted(p.stem for p in self.failed_dir.glob("*.dcm"))
        out = []
        for stem in stems[offset : offset + limit]:
            note: dict[str, Any]
            try:
                note = json.loads((self.failed_dir / f"{stem}.json").read_text())
            except (OSError, ValueError):
                note = {"reason": "unreadable spool file (no note)" if stem.startswith("unreadable-") else "no note"}
            out.append({"id": stem, **note})
        return len(stems), out

    def restore(self, failed_id: str) -> SpoolEntry | None:
        """Put a failed instance back in the queue (a new sequence number, attempts from zero);
        None when there is no such id. Raises :class:`SpoolError` when the file is not a spool file."""
        path = self.failed_path(failed_id)
        if path is None:
            return None
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
        target = self.queue_dir / f"{seq:012d}.dcm"
        first = self.load(path)  # refuses a file that is not ours before it moves
        note_path = self.failed_dir / f"{failed_id}.json"
        try:
            dest = str(json.loads(note_path.read_text()).get("Destination", ""))
        except (OSError, ValueError):
            dest = ""
        if first.destinations and dest in first.destinations:  # only where it failed, not everywhere again
            for other in first.destinations:
                if other != dest:
                    target.with_name(f"{target.stem}.done-{safe_name(other)}").touch()
        os.replace(path, target)
        note_path.unlink(missing_ok=True)
        self._unindex(failed_id)
        entry = self.load(target)
        with self._lock:
            self._failed -= 1
            self._depth += 1
        return entry

    def discard_failed(self, failed_id: str) -> FailedSummary | None:
        """Delete a failed instance and its note; returns what it was (for the audit), None when
        there is no such id."""
        path = self.failed_path(failed_id)
        if path is None:
            return None
        summary = self._unindex(failed_id)
        if summary is None:  # not indexed yet: read its note before it goes
            try:
                note = json.loads((self.failed_dir / f"{failed_id}.json").read_text())
            except (OSError, ValueError):
                note = {}
            summary = FailedSummary.of(failed_id, note, -1)
        path.unlink(missing_ok=True)
        (self.failed_dir / f"{failed_id}.json").unlink(missing_ok=True)
        with self._lock:
            self._failed -= 1
        return summary

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def failed_count(self) -> int:
        return self._failed


class SpoolWriter:
    """One instance being received (thread-confined: the association's thread writes it).

    :meth:`write` each data set fragment as it arrives, then :meth:`commit` (durable, counted in
    the spool's depth, returned as a :class:`SpoolEntry`) or :meth:`discard`. Fragments may be
    views of PDU buffers: they are copied or written before ``write`` returns, or kept (as long
    as the instance stays below :data:`MEMORY_COPY_MAX`) for the in-memory copy."""

    def __init__(
        self, spool: Spool, seq: int, sop_class: str, sop_instance: str, transfer_syntax: str,
        origin: dict[str, Any], max_bytes: int,
    ) -> None:
        self.spool = spool
        self.seq = seq
        self.sop_class = sop_class
        self.sop_instance = sop_instance
        self.transfer_syntax = transfer_syntax
        self.origin = origin
        self.max_bytes = max_bytes
        self.path = spool.queue_dir / f"{seq:012d}.dcm"
        self.size = 0
        self._parts: list[bytes | memoryview] | None = []  # None once past MEMORY_COPY_MAX
        self._fd: int | None = None  # open once spilled
        self._head_len = 0
        self.received = time.time()

    def write(self, fragment: memoryview) -> None:
        """Raises :class:`DatasetTooLarge` past ``max_bytes``, OSError when the disk refuses."""
        self.size += len(fragment)
        if self.max_bytes and self.size > self.max_bytes:
            raise DatasetTooLarge(f"data set larger than {self.max_bytes >> 20} MB (Dicom:MaxDatasetMB)")
        if self._fd is None and self.size > SPILL_BYTES:
            self._spill()
        if self._fd is not None:
            _write_all(self._fd, fragment)
        if self._parts is not None:
            if self.size <= MEMORY_COPY_MAX:
                self._parts.append(fragment)
            else:
                self._parts = None

    def _spill(self) -> None:
        """Open the file behind a placeholder meta and write what was kept so far."""
        head = self._meta({"length": -1, "origin": self.origin}, pad=META_SLOT)
        self._head_len = len(head)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        _write_all(self._fd, head)
        for part in self._parts or ():
            _write_all(self._fd, part)

    def _meta(self, info: dict[str, Any], pad: int = 0) -> bytes:
        private = json.dumps(info, separators=(",", ":")).encode()
        if pad:
            if len(private) > pad:
                raise ValueError("spool metadata larger than its slot")
            private = private.ljust(pad, b" ")
        return file_meta(self.sop_class, self.sop_instance, self.transfer_syntax, self.origin.get("CallingAE", ""),
                         private)

    def open_dataset(self) -> Any:
        """A seekable binary stream of the data set received so far (to read its header)."""
        if self._parts is not None:
            return io.BytesIO(self._joined())
        assert self._fd is not None
        f = open(self.path, "rb")  # noqa: SIM115 - the caller closes it
        f.seek(self._head_len)
        return f

    def _joined(self) -> bytes:
        assert self._parts is not None
        if len(self._parts) != 1 or not isinstance(self._parts[0], bytes):
            self._parts = [b"".join(self._parts)]
        joined = self._parts[0]
        assert isinstance(joined, bytes)
        return joined

    def dataset(self) -> bytes:
        """The whole data set (from memory, else read back from the file)."""
        if self._parts is not None:
            return self._joined()
        with self.open_dataset() as f:
            data: bytes = f.read()
            return data

    def commit(
        self, *, study: str, series: str = "", patient_id: str = "", destinations: tuple[str, ...] = ()
    ) -> SpoolEntry:
        """Durable now. ``destinations`` other than ``("default",)`` are recorded in the file's
        metadata (the single default records nothing: the file is what it always was)."""
        if destinations == ("default",):
            destinations = ()
        info: dict[str, Any] = {"study": study, "series": series, "patient": patient_id, "origin": self.origin,
                                "received": self.received, "length": self.size}
        if destinations:
            info["destinations"] = list(destinations)
        data = self._joined() if self._parts is not None else None
        if self._fd is None:
            assert data is not None
            head = self._meta(info)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            _write_all(self._fd, head)
            _write_all(self._fd, data)
            offset = len(head)
        else:
            try:
                head = self._meta(info, pad=META_SLOT)
            except ValueError:  # odd metadata longer than the slot: keep the essentials
                head = self._meta({**info, "origin": {}}, pad=META_SLOT)
            os.pwrite(self._fd, head, 0)
            offset = self._head_len
        try:
            if self.spool.fsync:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None
        self.spool._committed()
        self._parts = None
        return SpoolEntry(
            seq=self.seq, path=self.path, sop_class=self.sop_class, sop_instance=self.sop_instance,
            transfer_syntax=self.transfer_syntax, study=study, series=series, patient_id=patient_id,
            origin=self.origin, received=self.received, data_offset=offset,
            data=data if data is not None and len(data) <= MEMORY_COPY_MAX else None, length=self.size,
            destinations=destinations,
        )

    def discard(self) -> None:
        """Forget the instance (never acknowledged); safe to call more than once."""
        self._parts = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _seq_of(stem: str) -> int:
    digits = stem.removeprefix("unreadable-").split("-", 1)[0]
    return int(digits) if digits.isdigit() else 0


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
