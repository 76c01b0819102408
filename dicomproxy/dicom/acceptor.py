"""The listening socket of the DICOM side, and the fast path for storage associations.

Why not only pynetdicom: pynetdicom hands every message between three threads that poll with
1 ms sleeps, and encodes each C-STORE response with pydicom; measured here it accepted about
half of what Orthanc takes from the same storescu, short of the store-and-forward target
(>= 80 % of storing straight to the PACS). Storage is the hot path, and a storage association
is simple: this module serves it itself (PS3.8 upper layer, PS3.7 C-STORE / C-ECHO), one
thread per association with blocking reads and writes, like DCMTK. A C-STORE is read, written
to the spool and fsync'ed, and answered on that one thread: no hand-off between threads on
the way (each costs ~0.3 ms here), and the event loop (forwarding, HTTP) never waits on a disk.

Every other association (one that proposes a Query/Retrieve model, or SCP/SCU role selection
for C-GET) is handed, bytes untouched, to the pynetdicom AE of ``scp.py``, which listens on a
private loopback port; the real peer address is remembered so the Lua events still see it.
The association policy (``Dicom:AllowedCallingAets``, ``onDicomAssociation``) is the same on
both paths. Lua events are raised with ``dispatch_threadsafe`` (Lua runs on the event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import AllStoragePresentationContexts

from dicomproxy.config.settings import DicomSettings
from dicomproxy.dicom import scu
from dicomproxy.dicom.audit import DicomAudit
from dicomproxy.dicom.session import AssocSession, LuaBridge
from dicomproxy.dicom.store import StoreService

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


class _Conn:
    """A blocking socket with exact reads, each bounded by a timeout."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def read_exact(self, n: int, timeout: float) -> bytes:
        self.sock.settimeout(timeout)
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                raise ConnectionError("the peer closed the connection")
            got += k
        return bytes(buf)

    def send(self, data: bytes) -> None:
        self.sock.settimeout(IDLE_SECONDS)
        self.sock.sendall(data)


