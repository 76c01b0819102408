"""The DICOM side: a store-and-forward gateway in front of the PACS, with Query/Retrieve passed
through, and the DICOM Lua events. ``install(gateway)`` wires it into the gateway process.

Layers, bottom up:

* ``ul/`` the upper layer (PS3.8): ``pdu`` (pynetdicom's PDU classes), ``fsm`` (the state table),
  ``association`` (one association's protocol, both roles, ARTIM; no I/O), ``transport`` (that
  protocol on a blocking socket or on asyncio streams), ``requestor`` (the one way an outbound
  association is opened: relay, forwarder, ``send``, Q/R), ``acceptor`` (the port and connection
  admission), ``tls`` (DICOM TLS contexts, the acceptor's handshake), ``tls_transport`` (asyncio
  streams on the TLS port's sockets), ``errors``;
* ``dimse`` command sets and message assembly (PS3.7); ``presentation`` every presentation
  context and transfer syntax rule; ``implementation`` the gateway's implementation identity;
* services: ``storage_scp`` (C-STORE/C-ECHO received, one thread per association),
  ``storage_scu`` (C-STORE/C-ECHO sent), ``qr/`` (C-FIND, C-MOVE/C-GET relayed on the loop);
* ``policy`` (who may associate, what each calling AE may do), ``dispatch`` (association policy,
  and where each association goes), ``relay`` (a modality association mirrored by one to the
  PACS: the PACS's own answers), ``negotiation`` (the PACS's answer to a proposal, asked and
  cached), ``store`` (what happens to one received instance), ``spool`` (the durable queue on
  disk), ``forwarder`` (C-STORE or STOW-RS to the PACS, at least once, never wedged),
  ``statuses`` (what a C-STORE status means: stored, retry, refused), ``spool_api``
  (``/dicomproxy/spool``), ``datasets`` (Dataset <-> Lua tables), ``session``
  (per-association Lua scope), ``hooks`` (the "instance stored" hook other features subscribe
  to), ``commands`` (``InternalCmdRun`` send / echo), ``component`` (start, stop, health).

Nothing here knows of Orthanc: the Orthanc layer subscribes to :class:`.hooks.InstanceStored`.
"""

from __future__ import annotations

from typing import Any

from dicomproxy_middleware import LuaExportError

from dicomproxy.dicom import commands as dicom_commands
from dicomproxy.dicom.component import DicomComponent
from dicomproxy.host import Host

__all__ = ["DicomComponent", "install"]


def install(gateway: Host) -> None:
    """Add the DICOM component, its health and metrics, and the send/echo commands."""
    component = DicomComponent(gateway)
    if gateway.worker.owner:
        gateway.add_component(component)
        gateway.add_health("dicom", component.health)
        gateway.mount("/dicomproxy/spool", component.api)
    else:  # Server:Workers: the port, the spool and the forwarder are worker 0's
        gateway.add_health("dicom", lambda: {"ok": True, "enabled": component.settings.port != 0,
                                             "servedBy": "worker 0"})
        gateway.mount("/dicomproxy/spool", _owner_only)
    settings = component.settings

    async def send(args: str) -> dict[str, Any]:
        try:
            return await dicom_commands.send(args, settings, component.destinations)
        except dicom_commands.CommandError as e:
            raise LuaExportError(str(e)) from None

    async def echo(args: str) -> dict[str, Any]:
        try:
            return await dicom_commands.echo(args, settings, component.destinations)
        except dicom_commands.CommandError as e:
            raise LuaExportError(str(e)) from None

    gateway.commands.register("send", send, dicom_commands.SEND_USAGE)
    gateway.commands.register("echo", echo, dicom_commands.ECHO_USAGE)


async def _owner_only(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``/dicomproxy/spool`` on a worker other than 0: the spool is worker 0's; a new connection
    (the status page's next poll) may land there."""
    body = b'{"error": "the DICOM spool is served by worker 0 (Server:Workers); retry on a new connection"}'
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
