"""``ReceivedInstanceFilter(dicom, origin, info)`` for instances uploaded over HTTP through the
gateway: ``POST /instances`` (Orthanc's REST upload, one DICOM file) and STOW-RS
(``POST {Upstream:DicomWebRoot}/studies[/{study}]``, ``multipart/related``).

Only when a script defines the callback: otherwise the cost is one set lookup per request and
the proxy's hot path is unchanged. Each instance's header is read in streaming: the bytes up to
the pixel data are buffered (at most ``Orthanc:FilterHeaderMaxBytes`` per instance, then parsed
by pydicom, ``stop_before_pixels``, on a file object that says "need more" instead of a short
read, so a half-received header is never mistaken for a whole one); everything after goes
straight through. A whole 300 MB upload is never held in memory.

Answers, as Orthanc gives them when its filter refuses:

* ``POST /instances``: Orthanc's 200 with ``"Status": "FilteredOut"`` and the ids the instance
  would have had; the PACS is not called. (Orthanc reads the whole body before it filters: the
  rest of the refused upload is read and dropped, so the client gets its answer.)
* STOW-RS: the accepted parts go on to the PACS in one re-streamed multipart body (same
  boundary, refused parts left out, chunked); the PACS's answer (DICOM JSON, or the Native
  DICOM Model XML) gets the refused instances in its ``FailedSOPSequence`` (0008,1198) with
  ``FailureReason`` 0x0110 (Orthanc's DICOMweb plugin's reason for an instance its store did not
  take) and 202 instead of 200, as Orthanc's plugin does
  for a partly stored request. If every part is refused, the PACS is not called: 400 with the
  failed-SOP answer (the plugin's status for a request where nothing was stored).

Fail closed, since a filter is a policy: an upload the gateway cannot inspect (not DICOM, a ZIP
for ``POST /instances``, a header longer than the limit, a STOW part that is not
``application/dicom``, a malformed multipart body) is refused with a message naming why, rather
than passed to the PACS unchecked.
"""

from __future__ import annotations

import asyncio
import enum
import io
import json
import logging
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pydicom
from dicomproxy_middleware import LuaError
from pydicom.errors import InvalidDicomError

from dicomproxy.dicom import datasets
from dicomproxy.scripting.host import ScriptHost
from dicomproxy.scripting.orthanc.pacs import orthanc_id

log = logging.getLogger("dicomproxy.orthanc")

FILTER = "ReceivedInstanceFilter"
SETTING = "Orthanc:FilterHeaderMaxBytes"
FIRST_TRY = 8 << 10  # most headers are a few KB: the first parse is tried at 8 KB, then at each doubling
THREAD_ABOVE = 256 << 10  # parse a header this large in a thread, not on the event loop
PART_HEADERS_MAX = 16 << 10
FAILURE_REASON = 0x0110
PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")  # (7FE0,0010) little / big endian


class _NeedMore(Exception):
    """The parser read past the bytes received so far."""


