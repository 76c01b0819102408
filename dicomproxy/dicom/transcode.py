"""Transcoding (``Dicom:Transcode`` ``ToAccepted``): an instance a destination accepts the SOP
class of, but not in its compressed transfer syntax, is decoded and sent in a syntax the
destination accepted.

Decoding is pydicom's (``Dataset.decompress`` with the pylibjpeg plugins: JPEG, JPEG-LS, JPEG
2000, HTJ2K, RLE; Pillow where pylibjpeg lacks a codec), so the pixels the destination gets are
exactly what pydicom decodes from the original. Only the pixel data and what describes its
encoding change (Transfer Syntax, Photometric Interpretation from YBR to RGB for JPEG baseline,
Planar Configuration, Lossy Image Compression kept as it was): the character set, private tags
and every other element are those of the original, re-encoded in the target syntax.

The target syntax, in order: Explicit VR Little Endian, Implicit VR Little Endian, then a
compressed syntax the destination accepted that pydicom can encode losslessly (RLE Lossless,
JPEG 2000 Lossless). Lossy re-compression is never done.

Memory: the compressed data set, its decoded pixel data and the re-encoded result are in memory
at once, about twice the decoded size; ``Dicom:TranscodeMaxMB`` refuses (for that destination,
the reason logged) an instance whose decoded pixel data exceed it, read from the header before
anything is decoded. Transcoding runs off the event loop (a thread), never on the relay's hot
path: with ``Never`` (the default) nothing here is called.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

from dicomproxy.config.model import INHERIT
from dicomproxy.dicom import datasets

log = logging.getLogger(__name__)

NEVER = "Never"
TO_ACCEPTED = "ToAccepted"

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
TARGETS = (EXPLICIT, IMPLICIT, RLE_LOSSLESS, J2K_LOSSLESS)
"""What a transcoded instance is sent as, in order of preference."""


class TranscodeError(Exception):
    """The instance cannot be transcoded (no codec, too large, corrupt data): the message says why."""


@functools.lru_cache(maxsize=256)
def decodable(transfer_syntax: str) -> bool:
    """A compressed syntax pydicom can decode with the installed plugins."""
    uid = UID(transfer_syntax)
    if not uid.is_transfer_syntax or not uid.is_compressed:
        return False
    from pydicom.pixels import get_decoder

    try:
        return bool(get_decoder(uid).is_available)
    except (NotImplementedError, ValueError):
        return False


@functools.lru_cache(maxsize=16)
def _encodable(transfer_syntax: str) -> bool:
    if transfer_syntax in (EXPLICIT, IMPLICIT):
        return True
    from pydicom.pixels import get_encoder

    try:
        return bool(get_encoder(UID(transfer_syntax)).is_available)
    except (NotImplementedError, ValueError):
        return False


def target(from_syntax: str, accepted: Iterable[str]) -> str | None:
    """The syntax to transcode an instance in ``from_syntax`` to, of those ``accepted`` for its
    SOP class; None when there is none (or ``from_syntax`` cannot be decoded)."""
    if not decodable(from_syntax):
        return None
    offered = set(accepted)
    return next((ts for ts in TARGETS if ts in offered and ts != from_syntax and _encodable(ts)), None)


def decoded_size(ds: Dataset) -> int:
    """Bytes of the decoded pixel data (from the header: nothing is decoded)."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return rows * cols * samples * frames * max(bits, 8) // 8


