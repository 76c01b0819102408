"""Associations from the Query/Retrieve services to the PACS (``Dicom:Upstream``), with
pynetdicom's requestor AE; calling AE title ``Dicom:Aet``."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association as PynetdicomAssociation

from dicomproxy.config.settings import DicomSettings, RemoteAe
from dicomproxy.dicom import presentation
from dicomproxy.dicom.ul import tls as dicom_tls

ACSE_TIMEOUT = 30
DIMSE_TIMEOUT = 120
NETWORK_TIMEOUT = 120


def set_nodelay(event: evt.Event) -> None:
    """pynetdicom leaves Nagle on: a C-STORE's command and data PDUs then wait ~40 ms for a
    delayed ACK. Every DICOM socket of the gateway turns it off."""
    with contextlib.suppress(Exception):
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]


def requestor(settings: DicomSettings, models: Sequence[str] = ()) -> AE:
    """A requestor AE proposing each of ``models`` with the uncompressed syntaxes."""
    ae = AE(ae_title=settings.aet)
    ae.acse_timeout = ACSE_TIMEOUT
    ae.dimse_timeout = DIMSE_TIMEOUT
    ae.network_timeout = NETWORK_TIMEOUT
    for model in models:
        ae.add_requested_context(model, [presentation.IMPLICIT, presentation.EXPLICIT])
    return ae


def associate(settings: DicomSettings, ae: AE, **kwargs: Any) -> PynetdicomAssociation:
    """Associate ``ae`` with the PACS (over TLS when ``Dicom:Upstream:Tls``); the caller checks
    ``is_established``."""
    up = settings.upstream
    handlers = [(evt.EVT_CONN_OPEN, set_nodelay), *kwargs.pop("evt_handlers", [])]
    kwargs.update(tls_kwargs(up, settings))
    return ae.associate(up.host, up.port, ae_title=up.aet, evt_handlers=handlers, **kwargs)


def tls_kwargs(remote: RemoteAe, settings: DicomSettings) -> dict[str, Any]:
    """pynetdicom's ``tls_args`` for ``remote`` (nothing when its ``Tls`` is off)."""
    ctx = dicom_tls.client_context(remote, settings.tls)
    return {"tls_args": (ctx, remote.host)} if ctx is not None else {}


def describe(settings: DicomSettings) -> str:
    up = settings.upstream
    return f"{up.aet}@{up.host}:{up.port}"
