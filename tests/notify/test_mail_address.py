"""The Lua API's Email type (RFC 5322 3.2.3 dot-atom / 3.4.1 addr-spec) and the mail table."""

from __future__ import annotations

import pytest

from dicomproxy.notify.events import AppEvent
from dicomproxy.notify.mail import Mail, MailError, MailRule, event_mail, parse_mail, validate_email

VALID = [
    "test@dicom.link",
    "a@b",  # a single-label domain is a dot-atom too (e.g. localhost)
    "first.last+tag@sub.example-host.org",
    "!#$%&'*+/=?^_`{|}~-@example.org",  # every atext special
    '"john doe"@example.com',  # quoted-string local part (3.2.4)
    '"a\\"b\\\\c"@example.com',  # quoted-pairs inside it
    '"dots..are.fine."@example.com',
    '"@"@example.com',
    "user@[127.0.0.1]",  # domain-literal
    "user@[IPv6:::1]",
]

INVALID = [
    ("", "is empty"),
    ("nobody", "no @"),
    ("a..b@example.com", "doubled dot"),
    (".a@example.com", "leading"),
    ("a.@example.com", "trailing"),
    ("a@example..com", "doubled dot"),
    ("a@", "domain after @ is empty"),
    ("@example.com", "local part before @ is empty"),
    ("john doe@example.com", "contains ' '"),
    ("a@b@example.com", "contains '@'"),
    ("a(comment)@example.com", "contains '()'"),
    ("jö@example.com", "non-ASCII"),
    ("a@example.com\r\nBcc: victim@example.org", "line break"),
    ('"unterminated@example.com', "not a valid"),
    ("a@[1.2.3.4", "not a valid"),
    ("a@exa mple.com", "contains ' '"),
]


@pytest.mark.parametrize("address", VALID)
def test_valid_addresses_are_accepted_unchanged(address: str) -> None:
    assert validate_email(address, "To") == address


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
