"""The durable audit buffer: append-only segment files, one cursor per collector.

Every audit message is appended here (and fsync'ed, once per batch) before any collector is
tried, so a collector that is down, a network that is cut, or a gateway that is restarted
loses nothing: each collector's sender reads on from its own cursor, in sequence order, and
a segment file is deleted once every cursor is past it.

Layout (under ``Audit:BufferFolder``)::

    segments/00000000000000000001.seg   records from sequence 1 on; a new file every SEGMENT_BYTES
    cursors/<collector>.json            {"seq": the last sequence that collector has}

A record is ``>IQ`` (payload length, sequence) followed by the payload (the RFC 5424 message).
A crash mid-append leaves a short last record; :meth:`Journal.open` cuts it off (it was never
fsync'ed, so nothing had been promised about it).

Bounded by ``Audit:BufferMaxMB``: an append that would pass it is refused (``append`` returns
False) and the caller counts the drop: the newest messages are dropped, the hot path is never
blocked. A few KB of headroom (``reserve=True``) are kept for the trail's own "audit recording
stopped/started" alerts, so the gap itself is on record.

Thread-safe: the trail appends from its writer thread, senders read and acknowledge from theirs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

HEADER = struct.Struct(">IQ")
SEGMENT_BYTES = 4 << 20
RESERVE_BYTES = 64 << 10
MAX_RECORD = 16 << 20


@dataclass
class Segment:
    first: int
    path: Path
    last: int = 0  # 0: empty
    size: int = 0


class Journal:
    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.segment_bytes = max(16 << 10, min(SEGMENT_BYTES, max_bytes // 8))
        self._segments: list[Segment] = []
        self._cursors: dict[str, int] = {}
        self._lock = threading.Lock()
        self._out: BinaryIO | None = None
        self._dirty = False
        self.next_seq = 1

    # -- lifecycle -----------------------------------------------------------------------
    def open(self, cursors: list[str]) -> None:
        """Read the segments (cutting a torn last record) and the cursors of these collectors."""
        (self.folder / "segments").mkdir(parents=True, exist_ok=True)
        (self.folder / "cursors").mkdir(parents=True, exist_ok=True)
        for path in sorted((self.folder / "segments").glob("*.seg")):
            seg = Segment(int(path.stem), path)
            seg.last, seg.size = _scan(path, repair=True)
            self._segments.append(seg)
        if self._segments:
            self.next_seq = max(s.last for s in self._segments) + 1 if any(s.last for s in self._segments) \
                else self._segments[-1].first
        oldest = self._segments[0].first - 1 if self._segments else self.next_seq - 1
        for name in cursors:
            seq = self._read_cursor(name)
            # A new collector starts with what is still buffered, not with the past.
            self._cursors[name] = max(seq, oldest) if seq is not None else self.next_seq - 1
            self._write_cursor(name, self._cursors[name])
        self._collect()

    def close(self) -> None:
        with self._lock:
            if self._out is not None:
                self.sync()
                self._out.close()
                self._out = None

    # -- writing -------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return sum(s.size for s in self._segments)

    def append(self, payload: bytes, *, reserve: bool = False) -> int:
        """Append one record; its sequence, or 0 when the buffer is full (the caller counts the drop)."""
        need = HEADER.size + len(payload)
        limit = self.max_bytes + (RESERVE_BYTES if reserve else 0)
        with self._lock:
            if len(payload) > MAX_RECORD or self.size + need > limit:
                return 0
            seg = self._current(need)
            seq = self.next_seq
            assert self._out is not None
            self._out.write(HEADER.pack(len(payload), seq) + payload)
            seg.last, seg.size = seq, seg.size + need
            self.next_seq += 1
            self._dirty = True
            return seq

    def sync(self) -> None:
        """fsync what was appended since the last call (once per batch of the writer)."""
        if self._out is not None and self._dirty:
            self._out.flush()
            os.fsync(self._out.fileno())
            self._dirty = False

    def _current(self, need: int) -> Segment:
        seg = self._segments[-1] if self._segments else None
        if seg is not None and self._out is not None and (seg.size == 0 or seg.size + need <= self.segment_bytes):
            return seg
        if self._out is not None:
            self.sync()
            self._out.close()
            self._out = None
        if seg is None or (seg.size and seg.size + need > self.segment_bytes):
            seg = Segment(self.next_seq, self.folder / "segments" / f"{self.next_seq:020d}.seg")
            self._segments.append(seg)
            _fsync_dir(seg.path.parent, create=seg.path)
        self._out = open(seg.path, "ab")  # noqa: SIM115 - kept open until the segment is full
        return seg

    # -- reading -------------------------------------------------------------------------
    def reader(self, name: str) -> Reader:
        """A reader that goes on from ``name``'s cursor."""
        return Reader(self, self.cursor(name))

    def _after(self, after: int) -> list[Segment]:
        with self._lock:
            if self._out is not None:
                self._out.flush()
            return [s for s in self._segments if s.last > after]

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1

    def cursor(self, name: str) -> int:
        return self._cursors.get(name, self.next_seq - 1)

    def ack(self, name: str, seq: int) -> None:
        """``name`` has everything up to ``seq``: move its cursor and delete what all cursors passed."""
        with self._lock:
            if seq <= self._cursors.get(name, 0):
                return
            self._cursors[name] = seq
        self._write_cursor(name, seq)
        self._collect()

    def _collect(self) -> None:
        with self._lock:
            floor = min(self._cursors.values(), default=self.next_seq - 1)
            while len(self._segments) > 1 and self._segments[0].last <= floor:
                seg = self._segments.pop(0)
                seg.path.unlink(missing_ok=True)

    # -- cursors -------------------------------------------------------------------------
    def _cursor_path(self, name: str) -> Path:
        return self.folder / "cursors" / (re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".json")

    def _read_cursor(self, name: str) -> int | None:
        try:
            return int(json.loads(self._cursor_path(name).read_text())["seq"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_cursor(self, name: str, seq: int) -> None:
        # Not fsync'ed: a cursor lost in a crash only means messages are sent again (at least once).
        path = self._cursor_path(name)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"seq": seq}))
        os.replace(tmp, path)


