"""The listening socket of the DICOM side, and the asyncio fast path for storage associations.

Why not only pynetdicom: pynetdicom hands every message between three threads that poll with
1 ms sleeps, and encodes each C-STORE response with pydicom; measured here it accepts about
half of what Orthanc takes from the same storescu, short of the store-and-forward target
(>= 80 % of storing straight to the PACS). Storage is the hot path, and a storage association
is simple: this module accepts it on the event loop itself (PS3.8 upper layer, PS3.7 C-STORE /
C-ECHO), answering each C-STORE once the instance is in the spool.

Every other association (one that proposes a Query/Retrieve model, or SCP/SCU role selection
for C-GET) is handed, bytes untouched, to the pynetdicom AE of ``scp.py``, which listens on a
private loopback port; the real peer address is remembered so the Lua events still see it.
The association policy (``Dicom:AllowedCallingAets``, ``onDicomAssociation``) is the same on
both paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import AllStoragePresentationContexts

from dicomproxy.dicom import scu
from dicomproxy.dicom.session import AssocSession, LuaBridge
from dicomproxy.dicom.store import StoreService
from dicomproxy.settings import DicomSettings

log = logging.getLogger(__name__)

STORAGE_SOP_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
VERIFICATION = scu.VERIFICATION
# Query/Retrieve models (Patient Root, Study Root, Patient/Study Only; FIND, MOVE, GET): pynetdicom.
HANDOFF_SOP_CLASSES = frozenset(
    f"1.2.840.10008.5.1.4.1.2.{model}.{op}" for model in (1, 2, 3) for op in (1, 2, 3)
) | frozenset({"1.2.840.10008.5.1.4.31"})  # Modality Worklist
MAX_PDU = 1 << 20
ARTIM_SECONDS = 30.0
IDLE_SECONDS = 300.0
MAX_ASSOCIATIONS = 64


@dataclass
class AssociateRq:
    raw: bytes
    called: str
    calling: str
    contexts: list[tuple[int, str, list[str]]] = field(default_factory=list)
    roles: bool = False
    max_pdu: int = 0


def parse_associate_rq(body: bytes, raw: bytes) -> AssociateRq:
    if len(body) < 68:
        raise ValueError("A-ASSOCIATE-RQ too short")
    rq = AssociateRq(
        raw=raw,
        called=body[4:20].decode("ascii", "replace").strip(),
        calling=body[20:36].decode("ascii", "replace").strip(),
    )
    pos = 68
    while pos + 4 <= len(body):
        item_type, _, length = struct.unpack_from(">BBH", body, pos)
        payload = body[pos + 4 : pos + 4 + length]
        pos += 4 + length
        if item_type == 0x20 and len(payload) >= 4:
            ctx_id = payload[0]
            abstract = ""
            syntaxes: list[str] = []
            sub = 4
            while sub + 4 <= len(payload):
                st, _, sl = struct.unpack_from(">BBH", payload, sub)
                value = payload[sub + 4 : sub + 4 + sl].rstrip(b"\0 ").decode("ascii", "replace")
                if st == 0x30:
                    abstract = value
                elif st == 0x40:
                    syntaxes.append(value)
                sub += 4 + sl
            rq.contexts.append((ctx_id, abstract, syntaxes))
        elif item_type == 0x50:
            sub = 0
            while sub + 4 <= len(payload):
                st, _, sl = struct.unpack_from(">BBH", payload, sub)
                if st == 0x51 and sl == 4:
                    (rq.max_pdu,) = struct.unpack_from(">I", payload, sub + 4)
                elif st == 0x54:
                    rq.roles = True
                sub += 4 + sl
    return rq


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def encode_associate_ac(rq: AssociateRq, results: list[tuple[int, int, str]]) -> bytes:
    items = [_item(0x10, scu.APPLICATION_CONTEXT.encode())]
    for ctx_id, result, ts in results:
        items.append(_item(0x21, struct.pack(">BBBB", ctx_id, 0, result, 0) + _item(0x40, ts.encode())))
    user = (
        _item(0x51, struct.pack(">I", MAX_PDU))
        + _item(0x52, scu.IMPLEMENTATION_CLASS_UID.encode())
        + _item(0x55, scu.IMPLEMENTATION_VERSION.encode())
    )
    items.append(_item(0x50, user))
    body = struct.pack(">HH", 1, 0) + rq.raw[10:42] + bytes(32) + b"".join(items)
    return struct.pack(">BBI", 0x02, 0, len(body)) + body


def encode_reject(result: int, source: int, reason: int) -> bytes:
    return struct.pack(">BBIBBBB", 0x03, 0, 4, 0, result, source, reason)


def encode_abort(source: int = 2, reason: int = 0) -> bytes:
    return struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, source, reason)


class _Abort(Exception):
    """Abort the association (the message is the one log line)."""


class DicomListener:
    """Component: the DICOM port. ``handoff_port`` is where the pynetdicom AE listens."""

    def __init__(
        self,
        settings: DicomSettings,
        bridge: LuaBridge,
        store: StoreService,
        *,
        transfer_syntaxes: list[str],
        handoff: Any,
    ) -> None:
        self.settings = settings
        self.bridge = bridge
        self.store = store
        self.transfer_syntaxes = transfer_syntaxes
        self.handoff = handoff  # DicomServer: .port and .remember_peer(local_port, ip, port)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.active = 0

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._accept, self.settings.host, self.settings.port, reuse_address=True
            )
        except OSError as e:
            raise RuntimeError(
                f"Dicom: cannot listen on {self.settings.host}:{self.settings.port}: {e.strerror or e} "
                "(change Dicom:Port or Dicom:Host)"
            ) from None
        log.info("DICOM AE %s listening on %s:%d", self.settings.aet, self.settings.host, self.settings.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        peer = writer.get_extra_info("peername") or ("?", 0)
        self.active += 1
        try:
            await self._serve(reader, writer, str(peer[0]), int(peer[1]))
        except asyncio.CancelledError:
            writer.write(encode_abort())
            raise
        except Exception:
            log.exception("DICOM association from %s:%s failed", peer[0], peer[1])
        finally:
            self.active -= 1
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ip: str, port: int) -> None:
        try:
            header = await asyncio.wait_for(reader.readexactly(6), ARTIM_SECONDS)
            pdu_type, _, length = struct.unpack(">BBI", header)
            if pdu_type != 0x01 or length > 65536:
                log.warning("DICOM connection from %s:%s did not start with an A-ASSOCIATE-RQ; closed", ip, port)
                writer.write(encode_abort(2, 1))
                return
            body = await asyncio.wait_for(reader.readexactly(length), ARTIM_SECONDS)
            rq = parse_associate_rq(body, header + body)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError) as e:
            log.warning("DICOM connection from %s:%s: no valid association request (%s)", ip, port, e or "timeout")
            return
        abstracts = {a for _, a, _ in rq.contexts}
        if rq.roles or abstracts & HANDOFF_SOP_CLASSES:
            await self._hand_off(rq, reader, writer, ip, port)
            return
        session = AssocSession(self.bridge, rq.calling, rq.called, ip, port, asyncio.get_running_loop())
        try:
            if not await self._admit(rq, session, writer):
                return
            results = []
            for ctx_id, abstract, syntaxes in rq.contexts:
                if abstract not in STORAGE_SOP_CLASSES and abstract != VERIFICATION:
                    results.append((ctx_id, 3, syntaxes[0] if syntaxes else scu.IMPLICIT))
                    continue
                chosen = next((ts for ts in syntaxes if ts in self.transfer_syntaxes), None)
                if chosen is None:
                    results.append((ctx_id, 4, syntaxes[0] if syntaxes else scu.IMPLICIT))
                else:
                    results.append((ctx_id, 0, chosen))
            accepted = {ctx_id: ts for ctx_id, result, ts in results if result == 0}
            abstract_of = {ctx_id: a for ctx_id, a, _ in rq.contexts}
            writer.write(encode_associate_ac(rq, results))
            await writer.drain()
            log.debug("association from %s (%s:%s) accepted, %d context(s)", rq.calling, ip, port, len(accepted))
            await _Association(self, session, reader, writer, rq, accepted, abstract_of).run()
        finally:
            session.close()

    async def _admit(self, rq: AssociateRq, session: AssocSession, writer: asyncio.StreamWriter) -> bool:
        allowed = self.settings.allowed_calling_aets
        reason: tuple[int, int, int] | None = None
        if allowed and rq.calling not in [a.strip() for a in allowed]:
            log.info("association from %s (%s) refused: not in Dicom:AllowedCallingAets", rq.calling, session.ip)
            reason = (1, 1, 3)
        elif self.active > MAX_ASSOCIATIONS:
            log.warning("association from %s refused: %d associations open", rq.calling, self.active)
            reason = (2, 3, 2)
        elif self.bridge.defines("onDicomAssociation"):
            try:
                d = await self.bridge.call_async("onDicomAssociation", session.table(), session=session)
                refused = d is not None and d.rejected
            except Exception as e:
                log.error("onDicomAssociation failed for %s: %s", rq.calling, e)
                refused = not self.bridge.fail_open
            if refused:
                log.info(
                    "association from %s (%s:%s) to %s refused by onDicomAssociation",
                    rq.calling,
                    session.ip,
                    session.port,
                    rq.called,
                )
                reason = (1, 1, 1)
        if reason is None:
            return True
        writer.write(encode_reject(*reason))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.drain(), 5)
        return False

    async def _hand_off(
        self, rq: AssociateRq, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ip: str, port: int
    ) -> None:
        """Splice the connection to the pynetdicom AE (Query/Retrieve and C-GET associations)."""
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.handoff.port)
        except OSError as e:
            log.error("cannot reach the internal Q/R AE: %s", e)
            writer.write(encode_reject(2, 3, 1))
            return
        local = up_writer.get_extra_info("sockname")
        self.handoff.remember_peer(int(local[1]), ip, port)
        up_writer.write(rq.raw)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while True:
                    data = await src.read(1 << 16)
                    if not data:
                        break
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.write_eof()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            up_writer.close()
            self.handoff.forget_peer(int(local[1]))


class _Association:
    """One accepted storage association: P-DATA in, C-STORE/C-ECHO responses out."""

    def __init__(
        self,
        listener: DicomListener,
        session: AssocSession,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        rq: AssociateRq,
        accepted: dict[int, str],
        abstract_of: dict[int, str],
    ) -> None:
        self.listener = listener
        self.session = session
        self.reader = reader
        self.writer = writer
        self.rq = rq
        self.accepted = accepted
        self.abstract_of = abstract_of
        self.peer_max = rq.max_pdu

    def _label(self) -> str:
        return f"{self.session.calling} ({self.session.ip}:{self.session.port})"

    async def run(self) -> None:
        command = bytearray()
        data: list[bytes] = []
        cmd: dict[int, bytes] | None = None
        ctx_id = 0
        try:
            while True:
                try:
                    header = await asyncio.wait_for(self.reader.readexactly(6), IDLE_SECONDS)
                except TimeoutError:
                    raise _Abort(f"idle for {IDLE_SECONDS:.0f}s") from None
                pdu_type, _, length = struct.unpack(">BBI", header)
                if length > MAX_PDU + 6 and pdu_type == 0x04:
                    raise _Abort(f"P-DATA PDU of {length} bytes exceeds the negotiated maximum {MAX_PDU}")
                if length > MAX_PDU + 6:
                    raise _Abort(f"PDU of {length} bytes")
                body = await self.reader.readexactly(length)
                if pdu_type == 0x05:  # A-RELEASE-RQ
                    self.writer.write(struct.pack(">BBIxxxx", 0x06, 0, 4))
                    await self.writer.drain()
                    return
                if pdu_type == 0x07:
                    log.info("association from %s aborted by the peer", self._label())
                    return
                if pdu_type != 0x04:
                    raise _Abort(f"unexpected PDU type 0x{pdu_type:02x}")
                pos = 0
                while pos + 6 <= len(body):
                    (pdv_len,) = struct.unpack_from(">I", body, pos)
                    if pdv_len < 2 or pos + 4 + pdv_len > len(body):
                        raise _Abort("malformed PDV item")
                    pdv_ctx = body[pos + 4]
                    mch = body[pos + 5]
                    fragment = body[pos + 6 : pos + 4 + pdv_len]
                    pos += 4 + pdv_len
                    if pdv_ctx not in self.accepted:
                        raise _Abort(f"PDV on presentation context {pdv_ctx}, which was not accepted")
                    if mch & 0x01:
                        if cmd is not None:
                            raise _Abort("command fragment while a data set was expected")
                        command += fragment
                        ctx_id = pdv_ctx
                        if mch & 0x02:
                            cmd = scu.parse_command(bytes(command))
                            command.clear()
                            if _us(cmd.get(0x0800)) == 0x0101:
                                await self._dispatch(ctx_id, cmd, None)
                                cmd = None
                    else:
                        if cmd is None:
                            raise _Abort("data fragment without a command")
                        data.append(fragment)
                        if mch & 0x02:
                            payload = b"".join(data)
                            data.clear()
                            await self._dispatch(ctx_id, cmd, payload)
                            cmd = None
        except _Abort as e:
            log.warning("association from %s aborted: %s", self._label(), e)
            self.writer.write(encode_abort(2, 0))
        except (asyncio.IncompleteReadError, ConnectionError):
            log.info("association from %s: the peer vanished", self._label())

    async def _dispatch(self, ctx_id: int, cmd: dict[int, bytes], dataset: bytes | None) -> None:
        field_ = _us(cmd.get(0x0100))
        msg_id = _us(cmd.get(0x0110))
        sop_class = _text(cmd.get(0x0002)) or self.abstract_of.get(ctx_id, "")
        if field_ == 0x0030:  # C-ECHO-RQ
            with contextlib.suppress(Exception):
                await self.listener.bridge.call_async("onCEcho", self.session.table(), session=self.session)
            await self._respond(ctx_id, 0x8030, msg_id, sop_class, 0x0000)
            return
        if field_ == 0x0001:  # C-STORE-RQ
            sop_instance = _text(cmd.get(0x1000))
            if dataset is None:
                await self._respond(ctx_id, 0x8001, msg_id, sop_class, STATUS_MISSING, sop_instance, "no data set")
                return
            try:
                status, comment = await self.listener.store.store(
                    self.session, dataset, self.accepted[ctx_id], sop_class, sop_instance
                )
            except Exception:
                log.exception("C-STORE %s from %s failed", sop_instance, self._label())
                status, comment = 0x0110, "gateway error"
            await self._respond(ctx_id, 0x8001, msg_id, sop_class, status, sop_instance, comment)
            return
        if field_ == 0x0FFF:  # C-CANCEL: nothing to cancel on a storage association
            return
        log.warning("association from %s: unsupported command 0x%04X", self._label(), field_)
        await self._respond(ctx_id, field_ | 0x8000, msg_id, sop_class, 0x0211, "", "unrecognized operation")

    async def _respond(
        self,
        ctx_id: int,
        field_: int,
        msg_id: int,
        sop_class: str,
        status: int,
        sop_instance: str = "",
        comment: str = "",
    ) -> None:
        elements = [
            (0x0002, scu._cmd_uid(sop_class)),
            (0x0100, scu._us(field_)),
            (0x0120, scu._us(msg_id)),
            (0x0800, scu._us(0x0101)),
            (0x0900, scu._us(status)),
        ]
        if sop_instance:
            elements.append((0x1000, scu._cmd_uid(sop_instance)))
        if comment and status not in (0x0000,):
            raw = comment.encode("ascii", "replace")[:64]
            elements.append((0x0902, raw + b" " if len(raw) % 2 else raw))
        command = scu.encode_command(elements)
        limit = (self.peer_max - 6) if self.peer_max > 6 else len(command)
        parts = []
        for start in range(0, len(command), max(1, limit)):
            chunk = command[start : start + limit]
            last = start + limit >= len(command)
            parts.append(
                struct.pack(">BBIIBB", 0x04, 0, len(chunk) + 6, len(chunk) + 2, ctx_id, 0x03 if last else 0x01)
            )
            parts.append(chunk)
        self.writer.writelines(parts)
        await self.writer.drain()


STATUS_MISSING = 0xC000


def _us(raw: bytes | None) -> int:
    return struct.unpack("<H", raw[:2])[0] if raw and len(raw) >= 2 else 0


def _text(raw: bytes | None) -> str:
    return (raw or b"").rstrip(b"\0 ").decode("ascii", "replace")
