"""What can go wrong with an association, as exceptions the callers of the upper layer catch."""

from __future__ import annotations

from dicomproxy.dicom.ul import pdu as pdus


class UpperLayerError(Exception):
    """The association failed (refused, rejected, aborted, timed out, connection lost): the
    operation may work later. The message names the peer."""


class AssociationRejected(UpperLayerError):
    def __init__(self, label: str, result: int, source: int, reason: int) -> None:
        self.result, self.source, self.reason = result, source, reason
        rj = pdus.associate_rj(result, source, reason)
        kind = "permanently" if result == 1 else "transiently"
        super().__init__(f"{label} rejected the association {kind}: {rj.reason_str} ({rj.source_str})")


class AssociationAborted(UpperLayerError):
    """The peer sent an A-ABORT, or the provider gave up (invalid PDU, ARTIM, closed connection)."""
