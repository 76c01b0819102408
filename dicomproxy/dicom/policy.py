"""Who may associate with the DICOM port, and what each calling AE may do once associated.

Owns the admission rules that depend on the peer's identity (address, calling and called AE
titles) and the per-operation permissions; not the resource limits (:mod:`.ul.acceptor`), not
``onDicomAssociation`` (:mod:`.session`), not TLS (:mod:`.ul.tls`).

An association request is checked in this order, the first failing rule refusing it with an
A-ASSOCIATE-RJ, permanent, source "DICOM UL service-user" (PS3.8 Table 9-21):

========================================  ======  ==============================================
rule                                      reason  PS3.8 Table 9-21 meaning
========================================  ======  ==============================================
``Dicom:AllowedAddresses``                1       no-reason-given (the table has no address reason;
                                                  "calling AE not recognized" would send the site
                                                  to fix an AE title that is right)
``Dicom:CheckCalledAet``                  7       called-AE-title-not-recognized (the called AE is
                                                  neither ``Dicom:Aet`` nor the PACS's
                                                  ``Dicom:Upstream:Aet``: a modality moved over
                                                  unchanged still calls the PACS, which the
                                                  gateway stands in for)
``Dicom:BlockedCallingAets``              3       calling-AE-title-not-recognized
``Dicom:AllowedCallingAets``              3       calling-AE-title-not-recognized
========================================  ======  ==============================================

Each refusal is one log line naming the peer and the key. An operation the calling AE may not
use (``Dicom:AePermissions``) is answered, per message, with the DIMSE status 0x0124
"Refused: Not Authorized" (PS3.7 Annex C.5.x, the general failure status for "the service user
is not authorized to invoke the operation"), with one log line; refusing presentation contexts
instead would tell the modality "SOP class not supported", which sends the site looking for the
wrong problem. C-ECHO is always allowed (it is how a site tests connectivity).
"""

from __future__ import annotations

import enum
import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from dicomproxy.config.settings import DicomSettings

log = logging.getLogger(__name__)

STATUS_NOT_AUTHORIZED = 0x0124
"""PS3.7 C.5.x "Refused: Not Authorized"."""

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Operation(enum.Enum):
    STORE = "store"
    FIND = "find"
    MOVE = "move"
    GET = "get"


ALL_OPERATIONS = frozenset(Operation)


@dataclass(frozen=True, slots=True)
class Refusal:
    """An A-ASSOCIATE-RJ (result, source, reason) and why (the log line's end)."""

    result: int
    source: int
    reason: int
    why: str

    @property
    def rj(self) -> tuple[int, int, int]:
        return self.result, self.source, self.reason


def _permanent(reason: int, why: str) -> Refusal:
    return Refusal(1, 1, reason, why)


@dataclass(frozen=True)
class AssociationPolicy:
    """The ``Dicom:*`` identity rules, parsed once (immutable; shared by every association)."""

    own_aet: str
    check_called: bool = True
    pacs_aet: str = ""  # also a called AE title to accept: Dicom:Upstream:Aet
    virtual_aets: frozenset[str] = frozenset()  # and the called AE titles Dicom:Routes name ("virtual AEs")
    allowed_calling: frozenset[str] = frozenset()
    blocked_calling: frozenset[str] = frozenset()
    networks: tuple[IpNetwork, ...] = ()
    permissions: Mapping[str, frozenset[Operation]] | None = None

    @classmethod
    def of(cls, settings: DicomSettings) -> AssociationPolicy:
        return cls(
            own_aet=settings.aet.strip(),
            check_called=settings.check_called_aet,
            pacs_aet=settings.upstream.aet.strip(),
            virtual_aets=frozenset(r.called_aet.strip() for r in settings.routes if r.called_aet.strip()),
            allowed_calling=frozenset(a.strip() for a in settings.allowed_calling_aets),
            blocked_calling=frozenset(a.strip() for a in settings.blocked_calling_aets),
            networks=tuple(ipaddress.ip_network(n, strict=False) for n in settings.allowed_addresses),
            permissions={ae.strip(): operations(ops) for ae, ops in settings.ae_permissions.items()},
        )

    def address_allowed(self, ip: str) -> bool:
        if not self.networks:
            return True
        try:
            address = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:10.0.0.5 on a dual-stack socket is 10.0.0.5
        return any(address in net for net in self.networks if net.version == address.version)

    def check(self, calling: str, called: str, ip: str) -> Refusal | None:
        """The first rule the request breaks (module docstring), or None."""
        calling, called = calling.strip(), called.strip()
        if not self.address_allowed(ip):
            return _permanent(1, f"address {ip} is not in Dicom:AllowedAddresses")
        if self.check_called and called != self.own_aet and (not self.pacs_aet or called != self.pacs_aet) \
                and called not in self.virtual_aets:
            pacs = f" nor the PACS's {self.pacs_aet!r} (Dicom:Upstream:Aet)" if self.pacs_aet else ""
            return _permanent(7, f"called AE {called!r} is not this gateway's {self.own_aet!r} (Dicom:Aet){pacs}; "
                                 "Dicom:CheckCalledAet is true")
        if calling in self.blocked_calling:
            return _permanent(3, "calling AE is in Dicom:BlockedCallingAets")
        if self.allowed_calling and calling not in self.allowed_calling:
            return _permanent(3, "calling AE is not in Dicom:AllowedCallingAets")
        return None

    def operations_of(self, calling: str) -> frozenset[Operation]:
        """What ``calling`` may do: its ``Dicom:AePermissions`` entry, else the ``*`` entry, else all."""
        table = self.permissions
        if not table:
            return ALL_OPERATIONS
        found = table.get(calling.strip())
        if found is None:
            found = table.get("*", ALL_OPERATIONS)
        return found


def operations(names: Iterable[str]) -> frozenset[Operation]:
    return frozenset(Operation(n.lower()) for n in names)


def log_not_authorized(operation: Operation, calling: str, ip: str, port: int) -> None:
    """The one line for a refused operation."""
    log.warning("C-%s from %s (%s:%d) refused with 0x%04X (not authorized): %r may not %s (Dicom:AePermissions)",
                operation.name, calling, ip, port, STATUS_NOT_AUTHORIZED, calling, operation.value)