class DicomListener:
    """Component: the DICOM port. ``handoff`` is the pynetdicom AE (``.port``, ``.remember_peer``)."""

    def __init__(
        self,
        settings: DicomSettings,
        bridge: LuaBridge,
        store: StoreService,
        *,
        transfer_syntaxes: list[str],
        handoff: Any,
        audit: DicomAudit | None = None,
    ) -> None:
        self.settings = settings
        self.audit = audit
        self.bridge = bridge
        self.store = store
        self.transfer_syntaxes = transfer_syntaxes
        self.handoff = handoff
        self.loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._stopping = False
        self.active = 0

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            sock = socket.create_server((self.settings.host, self.settings.port), backlog=64)
        except OSError as e:
            raise RuntimeError(
                f"Dicom: cannot listen on {self.settings.host}:{self.settings.port}: {e.strerror or e} "
                "(change Dicom:Port or Dicom:Host)"
            ) from None
        sock.settimeout(0.5)  # the accept loop checks for stop() twice a second
        self._sock = sock
        self._stopping = False
        self._thread = threading.Thread(target=self._accept_loop, name="dicom-listener", daemon=True)
        self._thread.start()
        log.info("DICOM AE %s listening on %s:%d", self.settings.aet, self.settings.host, self.settings.port)

    async def stop(self) -> None:
        self._stopping = True
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for conn in conns:  # wakes the association threads blocked in recv
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

        def join() -> None:
            if self._thread is not None:
                self._thread.join(timeout=5)
            for t in threads:
                t.join(timeout=5)

        await asyncio.to_thread(join)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._thread = None

    @property
    def listening(self) -> bool:
        return self._sock is not None and not self._stopping

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping:
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping:
                    return
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._connection, args=(conn, peer), name="dicom-assoc", daemon=True)
            with self._lock:
                self._conns.add(conn)
                self._threads.add(t)
                self.active += 1
            t.start()

    def _connection(self, sock: socket.socket, peer: tuple[Any, ...]) -> None:
        ip, port = str(peer[0]), int(peer[1])
        try:
            self._serve(_Conn(sock), ip, port)
        except Exception:
            log.exception("DICOM association from %s:%s failed", ip, port)
        finally:
            with self._lock:
                self._conns.discard(sock)
                self._threads.discard(threading.current_thread())
                self.active -= 1
            with contextlib.suppress(OSError):
                sock.close()

    def _serve(self, conn: _Conn, ip: str, port: int) -> None:
        try:
            header = conn.read_exact(6, ARTIM_SECONDS)
            pdu_type, _, length = struct.unpack(">BBI", header)
            if pdu_type != 0x01 or length > 65536:
                log.warning("DICOM connection from %s:%s did not start with an A-ASSOCIATE-RQ; closed", ip, port)
                with contextlib.suppress(OSError):
                    conn.send(encode_abort(2, 1))
                return
            body = conn.read_exact(length, ARTIM_SECONDS)
            rq = parse_associate_rq(body, header + body)
        except (TimeoutError, ConnectionError, OSError, ValueError) as e:
            log.warning("DICOM connection from %s:%s: no valid association request (%s)", ip, port, e or "timeout")
            return
        abstracts = {a for _, a, _ in rq.contexts}
        if rq.roles or abstracts & HANDOFF_SOP_CLASSES:
            self._hand_off(rq, conn, ip, port)
            return
        session = AssocSession(self.bridge, rq.calling, rq.called, ip, port, self.loop)
        try:
            if not self._admit(rq, session, conn):
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
            conn.send(encode_associate_ac(rq, results))
            log.debug("association from %s (%s:%s) accepted, %d context(s)", rq.calling, ip, port, len(accepted))
            _Association(self, session, conn, rq, accepted, abstract_of).run()
        finally:
            if self.audit is not None:
                self.audit.ended(session)
            session.close()

    def _admit(self, rq: AssociateRq, session: AssocSession, conn: _Conn) -> bool:
        allowed = self.settings.allowed_calling_aets
        reason: tuple[int, int, int] | None = None
        if allowed and rq.calling not in [a.strip() for a in allowed]:
            log.info("association from %s (%s) refused: not in Dicom:AllowedCallingAets", rq.calling, session.ip)
            reason = (1, 1, 3)
        elif self.active > MAX_ASSOCIATIONS:
            log.warning("association from %s refused: %d associations open", rq.calling, self.active)
            reason = (2, 3, 2)
        elif self.bridge.refuses_association(session):
            reason = (1, 1, 1)
        if self.audit is not None:
            why = {(1, 1, 3): "not in Dicom:AllowedCallingAets", (2, 3, 2): "too many associations",
                   (1, 1, 1): "refused by onDicomAssociation"}.get(reason, "") if reason else ""
            self.audit.association(session, why, blocked=reason in ((1, 1, 3), (1, 1, 1)))
        if reason is None:
            return True
        with contextlib.suppress(OSError):
            conn.send(encode_reject(*reason))
        return False

    def _hand_off(self, rq: AssociateRq, conn: _Conn, ip: str, port: int) -> None:
        """Splice the connection to the pynetdicom AE (Query/Retrieve and C-GET associations)."""
        try:
            up = socket.create_connection(("127.0.0.1", self.handoff.port), timeout=10)
        except OSError as e:
            log.error("cannot reach the internal Q/R AE: %s", e)
            with contextlib.suppress(OSError):
                conn.send(encode_reject(2, 3, 1))
            return
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up.settimeout(None)
        conn.sock.settimeout(None)
        local = int(up.getsockname()[1])
        self.handoff.remember_peer(local, ip, port)
        with self._lock:
            self._conns.add(up)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while True:
                    data = src.recv(1 << 16)
                    if not data:
                        break
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)

        try:
            up.sendall(rq.raw)
            back = threading.Thread(target=pump, args=(up, conn.sock), name="dicom-handoff", daemon=True)
            back.start()
            pump(conn.sock, up)
            back.join(timeout=IDLE_SECONDS)
        finally:
            with self._lock:
                self._conns.discard(up)
            up.close()
            self.handoff.forget_peer(local)