class Refusal(Exception):
    """An upload the gateway cannot inspect; ``status`` and the message go to the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Prefix(io.BytesIO):
    """The bytes of an instance received so far; reading past them raises unless they are all."""

    def __init__(self, data: bytes, complete: bool) -> None:
        super().__init__(data)
        self.complete, self.size = complete, len(data)

    def read(self, n: int | None = -1) -> bytes:
        if not self.complete and (n is None or n < 0 or self.tell() + n > self.size):
            raise _NeedMore
        return super().read(n)


@dataclass
class Header:
    """What the filter sees of one instance, and what the answers need."""

    table: dict[str, Any]
    info: dict[str, Any]
    uids: dict[str, str]


def parse_header(data: bytes, complete: bool) -> Header | None:
    """The instance's header from its first bytes; None when more bytes are needed.
    Raises :class:`Refusal` for something that is not a DICOM file."""
    f = _Prefix(data, complete)
    try:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
    except _NeedMore:
        return None
    except (InvalidDicomError, ValueError, TypeError, KeyError, EOFError, OSError) as e:
        raise Refusal(400, f"not a DICOM file the gateway can read ({e})") from None
    at = f.tell()
    has_pixels = data[at:at + 4] in PIXEL_TAGS
    ts = str(getattr(ds.file_meta, "TransferSyntaxUID", "") or "")
    info: dict[str, Any] = {"HasPixelData": has_pixels}
    if ts:
        info["TransferSyntaxUID"] = ts
    uids = {k: str(ds.get(k, "") or "") for k in
            ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")}
    return Header(datasets.dataset_to_table(ds), info, uids)


class HeaderReader:
    """Collects one instance's first bytes until its header parses (bounded by ``limit``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.next_try = FIRST_TRY

    def due(self, size: int, complete: bool) -> bool:
        """Whether ``size`` bytes are worth a parse (the end, or the next doubling, or the limit)."""
        return complete or size >= min(self.next_try, self.limit)

    async def attempt(self, data: bytes, complete: bool) -> Header | None:
        if not self.due(len(data), complete):
            return None
        self.next_try = max(self.next_try, len(data)) * 2
        if len(data) > THREAD_ABOVE:
            header = await asyncio.to_thread(parse_header, data, complete)
        else:
            header = parse_header(data, complete)
        if header is None and len(data) >= self.limit:
            raise Refusal(413, f"the DICOM header is longer than {SETTING} ({self.limit} bytes): raise it to "
                               "filter such instances")
        return header


# --------------------------------------------------------------------------- the filter call
Decide = Callable[[Header], Awaitable[bool]]


def _origin(scope: dict[str, Any]) -> dict[str, Any]:
    client = scope.get("client")
    return {"RequestOrigin": "RestApi", "RemoteIp": client[0] if client else "", "Username": scope.get("user") or ""}


def _filter(host: ScriptHost, scope: dict[str, Any], fail_open: bool, tscope: Any) -> Decide:
    async def decide(header: Header) -> bool:
        try:
            d = await host.dispatch(FILTER, header.table, _origin(scope), header.info, scope=tscope)
            bad = [r for r in d.results if not isinstance(r, bool)]
            if bad:
                raise LuaError(f"{FILTER} must return true or false, it returned {type(bad[0]).__name__}")
        except LuaError as e:
            if fail_open:
                log.error("%s failed; the upload goes on (Lua:FailOpen): %s", FILTER, e)
                return True
            raise Refusal(500, f"{FILTER} failed: {e}") from None
        accepted = all(d.results)
        if not accepted:
            log.info("%s refused %s (SOPInstanceUID %s) uploaded over HTTP by %s", FILTER, scope["path"],
                     header.uids["SOPInstanceUID"], _origin(scope)["RemoteIp"])
        return accepted

    return decide


# --------------------------------------------------------------------------- ASGI plumbing
class _ClientGone(Exception):
    pass


class Body:
    """The client's request body, message by message."""

    def __init__(self, receive: Any) -> None:
        self.receive = receive
        self.ended = False

    async def chunk(self) -> bytes:
        message = await self.receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        self.ended = not message.get("more_body", False)
        return bytes(message.get("body", b""))

    async def drain(self) -> None:
        while not self.ended:
            await self.chunk()


async def _answer(send: Any, status: int, payload: Any, content_type: bytes = b"application/json") -> None:
    body = json.dumps(payload, indent=2).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _media_type(scope: dict[str, Any]) -> tuple[str, dict[str, str]]:
    for k, v in scope.get("headers", ()):
        if k == b"content-type":
            return _parse_media_type(v.decode("latin-1"))
    return "", {}


def _parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    main, *params = value.split(";")
    out: dict[str, str] = {}
    for p in params:
        name, _, v = p.strip().partition("=")
        if name:
            out[name.strip().lower()] = v.strip().strip('"')
    return main.strip().lower(), out


