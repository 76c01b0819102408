"""DICOM datasets without a Part-10 header (no preamble, no ``DICM``, no file meta), as some
modalities and old archives write them: found, and given a file meta so STOW-RS takes them.

:func:`sniff` reads the first bytes of a file and answers the transfer syntax it is encoded in
(implicit VR little endian, explicit VR little endian, explicit VR big endian) and its SOP
Class and Instance UIDs, or None. It must not take a PDF, a ZIP, a text or random bytes for a
dataset, so a candidate passes only if all of these hold:

* the first element is in group 0008 (a composite object's first group; a command set
  (0000), a file meta group (0002) or anything else is refused), and for the explicit VR
  syntaxes its VR is one of the standard two-letter VRs;
* pydicom reads the elements up to (0008,0018) in that syntax with tags strictly ascending
  and every length inside what was read;
* (0008,0016) SOP Class UID and (0008,0018) SOP Instance UID are there and are valid UIDs
  (digits and dots, at most 64 characters, no empty component).

:func:`file_meta` builds the group 0002 with pydicom (``FileMetaDataset`` and
``write_file_meta_info``: its group length is computed there) and returns the 132-byte
preamble, ``DICM`` and the meta: what goes in front of the file's own bytes, which are then
streamed unchanged (:class:`Prefixed`).
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from typing import Protocol

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicomproxy import __version__

HEAD = 64 << 10  # bytes read to decide: the elements up to (0008,0018) are well within them
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
_SOP_INSTANCE = 0x00080018


@dataclass(frozen=True)
class Sniffed:
    """What :func:`sniff` found: the transfer syntax and the two UIDs the file meta repeats."""

    transfer_syntax: str
    sop_class: str
    sop_instance: str


def sniff(head: bytes) -> Sniffed | None:
    """The encoding and UIDs of a raw dataset starting at ``head[0]``, or None (see the module docstring)."""
    syntax = _candidate(head)
    if syntax is None:
        return None
    implicit, little = syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian
    try:
        with warnings.catch_warnings():  # pydicom warns about every odd value of a file that is not DICOM
            warnings.simplefilter("ignore")
            ds = read_dataset(io.BytesIO(head), implicit, little, stop_when=_past_sop_instance)
            if not _ascending(ds):
                return None
            sop_class, sop_instance = str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", ""))
    except Exception:  # noqa: BLE001 - whatever pydicom raises on bytes that are not a dataset
        return None
    if not (_is_uid(sop_class) and _is_uid(sop_instance)):
        return None
    return Sniffed(syntax, sop_class, sop_instance)


def _candidate(head: bytes) -> str | None:
    """The one syntax the first element could be in (its group must be 0008)."""
    if len(head) < 16:
        return None
    explicit = head[4:6] in _VRS
    if head[0:2] == b"\x08\x00":
        return ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian
    if head[0:2] == b"\x00\x08" and explicit:
        return ExplicitVRBigEndian
    return None


def _past_sop_instance(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) > _SOP_INSTANCE


def _ascending(ds: Dataset) -> bool:
    tags = [int(t) for t in ds.keys()]
    return bool(tags) and tags == sorted(set(tags)) and all(0x00080000 <= t <= _SOP_INSTANCE for t in tags)


def _is_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and _UID.fullmatch(value) is not None


def file_meta(found: Sniffed) -> bytes:
    """Preamble, ``DICM`` and the group 0002 for a dataset :func:`sniff` recognised."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(found.sop_class)
    meta.MediaStorageSOPInstanceUID = UID(found.sop_instance)
    meta.TransferSyntaxUID = UID(found.transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"DICOMPROXY_{__version__}"[:16]
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue()


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


class Prefixed:
    """A file read as ``prefix`` followed by its own bytes (the importer's :class:`~.archive.Source`)."""

    def __init__(self, prefix: bytes, file: Readable) -> None:
        self._prefix = prefix
        self._file = file

    def read(self, n: int = -1, /) -> bytes:
        if self._prefix:
            if n < 0:
                head, self._prefix = self._prefix, b""
                return head + self._file.read()
            head, self._prefix = self._prefix[:n], self._prefix[n:]
            return head if len(head) == n else head + self._file.read(n - len(head))
        return self._file.read(n)

    def close(self) -> None:
        self._file.close()
