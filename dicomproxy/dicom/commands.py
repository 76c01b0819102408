"""``InternalCmdRun("send", ...)`` and ``InternalCmdRun("echo", ...)`` for scripts.

    InternalCmdRun("send", "/data/outbox CALLING:PACS@10.0.0.5:104")
    InternalCmdRun("echo", "CALLING:PACS@10.0.0.5:104")

The calling AE title is optional (default ``Dicom:Aet``); a name from ``Dicom:Modalities``, an
upstream's (``default``, an ``Upstreams:Servers`` entry with a DICOM side) or a group's may stand
for ``AE@host:port`` (``InternalCmdRun("send", "/data/outbox archive")``); a group's members are
tried in its mode's order, the next when one cannot be associated with. Files are sent as they
are on disk (no decoding; read in pieces as they are sent), over one association per batch of presentation contexts
(:func:`.presentation.batches`), with :mod:`.storage_scu`; an uncompressed file the
destination takes only in another uncompressed syntax is re-encoded
(:func:`.presentation.choose`), a compressed one only with ``Dicom:Transcode`` ``ToAccepted``
(decoded, :mod:`.transcode`; the file on disk is left as it is).
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomproxy.config.settings import DicomSettings
from dicomproxy.dicom import presentation
from dicomproxy.dicom.destinations import Destinations
from dicomproxy.dicom.presentation import NotAccepted
from dicomproxy.dicom.spool import SpoolError, read_file_meta
from dicomproxy.dicom.storage_scu import FileDataset, StorageScu
from dicomproxy.dicom.storage_scu import echo as storage_echo
from dicomproxy.dicom.transcode import Transcoding
from dicomproxy.dicom.ul import tls as dicom_tls
from dicomproxy.dicom.ul.errors import UpperLayerError

SEND_USAGE = 'InternalCmdRun("send", "[folder] [CallingAE:AE@host:port]")'
ECHO_USAGE = 'InternalCmdRun("echo", "[CallingAE:AE@host:port]")'
_TARGET = re.compile(
    r"^(?:(?P<calling>[^:@\s]{1,16}):)?(?P<called>[^:@\s]{1,16})@(?P<host>[^:@\s]+):(?P<port>\d{1,5})$"
)


class CommandError(Exception):
    """Malformed arguments; the message shows the expected syntax."""


@dataclass(frozen=True)
class Target:
    calling: str
    called: str
    host: str
    port: int
    tls: ssl.SSLContext | None = field(default=None, compare=False)  # the Dicom:Modalities entry's Tls
    ae: Any = field(default=None, compare=False)  # its configured entry (Transcode override), if any

    def describe(self) -> str:
        return f"{self.calling}:{self.called}@{self.host}:{self.port}{' (TLS)' if self.tls else ''}"


def parse_targets(spec: str, settings: DicomSettings, usage: str, names: Destinations | None = None) -> list[Target]:
    """The peers ``spec`` names, to be tried in order (one, except for a group)."""
    spec = spec.strip()
    calling, _, name = spec.rpartition(":") if ":" in spec and "@" not in spec else ("", "", spec)
    if names is not None and name in names and name not in settings.modalities:
        return [Target(calling or settings.aet, p.ae.aet, p.ae.host, p.ae.port,
                       dicom_tls.client_context(p.ae, settings.tls), p.ae) for p in names.peers(name)]
    return [parse_target(spec, settings, usage)]


def parse_target(spec: str, settings: DicomSettings, usage: str) -> Target:
    spec = spec.strip()
    m = _TARGET.match(spec)
    if m:
        port = int(m.group("port"))
        if not 0 < port < 65536:
            raise CommandError(f"port {port} is out of range; expected {usage}")
        called, host = m.group("called"), m.group("host")
        declared = next((ae for ae in settings.modalities.values()
                         if (ae.aet, ae.host, ae.port) == (called, host, port)), None)  # its Tls applies
        tls = dicom_tls.client_context(declared, settings.tls) if declared is not None else None
        return Target(m.group("calling") or settings.aet, called, host, port, tls, declared)
    calling, _, name = spec.rpartition(":") if ":" in spec and "@" not in spec else ("", "", spec)
    for key, ae in settings.modalities.items():
        if key.lower() == name.lower() and name:
            return Target(calling or settings.aet, ae.aet, ae.host, ae.port, dicom_tls.client_context(ae, settings.tls),
                          ae)
    raise CommandError(f"cannot read the destination {spec!r}; expected {usage}")


@dataclass
class _File:
    path: Path
    sop_class: str
    sop_instance: str
    ts: str
    offset: int


def _scan(folder: Path) -> tuple[list[_File], list[dict[str, str]]]:
    """Every DICOM Part 10 file under ``folder`` (recursively); others are listed as skipped."""
    files: list[_File] = []
    skipped: list[dict[str, str]] = []
    for root, _dirs, names in os.walk(folder):
        for name in sorted(names):
            path = Path(root) / name
            try:
                with open(path, "rb") as f:
                    head = f.read(16384)
                meta, offset = read_file_meta(head)
                sc, si, ts = (meta.get(k, b"").rstrip(b"\0 ").decode("ascii", "replace") for k in (2, 3, 0x10))
                if not (sc and si and ts):
                    raise SpoolError("file meta lacks SOP class, instance or transfer syntax")
                files.append(_File(path, sc, si, ts, offset))
            except (OSError, SpoolError, ValueError) as e:
                skipped.append({"File": str(path), "Error": str(e)})
    return files, skipped


async def send(args: str, settings: DicomSettings, names: Destinations | None = None) -> dict[str, Any]:
    parts = args.strip().rsplit(None, 1)
    if len(parts) != 2:
        raise CommandError(f"expected a folder and a destination: {SEND_USAGE}")
    folder, targets = Path(parts[0]), parse_targets(parts[1], settings, SEND_USAGE, names)
    target = targets[0]
    if not await asyncio.to_thread(folder.is_dir):
        raise CommandError(f"{folder} is not a folder; expected {SEND_USAGE}")
    started = time.monotonic()
    files, skipped = await asyncio.to_thread(_scan, folder)
    failures: list[dict[str, str]] = [dict(s) for s in skipped]
    sent = 0
    for batch in presentation.batches(files, _pair):
        n, target = await _send_batch(targets, batch, failures, Transcoding.of(settings))
        sent += n
        targets = [target]  # the member that answered serves the rest
    return {
        "Destination": target.describe(),
        "Total": len(files) + len(skipped),
        "Sent": sent,
        "Failed": len(failures),
        "Failures": failures,
        "Seconds": round(time.monotonic() - started, 3),
    }


def _pair(f: _File) -> tuple[str, str]:
    return f.sop_class, f.ts


async def _send_batch(
    targets: list[Target], batch: list[_File], failures: list[dict[str, str]], transcoding: Transcoding
) -> tuple[int, Target]:
    errors: list[str] = []
    for target in targets:
        try:
            assoc = await StorageScu.connect(
                target.host, target.port, called_aet=target.called, calling_aet=target.calling, tls=target.tls,
                contexts=presentation.batch_pairs(batch, _pair),
            )
            break
        except UpperLayerError as e:
            errors.append(f"{target.describe()}: {e}" if len(targets) > 1 else str(e))
    else:
        failures += [{"File": str(f.path), "Error": "; ".join(errors)} for f in batch]
        return 0, targets[0]
    sent = 0
    try:
        for i, f in enumerate(batch):
            if not assoc.is_open:
                failures += [{"File": str(g.path), "Error": "association lost"} for g in batch[i:]]
                break
            error = await _send_one(assoc, f, transcoding.for_ae(target.ae))
            if error:
                failures.append({"File": str(f.path), "SOPInstanceUID": f.sop_instance, "Error": error})
            else:
                sent += 1
    finally:
        await assoc.release()
    return sent, target


async def _send_one(assoc: StorageScu, f: _File, transcoding: Transcoding) -> str:
    source: bytes | FileDataset = FileDataset(f.path, f.offset)
    try:
        ts = presentation.choose(assoc.accepted, f.sop_class, f.ts, "the destination", transcoding)
        if ts != f.ts:
            raw = await asyncio.to_thread(_read, f)
            source = await asyncio.to_thread(presentation.transcode, raw, f.ts, ts, transcoding,
                                             f"{f.path} for {assoc.label}")
    except NotAccepted as e:
        return str(e)
    try:
        status = await assoc.c_store(f.sop_class, f.sop_instance, ts, source)
    except UpperLayerError as e:
        return str(e)
    if status.is_success or status.is_warning:
        return ""
    return f"status {status}"


def _read(f: _File) -> bytes:
    with open(f.path, "rb") as fh:
        fh.seek(f.offset)
        return fh.read()


async def echo(args: str, settings: DicomSettings, names: Destinations | None = None) -> dict[str, Any]:
    if not args.strip():
        raise CommandError(f"expected a destination: {ECHO_USAGE}")
    target = parse_targets(args, settings, ECHO_USAGE, names)[0]
    started = time.monotonic()
    try:
        status = await storage_echo(target.host, target.port, called_aet=target.called, calling_aet=target.calling,
                                    tls=target.tls)
    except UpperLayerError as e:
        return {"Destination": target.describe(), "Success": False, "Error": str(e)}
    return {
        "Destination": target.describe(),
        "Success": status.is_success,
        "Status": status.status,
        "Milliseconds": round((time.monotonic() - started) * 1000, 1),
    }