class Reader:
    """Reads a journal in order from a sequence on, remembering its place in the segment files
    (a sender reads the tail over and over: it must not rescan a segment each time)."""

    def __init__(self, journal: Journal, after: int) -> None:
        self.journal = journal
        self.after = after
        self._place: tuple[Path, int] | None = None  # (segment, offset just past ``after``)

    def rewind(self, after: int) -> None:
        """Read again from ``after`` (records sent on a connection that then broke)."""
        if after != self.after:
            self.after, self._place = after, None

    def read(self, max_bytes: int = 256 << 10) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        total = 0
        for seg in self.journal._after(self.after):
            start = self._place[1] if self._place is not None and self._place[0] == seg.path else 0
            try:
                f = open(seg.path, "rb")  # noqa: SIM115
            except FileNotFoundError:
                continue  # collected meanwhile: every cursor was past it
            with f:
                f.seek(start)
                while total < max_bytes:
                    record = _next(f)
                    if record is None:
                        break
                    seq, payload = record
                    self._place = (seg.path, f.tell())
                    if seq <= self.after:
                        continue
                    self.after = seq
                    out.append(record)
                    total += len(payload)
            if total >= max_bytes:
                break
        return out


def _next(f: BinaryIO) -> tuple[int, bytes] | None:
    head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    length, seq = HEADER.unpack(head)
    payload = f.read(length)
    return (seq, payload) if len(payload) == length else None


def _scan(path: Path, *, repair: bool) -> tuple[int, int]:
    """(last sequence, good size) of a segment; with ``repair`` a torn tail is cut off."""
    last = good = 0
    with open(path, "rb") as f:
        while True:
            head = f.read(HEADER.size)
            if len(head) < HEADER.size:
                break
            length, seq = HEADER.unpack(head)
            if length > MAX_RECORD or len(f.read(length)) < length:
                break
            last, good = seq, f.tell()
    if repair and path.stat().st_size != good:
        log.warning("audit buffer: %s ends in a torn record (a crash mid-write); cut at %d bytes", path, good)
        with open(path, "r+b") as f:
            f.truncate(good)
    return last, good


def _fsync_dir(folder: Path, create: Path) -> None:
    create.touch()
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
