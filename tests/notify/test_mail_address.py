"""The Lua API's Email type (RFC 5322 addr-spec, RFC 6531 international, IDNA domains; checked by
email-validator) and the mail table."""

from __future__ import annotations

from email import policy

import pytest

from dicomproxy.notify.events import AppEvent
from dicomproxy.notify.mail import Mail, MailError, MailRule, event_mail, parse_mail, validate_email, wire_address

VALID = [
    "test@dicom.link",
    "a@b",  # a single-label domain (an intranet relay's name)
    "dicomproxy@localhost",  # the default Smtp:From: special-use names are taken too
    "pacs@radiology.hospital.local",
    "ci@gateway.test",
    "first.last+tag@sub.example-host.org",
    "!#$%&'*+/=?^_`{|}~-@example.org",  # every atext special
    '"john doe"@example.com',  # a quoted local part that needs its quotes stays quoted (3.2.4)
    '"a\\"b\\\\c"@example.com',  # quoted-pairs inside it
    '"dots..are.fine."@example.com',
    '"@"@example.com',
    "user@[127.0.0.1]",  # domain-literal
    "user@[IPv6:::1]",
]

NORMALIZED = [
    ("jo@EXAMPLE.ORG", "jo@example.org"),  # the domain is case-insensitive: lower case
    ('"abc"@example.org', "abc@example.org"),  # quotes that are not needed are dropped
    ("a@xn--bcher-kva.de", "a@bücher.de"),  # IDNA: the Unicode form is what scripts see
    ("Ops@Hospital.LOCAL", "Ops@hospital.local"),
    ("e\u0301@example.org", "\u00e9@example.org"),  # NFC
]

INTERNATIONAL = [  # (address, what SMTP is given)
    ("jö@example.com", "jö@example.com"),  # needs SMTPUTF8
    ("用户@例子.广告", "用户@例子.广告"),
    ("ärztin@krankenhaus-münchen.de", "ärztin@krankenhaus-münchen.de"),
    ("a@bücher.de", "a@xn--bcher-kva.de"),  # ASCII local part: the IDNA domain needs no SMTPUTF8
    ("radiologie@klinik-zürich.local", "radiologie@xn--klinik-zrich-klb.local"),
]

LOCAL_64 = "l" * 64
DOMAIN_189 = "a" * 63 + "." + "b" * 63 + "." + "c" * 61

INVALID = [
    ("", "must have an @-sign"),
    ("nobody", "must have an @-sign"),
    ("a..b@example.com", "two periods in a row"),
    (".a@example.com", "cannot start with a period"),
    ("a.@example.com", "period immediately before the @-sign"),
    ("a@example..com", "two periods in a row"),
    ("a@", "something after the @-sign"),
    ("@example.com", "something before the @-sign"),
    ("john doe@example.com", "invalid characters before the @-sign: SPACE"),
    ("a@b@example.com", "invalid characters: '@'"),
    ("a(comment)@example.com", "invalid characters before the @-sign: '(', ')'"),
    ("a@example.com\r\nBcc: victim@example.org", "U+000A, U+000D"),  # no header injection
    ('"unterminated@example.com', "must have an @-sign"),
    ("a@[1.2.3.4", "invalid characters: '['"),
    ("a@exa mple.com", "invalid characters: SPACE"),
    ("Jo Doe <jo@example.org>", "display name and angle brackets"),  # an addr-spec, as before
    (LOCAL_64 + "x@example.org", "too long before the @-sign (1 character too many)"),  # RFC 5321 4.5.3.1.1
    (LOCAL_64 + "@" + DOMAIN_189 + "c", "too long"),  # 255 in all (RFC 3696 errata: 254)
    ("a@" + "b" * 64 + ".org", "periods cannot be separated by so many characters"),  # a label > 63
    ("a@" + "b" * 64 + ".local", "periods cannot be separated by so many characters"),  # special-use too
    ("x" * 240 + "@" + "h" * 8 + ".localhost", "too long"),  # 259: the limits hold for localhost as well
]


@pytest.mark.parametrize("address", VALID)
def test_valid_addresses_are_accepted_unchanged(address: str) -> None:
    assert validate_email(address, "To") == address
    assert wire_address(address) == address


@pytest.mark.parametrize(("address", "normalized"), NORMALIZED)
def test_addresses_come_back_in_the_librarys_normalized_form(address: str, normalized: str) -> None:
    assert validate_email(address, "To") == normalized


@pytest.mark.parametrize(("address", "wire"), INTERNATIONAL)
def test_international_addresses_and_idna_domains(address: str, wire: str) -> None:
    assert validate_email(address, "To") == address
    assert wire_address(address) == wire


def test_the_rfc_length_limits_are_the_edges() -> None:
    assert validate_email(LOCAL_64 + "@example.org", "To") == LOCAL_64 + "@example.org"
    longest = LOCAL_64 + "@" + DOMAIN_189
    assert len(longest) == 254
    assert validate_email(longest, "To") == longest
    label_63 = "a@" + "b" * 63 + ".local"
    assert validate_email(label_63, "To") == label_63


def test_surrounding_blanks_are_dropped() -> None:
    assert validate_email("  a@b.org\t", "From") == "a@b.org"


