"""The IHE ATNA audit trail (issue 12, item 7): DICOM PS3.15 A.5 audit messages, sent as RFC 5424
syslog over TLS (RFC 5425) and/or UDP (RFC 5426) to ``Audit:Collectors``, through a durable
buffer, and written to a local JSON-lines file.

Modules, one concept each: ``codes`` (the coded values), ``events`` (the event model and the
A.5.3 messages), ``message`` (the XML), ``syslog`` (RFC 5424 framing), ``journal`` (the durable
buffer), ``senders`` (TLS and UDP), ``jsonfile`` (the local file), ``logins`` (which logins are
recorded, bursts), ``trail`` (:class:`AuditTrail`, ``host.audit``), ``web`` (QIDO-RS / WADO-RS
recognised on the proxied path). ``install(host)`` adds the DICOMweb recogniser and the health.
"""

from __future__ import annotations

from dicomproxy.audit.events import AuditEvent
from dicomproxy.audit.trail import AuditTrail

__all__ = ["AuditEvent", "AuditTrail"]