# --------------------------------------------------------------------------- POST /instances
def filtered_out(uids: dict[str, str]) -> dict[str, Any]:
    """Orthanc's answer to a POST /instances its filter refused (checked against Orthanc 1.10.1)."""
    p, st, se, i = (uids[k] for k in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
    iid = orthanc_id(p, st, se, i)
    return {"ID": iid, "ParentPatient": orthanc_id(p), "ParentSeries": orthanc_id(p, st, se),
            "ParentStudy": orthanc_id(p, st), "Path": f"/instances/{iid}", "Status": "FilteredOut"}


async def filter_instance(app: Any, scope: dict[str, Any], receive: Any, send: Any, decide: Decide,
                          limit: int) -> None:
    body, reader, data = Body(receive), HeaderReader(limit), bytearray()
    header = None
    while header is None:
        data += await body.chunk()
        if data[:4] == b"PK\x03\x04":
            raise Refusal(415, f"{FILTER} cannot inspect a ZIP archive uploaded through the gateway: upload its "
                               "DICOM files one by one, or over STOW-RS")
        if reader.due(len(data), body.ended):  # copy and parse at doublings only
            header = await reader.attempt(bytes(data), body.ended)
    if not await decide(header):
        await body.drain()
        await _answer(send, 200, filtered_out(header.uids), b"application/json; charset=utf-8")
        return
    prefix: bytes | None = bytes(data)
    ended = body.ended

    async def replay() -> dict[str, Any]:
        nonlocal prefix
        if prefix is not None:
            chunk, prefix = prefix, None
            return {"type": "http.request", "body": chunk, "more_body": not ended}
        return dict(await receive())

    await app(scope, replay, send)


# --------------------------------------------------------------------------- STOW-RS
class Stage(enum.Enum):
    PREAMBLE = "preamble"  # before the first boundary
    DELIMITER = "delimiter"  # after a boundary: a part follows, or the close delimiter
    HEADERS = "headers"  # a part's MIME headers
    INSPECT = "inspect"  # a part's first bytes, until its DICOM header is read and judged
    PASS = "pass"  # the rest of an accepted part
    DROP = "drop"  # the rest of a refused part
    DONE = "done"  # after the close delimiter (the epilogue is dropped)


@dataclass
class Failed:
    sop_class: str
    sop_instance: str


@dataclass
class StowParts:
    """A multipart/related body in, the same body without the refused parts out (streamed).

    :meth:`output` returns the next bytes for the PACS (``None`` at the end); the parts the
    filter refused are in :attr:`failed`. One explicit state machine; the only buffer is one
    part's header (while it is inspected) or one chunk plus a delimiter's length."""

    body: Body
    boundary: bytes
    decide: Decide
    limit: int
    stage: Stage = Stage.PREAMBLE
    failed: list[Failed] = field(default_factory=list)
    accepted: int = 0
    buf: bytearray = field(default_factory=lambda: bytearray(b"\r\n"))  # the first boundary then looks like the rest
    _headers: bytes = b""
    _reader: HeaderReader | None = None
    _closed: bool = False

    @property
    def delim(self) -> bytes:
        return b"\r\n--" + self.boundary

    async def output(self) -> bytes | None:
        while True:
            out, progressed = await self._step()
            if out:
                return out
            if self.stage is Stage.DONE:
                if self.accepted and not self._closed:
                    self._closed = True
                    return b"\r\n--" + self.boundary + b"--\r\n"
                return None
            if not progressed:
                if self.body.ended:
                    raise Refusal(400, "the multipart/related body ends before its close delimiter")
                self.buf += await self.body.chunk()

    def _safe(self) -> tuple[int, bool]:
        """How many buffered bytes surely belong to the current section, and whether a delimiter ends it."""
        i = self.buf.find(self.delim)
        if i >= 0:
            return i, True
        return max(len(self.buf) - len(self.delim) + 1, 0), False

    async def _step(self) -> tuple[bytes, bool]:
        """Move on with what is buffered: (bytes for the PACS, whether anything was consumed)."""
        stage = self.stage
        if stage is Stage.PREAMBLE or stage is Stage.PASS or stage is Stage.DROP:
            n, ends = self._safe()
            out = bytes(self.buf[:n]) if stage is Stage.PASS else b""
            del self.buf[:n + (len(self.delim) if ends else 0)]
            if ends:
                self.stage = Stage.DELIMITER
            return out, n > 0 or ends
        if stage is Stage.DELIMITER:
            return b"", self._delimiter()
        if stage is Stage.HEADERS:
            return b"", self._part_headers()
        if stage is Stage.INSPECT:
            return await self._inspect()
        return b"", False

    def _delimiter(self) -> bool:
        if len(self.buf) < 2:
            return False
        if self.buf[:2] == b"--":
            self.stage = Stage.DONE
            self.buf.clear()
            return True
        i = self.buf.find(b"\r\n")
        if i < 0 or self.buf[:i].strip(b" \t"):
            if i >= 0 or len(self.buf) > 1024:
                raise Refusal(400, "malformed multipart/related body (bad boundary line)")
            return False
        del self.buf[:i + 2]
        self.stage = Stage.HEADERS
        return True

    def _part_headers(self) -> bool:
        i = 0 if self.buf[:2] == b"\r\n" else self.buf.find(b"\r\n\r\n")
        if i < 0:
            if len(self.buf) > PART_HEADERS_MAX:
                raise Refusal(400, "malformed multipart/related body (a part's headers are too long)")
            return False
        headers = bytes(self.buf[:i])
        del self.buf[:i + (2 if i == 0 else 4)]
        for line in headers.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-type":
                media, _ = _parse_media_type(value.decode("latin-1"))
                if media != "application/dicom":
                    raise Refusal(415, f"{FILTER} is defined: every STOW-RS part must be application/dicom, "
                                       f"not {media or 'empty'}")
        self._headers = headers
        self._reader = HeaderReader(self.limit)
        self.stage = Stage.INSPECT
        return True

    async def _inspect(self) -> tuple[bytes, bool]:
        n, ends = self._safe()
        assert self._reader is not None
        if not self._reader.due(n, ends):
            return b"", False
        try:
            header = await self._reader.attempt(bytes(self.buf[:n]), ends)
        except Refusal as e:
            log.error("STOW-RS part refused: %s", e)
            return self._drop(Failed("", ""), n, ends)
        if header is None:
            return b"", False
        if not await self.decide(header):
            return self._drop(Failed(header.uids["SOPClassUID"], header.uids["SOPInstanceUID"]), n, ends)
        start = b"--" if not self.accepted else b"\r\n--"
        self.accepted += 1
        out = start + self.boundary + b"\r\n" + self._headers + b"\r\n\r\n" + bytes(self.buf[:n])
        del self.buf[:n + (len(self.delim) if ends else 0)]
        self.stage = Stage.DELIMITER if ends else Stage.PASS
        return out, True

    def _drop(self, failed: Failed, n: int, ends: bool) -> tuple[bytes, bool]:
        self.failed.append(failed)
        del self.buf[:n + (len(self.delim) if ends else 0)]
        self.stage = Stage.DELIMITER if ends else Stage.DROP
        return b"", True


def failed_items(failed: list[Failed]) -> list[dict[str, Any]]:
    items = []
    for f in failed:
        item: dict[str, Any] = {}
        if f.sop_class:
            item["00081150"] = {"vr": "UI", "Value": [f.sop_class]}
        if f.sop_instance:
            item["00081155"] = {"vr": "UI", "Value": [f.sop_instance]}
        item["00081197"] = {"vr": "US", "Value": [FAILURE_REASON]}
        items.append(item)
    return items


NATIVE_DICOM = "http://dicom.nema.org/PS3.19/models/NativeDICOM"
_XML_ITEM = (("00081150", "UI", "ReferencedSOPClassUID"), ("00081155", "UI", "ReferencedSOPInstanceUID"),
             ("00081197", "US", "FailureReason"))


def _merge_json(answer: bytes, failed: list[Failed]) -> bytes | None:
    try:
        doc = json.loads(answer)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    seq = doc.setdefault("00081198", {"vr": "SQ"})
    seq.setdefault("Value", []).extend(failed_items(failed))
    return json.dumps(doc, indent=2).encode()


def _merge_xml(answer: bytes, failed: list[Failed]) -> bytes | None:
    """The same in the Native DICOM Model (PS3.19), which Orthanc answers for ``Accept: application/dicom+xml``."""
    try:
        root = ET.fromstring(answer)
    except ET.ParseError:
        return None
    ns = root.tag[1:].partition("}")[0] if root.tag.startswith("{") else ""
    attr = f"{{{ns}}}DicomAttribute" if ns else "DicomAttribute"
    seq = next((a for a in root.findall(attr) if a.get("tag") == "00081198"), None)
    if seq is None:
        seq = ET.SubElement(root, attr, {"tag": "00081198", "vr": "SQ", "keyword": "FailedSOPSequence"})
    item_tag, value_tag = (f"{{{ns}}}Item", f"{{{ns}}}Value") if ns else ("Item", "Value")
    number = len(seq.findall(item_tag))
    for f in failed:
        number += 1
        item = ET.SubElement(seq, item_tag, number=str(number))
        for (tag, vr, keyword), value in zip(_XML_ITEM, (f.sop_class, f.sop_instance, str(FAILURE_REASON)),
                                             strict=True):
            if value:
                element = ET.SubElement(item, attr, {"tag": tag, "vr": vr, "keyword": keyword})
                ET.SubElement(element, value_tag, number="1").text = value
    text = ET.tostring(_unqualified(root, ns), encoding="unicode")
    return ('<?xml version="1.0" encoding="utf-8"?>\n' + text).encode()


def _unqualified(root: ET.Element, ns: str) -> ET.Element:
    """Written back with the default namespace Orthanc uses (ElementTree would invent ``ns0:`` prefixes)."""
    prefixes: dict[str, str] = {}
    for el in root.iter():
        if ns and el.tag.startswith("{" + ns + "}"):
            el.tag = el.tag[len(ns) + 2:]
        for key in [k for k in el.attrib if k.startswith("{")]:
            uri, _, local = key[1:].partition("}")
            prefix = prefixes.setdefault(uri, "xsi" if uri.endswith("XMLSchema-instance") else f"ns{len(prefixes)}")
            el.set(f"{prefix}:{local}", el.attrib.pop(key))
    if ns:
        root.set("xmlns", ns)
    for uri, prefix in prefixes.items():
        root.set(f"xmlns:{prefix}", uri)
    return root


def merge_failed(answer: bytes, failed: list[Failed], xml: bool = False) -> bytes | None:
    """The PACS's STOW answer with ``failed`` added to its FailedSOPSequence; None if it cannot be read."""
    return _merge_xml(answer, failed) if xml else _merge_json(answer, failed)


def wants_xml(scope: dict[str, Any]) -> bool:
    accept = b", ".join(v for k, v in scope.get("headers", ()) if k == b"accept").lower()
    return b"application/dicom+xml" in accept and b"json" not in accept


async def filter_stow(app: Any, scope: dict[str, Any], receive: Any, send: Any, decide: Decide,
                      boundary: str, limit: int) -> None:
    body = Body(receive)
    parts = StowParts(body, boundary.encode("latin-1"), decide, limit)
    first = await parts.output()
    if first is None:  # nothing left to store: the PACS is not called
        await body.drain()
        status = 400 if parts.failed else 200
        if wants_xml(scope):
            empty = f'<NativeDicomModel xmlns="{NATIVE_DICOM}"/>'.encode()
            xml = merge_failed(empty, parts.failed, xml=True) or b""
            await send({"type": "http.response.start", "status": status, "headers": [
                (b"content-type", b"application/dicom+xml"), (b"content-length", str(len(xml)).encode())]})
            await send({"type": "http.response.body", "body": xml})
            return
        await _answer(send, status, {"00081198": {"vr": "SQ", "Value": failed_items(parts.failed)}},
                      b"application/dicom+json")
        return
    pending: bytes | None = first
    finished = False

    async def restream() -> dict[str, Any]:
        nonlocal pending, finished
        if finished:
            return dict(await receive())
        if pending is not None:
            chunk, pending = pending, None
            return {"type": "http.request", "body": chunk, "more_body": True}
        try:
            chunk_or_end = await parts.output()
        except (_ClientGone, Refusal) as e:
            log.error("STOW-RS upload through %s stopped: %s", FILTER, str(e) or "the client went away")
            finished = True
            return {"type": "http.disconnect"}  # the proxy abandons the request: the PACS never sees its end
        if chunk_or_end is None:
            finished = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.request", "body": chunk_or_end, "more_body": True}

    # The answer is read and, when parts were refused, rebuilt here: ask for it uncoded (a client that
    # accepts gzip accepts identity; the proxy would otherwise compress a rewritten answer for it).
    dropped = (b"content-length", b"transfer-encoding", b"accept-encoding")
    headers = [(k, v) for k, v in scope["headers"] if k not in dropped]
    headers.append((b"transfer-encoding", b"chunked"))
    await app({**scope, "headers": headers}, restream, _AnswerWithFailed(send, parts))


class _AnswerWithFailed:
    """Adds the refused parts to the PACS's STOW answer (200 becomes 202), when there are any."""

    MAX = 16 << 20

    def __init__(self, send: Any, parts: StowParts) -> None:
        self.send, self.parts = send, parts
        self.start: dict[str, Any] | None = None
        self.held = bytearray()

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            if not self.parts.failed:
                await self.send(message)
            else:
                self.start = message
            return
        if self.start is None or message["type"] != "http.response.body":
            await self.send(message)
            return
        self.held += message.get("body", b"")
        if message.get("more_body", False) and len(self.held) <= self.MAX:
            return
        start, self.start = self.start, None
        xml = any(k == b"content-type" and b"xml" in v.lower() for k, v in start.get("headers", ()))
        merged = None if message.get("more_body", False) else merge_failed(bytes(self.held), self.parts.failed, xml)
        if merged is None:
            log.warning("STOW-RS: the PACS's answer is not DICOM JSON/XML (or too large): the %d instances refused "
                        "by %s are not listed in it", len(self.parts.failed), FILTER)
            await self.send(start)
            await self.send({**message, "body": bytes(self.held)})
            return
        status = 202 if start["status"] == 200 else start["status"]
        headers = [(k, v) for k, v in start.get("headers", ()) if k != b"content-length"]
        headers.append((b"content-length", str(len(merged)).encode()))
        await self.send({**start, "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": merged})


class UploadFilter:
    """ASGI, called by :class:`.http_filter.OrthancHttpFilter` for POSTs (after
    ``IncomingHttpRequestFilter``, outside the Lua hooks); ``app`` is what comes next."""

    def __init__(self, app: Any, host: ScriptHost, *, dicomweb_root: str, limit: int, fail_open: bool) -> None:
        self.app = app
        self.host = host
        self.stow = dicomweb_root.rstrip("/") + "/studies"
        self.limit = limit
        self.fail_open = fail_open

    def _route(self, path: str) -> str | None:
        if path.rstrip("/") == "/instances":
            return "instances"
        if path == self.stow or path == self.stow + "/" or (
                path.startswith(self.stow + "/") and "/" not in path[len(self.stow) + 1:].rstrip("/")):
            return "stow"
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not self.host.defines(FILTER):
            await self.app(scope, receive, send)
            return
        route = self._route(scope["path"])
        if route is None:
            await self.app(scope, receive, send)
            return
        media, params = _media_type(scope)
        if route == "stow" and (media != "multipart/related" or not params.get("boundary")):
            await self.app(scope, receive, send)  # the PACS refuses it (nothing is stored): its own answer
            return
        with self.host.transient_scope() as tscope:
            decide = _filter(self.host, scope, self.fail_open, tscope)
            try:
                if route == "instances":
                    await filter_instance(self.app, scope, receive, send, decide, self.limit)
                else:
                    await filter_stow(self.app, scope, receive, send, decide, params["boundary"], self.limit)
            except _ClientGone:
                return
            except Refusal as e:
                log.warning("upload %s %s refused: %s", scope["method"], scope["path"], e)
                await _answer(send, e.status, {"error": "upload refused", "hook": FILTER, "message": str(e)})
