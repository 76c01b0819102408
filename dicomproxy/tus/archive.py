"""What a finished upload holds: one DICOM Part-10 file, or a ZIP of them, read within limits.

:func:`scan` classifies the upload and lists its instances (:class:`Part`: a name, a size and
how to open it) for the importer (:mod:`.importer`), which streams them to the PACS. A file or
member without ``DICM`` at byte 128 that is a dataset without a Part-10 header is sent with a
file meta put in front (:mod:`.rawdataset`); members that are not DICOM, ``DICOMDIR`` files and
macOS ``._`` files are skipped and named; a ZIP inside the ZIP is skipped too, never expanded.

A ZIP is checked before anything reaches the PACS, and refused whole (:class:`ArchiveRefused`,
which the import reports as ``import.failed`` with the reason) when

* its central directory lists more than ``Tus:ZipMaxMembers`` entries (read from the end
  record before :mod:`zipfile` parses the directory: 200,000 empty members, a 17 MB file, cost
  116 MB of memory and 1.2 s to open, so a 20 GB one could exhaust the machine);
* a member declares more than ``Tus:ZipMaxRatio`` times its compressed size (members that
  expand to less than 1 MiB are not held to it), or all members together declare more than
  that ratio times the archive's size (members that overlap, the other zip-bomb shape);
* all members together declare more than ``Tus:ZipMaxExpandedGB``.

The declared sizes are not trusted alone: while a member is streamed, its bytes are counted,
and more than it declared, or more than ``Tus:ZipMaxExpandedGB`` for the whole ZIP, stops the
import with :class:`ArchiveRefused`. (:mod:`zipfile` itself already stops a member at its
declared size; the count makes the cap hold whatever the library does.)

``zipfile._EndRecData`` is private but has read the end record (and its ZIP64 form) unchanged
since Python 2.6; nothing public gives the entry count without parsing the whole directory.
"""

from __future__ import annotations

import functools
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Protocol

from dicomproxy.tus import rawdataset

log = logging.getLogger(__name__)

DICOMDIR_NAMES = {"DICOMDIR"}
GIB = 1024**3
RATIO_FLOOR = 1024 * 1024  # a member expanding to less than this is not held to the ratio
_ZIP_HEADS = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")


class ArchiveRefused(Exception):
    """The ZIP breaks a limit (the message names it and its config key); nothing of it is sent."""


@dataclass(frozen=True)
class ZipLimits:
    """``Tus:ZipMaxExpandedGB``, ``Tus:ZipMaxRatio``, ``Tus:ZipMaxMembers``; 0 turns one off."""

    max_expanded: int = 100 * GIB
    max_ratio: float = 100.0
    max_members: int = 100_000


class Source(Protocol):
    """What the importer reads an instance from."""

    def read(self, n: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


@dataclass
class Part:
    """One DICOM instance to send: a name for messages, its size and how to open it."""

    name: str
    size: int
    open: Callable[[], Source]


def is_dicom_header(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def scan(path: Path, limits: ZipLimits | None = None) -> tuple[str, list[Part], list[str]]:
    """Blocking: classify the upload and list its instances -> (kind, parts, skipped names).

    Raises :class:`ArchiveRefused` for a ZIP over a limit or one that cannot be read."""
    with open(path, "rb") as f:
        head = f.read(132)
        if is_dicom_header(head):
            return "dicom", [Part(path.name, path.stat().st_size, lambda: open(path, "rb"))], []
        if head[:4] == b"PK\x03\x04" or zipfile.is_zipfile(path):
            try:
                return ("zip", *_scan_zip(path, limits or ZipLimits()))
            except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
                raise ArchiveRefused(f"{path.name}: not a readable ZIP ({e})") from None
        found = rawdataset.sniff(head + f.read(rawdataset.HEAD - len(head)))
    if found is not None:
        prefix = rawdataset.file_meta(found)
        log.info("%s: a dataset without a Part-10 header (%s); sent with a file meta", path.name, found.transfer_syntax)
        return "dicom", [Part(path.name, len(prefix) + path.stat().st_size,
                              lambda: rawdataset.Prefixed(prefix, open(path, "rb")))], []
    return "unknown", [], [path.name]


def _scan_zip(path: Path, limits: ZipLimits) -> tuple[list[Part], list[str]]:
    _check_entry_count(path, limits)
    parts: list[Part] = []
    skipped: list[str] = []
    with zipfile.ZipFile(path) as zf:
        members = [info for info in zf.infolist() if not info.is_dir()]
        _check_declared_sizes(path, members, limits)
        archive = _Archive(path, limits.max_expanded)
        for info in members:
            base = PurePosixPath(info.filename).name
            if base.upper() in DICOMDIR_NAMES or base.startswith("._"):
                skipped.append(info.filename)
                continue
            try:
                with zf.open(info) as member:
                    head = member.read(132)
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError) as e:
                skipped.append(f"{info.filename} ({e})")
                continue
            if head[:4] in _ZIP_HEADS:
                skipped.append(f"{info.filename} (a ZIP inside the ZIP: not expanded)")
                continue
            if not is_dicom_header(head):
                raw = _raw_member(zf, info, head, archive)
                if raw is None:
                    skipped.append(info.filename)
                else:
                    parts.append(raw)
                continue
            parts.append(Part(info.filename, info.file_size, functools.partial(archive.open, info)))
    archive.members = len(parts)
    return parts, skipped


def _raw_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, head: bytes, archive: _Archive) -> Part | None:
    """A member that is a dataset without a Part-10 header (:mod:`.rawdataset`), with its file meta; else None."""
    if len(head) < 132:
        found = rawdataset.sniff(head)
    else:
        with zf.open(info) as member:
            found = rawdataset.sniff(member.read(rawdataset.HEAD))
    if found is None:
        return None
    prefix = rawdataset.file_meta(found)
    return Part(info.filename, len(prefix) + info.file_size,
                lambda: rawdataset.Prefixed(prefix, archive.open(info)))