def transcode(data: bytes, from_syntax: str, to_syntax: str, *, max_bytes: int = 0) -> bytes:
    """``data`` (a data set without file meta, in ``from_syntax``) decoded and re-encoded in
    ``to_syntax``; raises :class:`TranscodeError`."""
    if from_syntax == to_syntax:
        return data
    src, dst = UID(from_syntax), UID(to_syntax)
    try:
        ds = datasets.decode(data, from_syntax)
    except Exception as e:
        raise TranscodeError(f"cannot read the instance as {src.name}: {e}") from None
    if not src.is_compressed or "PixelData" not in ds:  # nothing encapsulated: re-encoding is enough
        return _encode(ds, to_syntax)
    size = decoded_size(ds)
    if max_bytes and size > max_bytes:
        raise TranscodeError(f"its decoded pixel data ({size >> 20} MB) exceed Dicom:TranscodeMaxMB "
                             f"({max_bytes >> 20} MB)")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = src
    try:
        ds.decompress(generate_instance_uid=False)  # to Explicit VR Little Endian, native pixel data
        if dst.is_compressed:
            ds.compress(dst, generate_instance_uid=False)
    except Exception as e:
        raise TranscodeError(f"cannot transcode {src.name} to {dst.name}: {e}") from None
    del ds.file_meta
    return _encode(ds, to_syntax)


def _encode(ds: Dataset, to_syntax: str) -> bytes:
    try:
        return datasets.encode(ds, to_syntax)
    except Exception as e:
        raise TranscodeError(f"cannot encode the instance as {UID(to_syntax).name}: {e}") from None



class Transcoding:
    """What ``Dicom:Transcode`` allows, and the log line and metric of each transcode (an engine
    object: built by the DICOM component with the gateway's metrics, or alone by a command)."""

    def __init__(self, allowed: bool, max_bytes: int, counter: Any = None, key: str = "Dicom:Transcode") -> None:
        self.allowed = allowed
        self.max_bytes = max_bytes
        self.key = key  # the setting that decided, named in a refusal (the fix)
        self.counter = counter  # dicomproxy_dicom_transcoded_total{from_syntax, to_syntax, result}

    @classmethod
    def of(cls, settings: Any, counter: Any = None) -> Transcoding:
        """From :class:`.config.model.DicomSettings`."""
        return cls(settings.transcode == TO_ACCEPTED, settings.transcode_max_mb << 20, counter)

    def for_ae(self, ae: Any) -> Transcoding:
        """This (the global ``Dicom:Transcode``) with a destination's own ``Transcode`` and
        ``TranscodeMaxMB`` (a ``Dicom:Modalities`` entry, ``Dicom:Upstream``, an ``Upstreams:Servers``
        entry's ``Dicom``) where set; ``ae`` None or without them: this one. The counter is shared."""
        mode = getattr(ae, "transcode", INHERIT) if ae is not None else INHERIT
        max_mb = getattr(ae, "transcode_max_mb", 0) if ae is not None else 0
        if mode == INHERIT and not max_mb:
            return self
        key = self.key if mode == INHERIT else "the destination's own Transcode (its Dicom:Modalities entry or Dicom)"
        return Transcoding(self.allowed if mode == INHERIT else mode == TO_ACCEPTED,
                           max_mb << 20 if max_mb else self.max_bytes, self.counter, key)

    def run(self, data: bytes, from_syntax: str, to_syntax: str, what: str) -> bytes:
        """:func:`transcode`, logged and counted; ``what`` names the instance and destination."""
        started = time.perf_counter()
        try:
            out = transcode(data, from_syntax, to_syntax, max_bytes=self.max_bytes)
        except TranscodeError as e:
            log.error("transcoding %s from %s to %s failed: %s", what, UID(from_syntax).name, UID(to_syntax).name, e)
            self._count(from_syntax, to_syntax, "failed")
            raise
        log.info("transcoded %s from %s to %s (%d -> %d bytes, %.1f ms)", what, UID(from_syntax).name,
                 UID(to_syntax).name, len(data), len(out), (time.perf_counter() - started) * 1000)
        self._count(from_syntax, to_syntax, "ok")
        return out

    def _count(self, from_syntax: str, to_syntax: str, result: str) -> None:
        if self.counter is not None:
            self.counter.inc(from_syntax=from_syntax, to_syntax=to_syntax, result=result)


NO_TRANSCODING = Transcoding(False, 0)