class _Association:
    """One accepted storage association: P-DATA in, C-STORE/C-ECHO responses out."""

    def __init__(
        self,
        listener: DicomListener,
        session: AssocSession,
        conn: _Conn,
        rq: AssociateRq,
        accepted: dict[int, str],
        abstract_of: dict[int, str],
    ) -> None:
        self.listener = listener
        self.session = session
        self.conn = conn
        self.rq = rq
        self.accepted = accepted
        self.abstract_of = abstract_of
        self.peer_max = rq.max_pdu

    def _label(self) -> str:
        return f"{self.session.calling} ({self.session.ip}:{self.session.port})"

    def run(self) -> None:
        command = bytearray()
        data: list[bytes] = []
        cmd: dict[int, bytes] | None = None
        ctx_id = 0
        try:
            while True:
                try:
                    header = self.conn.read_exact(6, IDLE_SECONDS)
                except TimeoutError:
                    raise _Abort(f"idle for {IDLE_SECONDS:.0f}s") from None
                pdu_type, _, length = struct.unpack(">BBI", header)
                if length > MAX_PDU + 6 and pdu_type == 0x04:
                    raise _Abort(f"P-DATA PDU of {length} bytes exceeds the negotiated maximum {MAX_PDU}")
                if length > MAX_PDU + 6:
                    raise _Abort(f"PDU of {length} bytes")
                body = self.conn.read_exact(length, IDLE_SECONDS)
                if pdu_type == 0x05:  # A-RELEASE-RQ
                    self.conn.send(struct.pack(">BBIxxxx", 0x06, 0, 4))
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
                                self._dispatch(ctx_id, cmd, None)
                                cmd = None
                    else:
                        if cmd is None:
                            raise _Abort("data fragment without a command")
                        data.append(fragment)
                        if mch & 0x02:
                            payload = b"".join(data)
                            data.clear()
                            self._dispatch(ctx_id, cmd, payload)
                            cmd = None
        except _Abort as e:
            log.warning("association from %s aborted: %s", self._label(), e)
            with contextlib.suppress(OSError):
                self.conn.send(encode_abort(2, 0))
        except OSError as e:  # ConnectionError and timeouts mid-PDU included
            if self.listener._stopping:
                return
            log.info("association from %s: the peer vanished (%s)", self._label(), e)

    def _dispatch(self, ctx_id: int, cmd: dict[int, bytes], dataset: bytes | None) -> None:
        field_ = _us(cmd.get(0x0100))
        msg_id = _us(cmd.get(0x0110))
        sop_class = _text(cmd.get(0x0002)) or self.abstract_of.get(ctx_id, "")
        if field_ == 0x0030:  # C-ECHO-RQ
            try:
                self.listener.bridge.call("onCEcho", self.session.table(), session=self.session)
            except Exception as e:
                log.error("onCEcho failed: %s", e)
            self._respond(ctx_id, 0x8030, msg_id, sop_class, 0x0000)
            return
        if field_ == 0x0001:  # C-STORE-RQ
            sop_instance = _text(cmd.get(0x1000))
            if dataset is None:
                self._respond(ctx_id, 0x8001, msg_id, sop_class, STATUS_MISSING, sop_instance, "no data set")
                return
            try:
                status, comment = self.listener.store.store_blocking(
                    self.session, dataset, self.accepted[ctx_id], sop_class, sop_instance
                )
            except Exception:
                log.exception("C-STORE %s from %s failed", sop_instance, self._label())
                status, comment = 0x0110, "gateway error"
            self._respond(ctx_id, 0x8001, msg_id, sop_class, status, sop_instance, comment)
            return
        if field_ == 0x0FFF:  # C-CANCEL: nothing to cancel on a storage association
            return
        log.warning("association from %s: unsupported command 0x%04X", self._label(), field_)
        self._respond(ctx_id, field_ | 0x8000, msg_id, sop_class, 0x0211, "", "unrecognized operation")

    def _respond(
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
        if comment and status != 0x0000:
            raw = comment.encode("ascii", "replace")[:64]
            elements.append((0x0902, raw + b" " if len(raw) % 2 else raw))
        command = scu.encode_command(elements)
        limit = (self.peer_max - 6) if self.peer_max > 6 else len(command)
        parts = []
        for start in range(0, len(command), max(1, limit)):
            chunk = command[start : start + limit]
            last = start + limit >= len(command)
            mch = 0x03 if last else 0x01
            parts.append(struct.pack(">BBIIBB", 0x04, 0, len(chunk) + 6, len(chunk) + 2, ctx_id, mch))
            parts.append(chunk)
        self.conn.send(b"".join(parts))


STATUS_MISSING = 0xC000


def _us(raw: bytes | None) -> int:
    return struct.unpack("<H", raw[:2])[0] if raw and len(raw) >= 2 else 0


def _text(raw: bytes | None) -> str:
    return (raw or b"").rstrip(b"\0 ").decode("ascii", "replace")
