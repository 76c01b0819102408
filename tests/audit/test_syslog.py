"""RFC 5424 framing: header fields, the meta sequenceId, the BOM, RFC 5425 octet counting."""

from __future__ import annotations

from dicomproxy.audit.syslog import PRI, SEQUENCE_MAX, Framer, header_field, octet_counted
from tests.audit.atna import parse_syslog


def test_frame_parses_as_rfc5424() -> None:
    raw = Framer("gw host", "dicomproxy", "77", "IHE+RFC-3881").frame(b"<AuditMessage/>", 1.5, 42)
    m = parse_syslog(raw)
    assert (m.pri, m.hostname, m.app, m.procid, m.msgid) == (PRI, "gw_host", "dicomproxy", "77", "IHE+RFC-3881")
    assert m.timestamp == "1970-01-01T00:00:01.500Z" and m.sequence == 42 and m.msg == b"<AuditMessage/>"
    assert PRI == 85  # facility 10 (security/authorization), severity 5 (notice): ITI-20


def test_sequence_wraps_within_rfc5424_range() -> None:
    framer = Framer("h", "a", "1", "ATNA")
    assert parse_syslog(framer.frame(b"x", 0, SEQUENCE_MAX + 1)).sequence == 1


def test_header_fields_are_printable_ascii_and_bounded() -> None:
    assert header_field("", 10) == "-" and header_field("é x", 10) == "__x" and len(header_field("a" * 99, 48)) == 48


def test_octet_counting() -> None:
    assert octet_counted(b"hello") == b"5 hello"
