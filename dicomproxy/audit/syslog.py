"""RFC 5424 syslog framing of audit messages, as IHE ITI TF-2 3.20 (ATNA, ITI-20) asks for it.

One message: ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [meta sequenceId="N"] BOM XML``.

* PRI 85: facility 10 (security/authorization), severity 5 (notice), per ITI-20;
* MSGID ``IHE+RFC-3881`` (ITI-20's value for the DICOM/RFC 3881 payload; ``ATNA`` with
  ``Audit:MsgId`` for collectors that want it);
* the structured element ``meta`` (RFC 5424 7.3, registered) carries ``sequenceId``: the
  message's place in the gateway's audit buffer, the same on every resend, so a collector can
  drop the duplicates that at-least-once delivery may produce (EventID + EventDateTime +
  sequenceId identify a message);
* the XML follows a UTF-8 BOM, as RFC 5424 6.4 says of a UTF-8 MSG.

Transports add their own framing: RFC 5425 (TLS) octet counting, ``LEN SP MSG``
(:func:`octet_counted`); RFC 5426 (UDP) one message per datagram, nothing added.
"""

from __future__ import annotations

import re

from dicomproxy.audit.message import iso_time

PRI = 10 * 8 + 5
BOM = b"\xef\xbb\xbf"
SEQUENCE_MAX = 2147483647  # RFC 5424 7.3.1: sequenceId is 1..2^31-1, then wraps


def header_field(value: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, at most ``limit`` characters, ``-`` if empty."""
    cleaned = re.sub(r"[^\x21-\x7e]", "_", value)[:limit]
    return cleaned or "-"


class Framer:
    """Builds the RFC 5424 message of each audit XML; the constant part of the header once."""

    def __init__(self, hostname: str, app_name: str, procid: str, msgid: str) -> None:
        self.tail = (f" {header_field(hostname, 255)} {header_field(app_name, 48)} {header_field(procid, 128)} "
                     f"{header_field(msgid, 32)} ")

    def frame(self, xml: bytes, ts: float, seq: int) -> bytes:
        sequence = (seq - 1) % SEQUENCE_MAX + 1
        head = f"<{PRI}>1 {iso_time(ts)}{self.tail}[meta sequenceId=\"{sequence}\"] "
        return head.encode("ascii") + BOM + xml


def octet_counted(message: bytes) -> bytes:
    """RFC 5425 4.3 / RFC 6587 3.4.1: ``MSG-LEN SP SYSLOG-MSG``."""
    return b"%d %s" % (len(message), message)