@pytest.mark.parametrize(("address", "reason"), INVALID)
def test_invalid_addresses_name_field_value_and_reason(address: str, reason: str) -> None:
    with pytest.raises(MailError) as info:
        validate_email(address, "SendMail: To")
    message = str(info.value)
    assert message.startswith("SendMail: To: ")
    assert repr(address) in message
    assert reason in message


def test_non_string_address_is_refused() -> None:
    with pytest.raises(MailError, match=r"From: expected an email address \(a string\), got 42"):
        validate_email(42, "From")


def test_parse_mail_takes_the_seed_fields_and_defaults_from() -> None:
    mail = parse_mail({"To": "test@dicom.link", "Subject": "subject", "TextBody": "some text",
                       "HtmlBody": "some html text"}, "gateway@example.org")
    assert mail == Mail("gateway@example.org", ("test@dicom.link",), "subject", "some text", "some html text")
    assert mail.to_lua() == {"From": "gateway@example.org", "To": "test@dicom.link", "Subject": "subject",
                             "TextBody": "some text", "HtmlBody": "some html text"}


def test_parse_mail_accepts_an_array_of_recipients_and_names_the_bad_one() -> None:
    mail = parse_mail({"To": ["a@example.org", "b@example.org"]}, "g@example.org")
    assert mail.to == ("a@example.org", "b@example.org")
    assert mail.to_lua()["To"] == ["a@example.org", "b@example.org"]
    with pytest.raises(MailError, match=r"SendMail: To\[2\]: 'not an address'"):
        parse_mail({"To": ["a@example.org", "not an address"]}, "g@example.org", "SendMail")
    # a Lua array that came through as {1: .., 2: ..}
    assert parse_mail({"To": {1: "a@x.org", 2: "b@x.org"}}, "g@x.org").to == ("a@x.org", "b@x.org")


def test_parse_mail_refuses_unknown_fields_and_missing_recipient() -> None:
    expected = r"unknown field 'Body' \(expected From, To, Subject, TextBody, HtmlBody\)"
    with pytest.raises(MailError, match=expected):
        parse_mail({"To": "a@b.org", "Body": "x"}, "g@x.org", "SendMail")
    with pytest.raises(MailError, match="SendMail: To: a recipient address is required"):
        parse_mail({"Subject": "x"}, "g@x.org", "SendMail")
    with pytest.raises(MailError, match="SendMail: From: 'bad sender'"):
        parse_mail({"From": "bad sender", "To": "a@b.org"}, "g@x.org", "SendMail")
    with pytest.raises(MailError, match="expected a table"):
        parse_mail("a@b.org", "g@x.org", "SendMail")


def test_subject_line_breaks_cannot_inject_headers() -> None:
    mail = parse_mail({"To": "a@b.org", "Subject": "hello\r\nBcc: victim@example.org"}, "g@x.org")
    assert "\n" not in mail.subject and "\r" not in mail.subject
    message = mail.to_message()
    assert message["Bcc"] is None
    assert message["Subject"] == "hello Bcc: victim@example.org"


def test_message_headers_carry_idna_domains_in_ascii_and_international_local_parts_as_utf8() -> None:
    idna = Mail("gateway@klinik-zürich.local", ("a@bücher.de",), "s", "t").to_message()
    assert idna["From"] == "gateway@xn--klinik-zrich-klb.local"
    assert idna["To"] == "a@xn--bcher-kva.de"
    assert idna["Message-ID"].endswith("@xn--klinik-zrich-klb.local>")
    intl = Mail("gateway@example.org", ("jö@example.com",), "Grüße", "ü").to_message()
    flat = intl.as_bytes(policy=policy.SMTPUTF8)  # what aiosmtplib sends once SMTPUTF8 is agreed
    assert "To: jö@example.com".encode() in flat


def test_message_has_text_and_html_alternatives() -> None:
    message = Mail("g@x.org", ("a@b.org", "c@d.org"), "s", "plain", "<b>html</b>").to_message()
    assert message["To"] == "a@b.org, c@d.org"
    assert message.get_content_type() == "multipart/alternative"
    assert message.get_body(("plain",)).get_content().strip() == "plain"
    assert message.get_body(("html",)).get_content().strip() == "<b>html</b>"
    html_only = Mail("g@x.org", ("a@b.org",), "s", "", "<i>x</i>").to_message()
    assert html_only.get_content_type() == "text/html"


def test_event_mail_escapes_html_and_rules_match_globs() -> None:
    event = AppEvent("import.failed", "Import failed: <x>", "PACS said 500 & gave up", "/dicomproxy/ui")
    mail = event_mail(event, "g@x.org", ["ops@example.org"])
    assert mail.subject == "[DicomProxy] Import failed: <x>"
    assert "PACS said 500 & gave up" in mail.text_body and "Event: import.failed" in mail.text_body
    assert "&lt;x&gt;" in mail.html_body and "<x>" not in mail.html_body
    assert MailRule(("*.failed",), ("a@b",)).matches("import.failed")
    assert MailRule(("Upload.Imported",), ("a@b",)).matches("upload.imported")
    assert not MailRule(("upload.imported",), ("a@b",)).matches("import.failed")
