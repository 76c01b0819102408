"""Associations the Query/Retrieve services open: to the PACS (``Dicom:Upstream``, calling AE
title ``Dicom:Aet``) for every request they relay, and to a move destination
(``Dicom:Modalities``) when a C-MOVE is served by fetching. One association per operation,
released when it ends (aborted if it failed), as a Q/R SCU does. Over TLS when the peer's
``Tls`` is on (``Dicom:Upstream:Tls``, ``Dicom:Modalities:{name}:Tls``): the client context of
:func:`.ul.tls.client_context`, the peer's ``Host`` as the server name (checked against its
certificate unless ``TlsCheckHostname`` is false).

Each proposed (abstract syntax, transfer syntax) pair is its own presentation context, so the
peer's answer says exactly which encodings it takes; the caller picks with
:meth:`.link.DimseLink.context_for`.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

from dicomproxy.config.settings import DicomTlsSettings, RemoteAe
from dicomproxy.dicom import presentation
from dicomproxy.dicom.qr.link import DimseLink, Pair
from dicomproxy.dicom.ul import pdu as pdus
from dicomproxy.dicom.ul import tls as dicom_tls
from dicomproxy.dicom.ul.errors import UpperLayerError
from dicomproxy.dicom.ul.transport import StreamAssociation

MAX_PDU = 1 << 20
"""What the gateway announces it receives (a PDU is read whole into memory)."""


@dataclass(frozen=True)
class Peer:
    aet: str
    host: str
    port: int
    tls: ssl.SSLContext | None = field(default=None, compare=False)
    name: str = field(default="", compare=False)  # its server's name (``default``: Dicom:Upstream), if any

    @classmethod
    def of(cls, remote: RemoteAe, own: DicomTlsSettings, name: str = "") -> Peer:
        """``remote`` (the PACS or a move destination) with its TLS context, if its ``Tls`` is on."""
        return cls(remote.aet, remote.host, remote.port, dicom_tls.client_context(remote, own), name)

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


async def associate(
    peer: Peer, calling_aet: str, pairs: Sequence[Pair], *, roles: Sequence[str] = (), timeout: float,
    connect_timeout: float = 30.0,
) -> DimseLink:
    """An association with ``peer`` proposing ``pairs`` (and the SCP role for the SOP classes of
    ``roles``); raises :class:`UpperLayerError` when it cannot be had or accepts none of them."""
    proposed = presentation.contexts_of(list(pairs))
    rq = pdus.associate_rq(peer.aet, calling_aet, proposed, MAX_PDU, roles)
    link, ac = await StreamAssociation.request(peer.host, peer.port, rq, timeout=connect_timeout, tls=peer.tls)
    results = pdus.accepted_contexts(ac)
    accepted: dict[int, Pair] = {}
    for cx, pair in zip(proposed, pairs, strict=True):
        result, chosen = results.get(cx.context_id, (presentation.ABSTRACT_SYNTAX_NOT_SUPPORTED, ""))
        if result == presentation.ACCEPTANCE and (not chosen or chosen == pair[1]):
            accepted[cx.context_id] = pair
    dimse = DimseLink(link, accepted, timeout=timeout)
    if not accepted:
        await dimse.release()
        raise UpperLayerError(f"{peer} accepted none of the {len(pairs)} presentation context(s) proposed")
    return dimse
