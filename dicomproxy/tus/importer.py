"""The default handling of a finished upload: send its DICOM instances to the PACS (STOW-RS).

An upload is either one DICOM file (Part-10, ``DICM`` at byte 128, or a dataset without that
header in implicit/explicit little or explicit big endian, sent with a file meta built for it:
:mod:`.rawdataset`) or a ZIP of them (members that are not DICOM, and ``DICOMDIR`` files, are
skipped and counted; the ZIP is read within the limits of :mod:`.archive`, which refuses zip
bombs before anything is sent). Instances go to
``{Upstream:Url}{Upstream:DicomWebRoot}/studies`` as ``multipart/related; type="application/dicom"``
requests of at most ``Tus:ImportBatchSize`` instances each. A request body is streamed from
the file (or from the ZIP member, decompressed on the fly) in 1 MB pieces read in a thread,
with an exact ``Content-Length`` computed beforehand, so any PACS accepts it and memory stays
flat whatever the size of the upload.

The STOW-RS answer tells which instances were stored (``ReferencedSOPSequence``) and which
failed (``FailedSOPSequence``, with the failure reason); :class:`ImportReport` collects both.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from dicomproxy.tus.archive import Part, ZipLimits, scan

log = logging.getLogger(__name__)

PIECE = 1024 * 1024


class ImportFailed(Exception):
    """The import did not store everything; the message says what happened."""


@dataclass
class ImportReport:
    kind: str = ""  # "dicom" | "zip" | "unknown"
    instances: int = 0
    stored: list[str] = field(default_factory=list)  # SOP Instance UIDs the PACS confirmed
    failed: list[dict[str, str]] = field(default_factory=list)  # {"sop": uid or part, "reason": ...}
    skipped: list[str] = field(default_factory=list)  # members that are not DICOM
    studies: set[str] = field(default_factory=set)  # retrieve URLs / study UIDs reported back
    batches: int = 0

    @property
    def ok(self) -> bool:
        return self.instances > 0 and not self.failed

    def summary(self) -> dict[str, Any]:
        return {
            "content": self.kind,
            "instances": self.instances,
            "stored": len(self.stored),
            "failed": len(self.failed),
            "skipped": len(self.skipped),
            "batches": self.batches,
            "sopInstanceUids": self.stored[:1000],
            "failures": self.failed[:100],
            "skippedFiles": self.skipped[:100],
        }


class StowClient:
    """Streams batches of instances to a STOW-RS endpoint through the gateway's upstream client."""

    def __init__(
        self,
        url: str,
        client: httpx.AsyncClient,
        batch_size: int,
        connect_timeout: float = 10,
        read_timeout: float = 600,
        zip_limits: ZipLimits | None = None,
    ) -> None:
        self.url = url
        self.zip_limits = zip_limits or ZipLimits()
        self.client = client
        self.batch_size = max(1, batch_size)
        # No total timeout: a batch of large instances may rightly take long to send; a PACS
        # that stops reading or answering is caught by the read timeout (its silence) instead.
        self.timeout = httpx.Timeout(read_timeout, connect=connect_timeout, pool=None)

    async def import_file(self, path: Path) -> ImportReport:
        loop = asyncio.get_running_loop()
        kind, parts, skipped = await loop.run_in_executor(None, scan, path, self.zip_limits)
        report = ImportReport(kind=kind, instances=len(parts), skipped=skipped)
        for i in range(0, len(parts), self.batch_size):
            await self._send_batch(parts[i : i + self.batch_size], report)
        return report

    async def _send_batch(self, batch: list[Part], report: ImportReport) -> None:
        boundary = "dicomproxy-" + secrets.token_hex(12)
        heads = [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() for _ in batch]
        tail = f"--{boundary}--\r\n".encode()
        length = sum(len(h) + p.size + 2 for h, p in zip(heads, batch, strict=True)) + len(tail)
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
            "Content-Length": str(length),
        }
        report.batches += 1
        try:
            # an exact Content-Length with a streamed body: the client sends exactly that many
            # bytes or drops the connection, so the PACS never stores a short batch
            resp = await self.client.post(
                self.url, content=_multipart(heads, batch, tail), headers=headers, timeout=self.timeout
            )
            text, status = resp.text, resp.status_code
        except (httpx.HTTPError, OSError) as e:
            raise ImportFailed(f"STOW-RS to {self.url} failed: {e or type(e).__name__}") from e
        self._read_answer(status, text, batch, report)

    @staticmethod
    def _read_answer(status: int, text: str, batch: list[Part], report: ImportReport) -> None:
        try:
            answer = json.loads(text) if text.strip() else {}
        except ValueError:
            answer = {}
        if not isinstance(answer, dict):
            answer = {}
        stored = [_uid(item, "00081155") for item in _seq(answer, "00081199")]
        failed = [
            {"sop": _uid(item, "00081155"), "reason": str(_value(item, "00081197"))}
            for item in _seq(answer, "00081198")
        ]
        report.stored.extend(u for u in stored if u)
        report.failed.extend(failed)
        if url := _value(answer, "00081190"):
            report.studies.add(str(url))
        if status >= 300 and not failed:
            # No per-instance answer: the whole batch failed (e.g. 400, 415, 500).
            reason = f"HTTP {status}: {text.strip()[:300]}"
            report.failed.extend({"sop": p.name, "reason": reason} for p in batch)
        elif status < 300 and not stored and not failed:
            # A PACS that answers 200 without a body: trust the status.
            report.stored.extend(p.name for p in batch)
        log.info("tus import: batch of %d -> HTTP %d, %d stored, %d failed", len(batch), status,
                 len(stored), len(failed))


async def _multipart(heads: list[bytes], batch: list[Part], tail: bytes) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    for head, part in zip(heads, batch, strict=True):
        yield head
        f = await loop.run_in_executor(None, part.open)
        try:
            sent = 0
            while True:
                piece = await loop.run_in_executor(None, f.read, PIECE)
                if not piece:
                    break
                sent += len(piece)
                yield piece
        finally:
            await loop.run_in_executor(None, f.close)
        if sent != part.size:
            raise ImportFailed(f"{part.name}: read {sent} bytes, expected {part.size} (file changed?)")
        yield b"\r\n"
    yield tail


def _seq(obj: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    value = obj.get(tag, {})
    items = value.get("Value", []) if isinstance(value, dict) else []
    return [i for i in items if isinstance(i, dict)]


def _value(obj: dict[str, Any], tag: str) -> Any:
    value = obj.get(tag, {})
    items = value.get("Value", []) if isinstance(value, dict) else []
    return items[0] if items else ""


def _uid(item: dict[str, Any], tag: str) -> str:
    return str(_value(item, tag) or "")