def _check_entry_count(path: Path, limits: ZipLimits) -> None:
    if limits.max_members <= 0:
        return
    with open(path, "rb") as f:
        end = zipfile._EndRecData(f)  # type: ignore[attr-defined]  # see the module docstring
    if end is None:
        raise zipfile.BadZipFile("no end of central directory record")
    entries = int(end[zipfile._ECD_ENTRIES_TOTAL])  # type: ignore[attr-defined]
    if entries > limits.max_members:
        raise ArchiveRefused(
            f"{path.name}: {entries} entries, more than Tus:ZipMaxMembers ({limits.max_members}); "
            "split the archive or raise the limit"
        )


def _check_declared_sizes(path: Path, members: list[zipfile.ZipInfo], limits: ZipLimits) -> None:
    total = 0
    for info in members:
        total += info.file_size
        if (limits.max_ratio > 0 and info.file_size > RATIO_FLOOR
                and info.file_size > limits.max_ratio * max(info.compress_size, 1)):
            raise ArchiveRefused(
                f"{path.name}: member {info.filename} expands {info.file_size / max(info.compress_size, 1):.0f}"
                f" times ({info.compress_size} -> {info.file_size} bytes), more than Tus:ZipMaxRatio"
                f" ({limits.max_ratio:g}): a zip bomb or not medical images; raise the limit if it is genuine"
            )
    archive = path.stat().st_size
    if limits.max_ratio > 0 and total > RATIO_FLOOR and total > limits.max_ratio * max(archive, 1):
        raise ArchiveRefused(
            f"{path.name}: its members expand to {total} bytes, {total / max(archive, 1):.0f} times the"
            f" archive's {archive} (overlapping members?), more than Tus:ZipMaxRatio ({limits.max_ratio:g})"
        )
    if 0 < limits.max_expanded < total:
        raise ArchiveRefused(
            f"{path.name}: its members expand to {total / GIB:.1f} GiB, more than Tus:ZipMaxExpandedGB"
            f" ({limits.max_expanded / GIB:g}); split the archive or raise the limit"
        )


class _Archive:
    """The ZIP an import reads its members from: opened once for all of them (each opening
    parses the whole central directory: 30 ms for 5,000 entries, so one per member made a
    5,000-instance study spend minutes opening), closed when the last member is, or when the
    import drops its parts. Also counts the bytes streamed out against the expanded cap."""

    def __init__(self, path: Path, max_expanded: int) -> None:
        self.path = path
        self.max_expanded = max_expanded
        self.members = 0  # how many will be read (set once the scan is done)
        self.expanded = 0
        self._closed = 0
        self._zf: zipfile.ZipFile | None = None

    def open(self, info: zipfile.ZipInfo) -> _Member:
        if self._zf is None:
            self._zf = zipfile.ZipFile(self.path)
        return _Member(self, self._zf.open(info), info)

    def add(self, name: str, n: int) -> None:
        self.expanded += n
        if 0 < self.max_expanded < self.expanded:
            raise ArchiveRefused(
                f"{name}: the ZIP expanded past Tus:ZipMaxExpandedGB ({self.max_expanded / GIB:g}) while it was sent"
            )

    def member_closed(self) -> None:
        self._closed += 1
        if self._closed >= self.members and self._zf is not None:
            self._zf.close()
            self._zf = None


class _Member:
    """A ZIP member being read; its bytes are counted against what its header declares."""

    def __init__(self, archive: _Archive, file: IO[bytes], info: zipfile.ZipInfo) -> None:
        self._archive = archive
        self._file = file
        self._info = info
        self._read = 0

    def read(self, n: int = -1, /) -> bytes:
        data = self._file.read(n)
        self._read += len(data)
        if self._read > self._info.file_size:
            raise ArchiveRefused(
                f"{self._info.filename}: more bytes than the {self._info.file_size} its header declares"
            )
        self._archive.add(self._info.filename, len(data))
        return data

    def close(self) -> None:
        try:
            self._file.close()
        finally:
            self._archive.member_closed()
