"""Mail through a real SMTP server (aiosmtpd on a free loopback port).

The transport tests talk to aiosmtpd directly; the gateway tests (further down) start the
gateway as a real process with Smtp pointing at the same kind of server and drive it through
its Lua scripts and app events.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from dicomproxy.config.settings import SmtpSettings
from dicomproxy.notify.mail import Mail, PermanentMailError, SmtpTransport
from tests.peers import LOOPBACK, GatewayProcess, free_port, wait_until

OPENSSL = "/usr/bin/openssl"


# ----------------------------------------------------------------------------- the SMTP peer
@dataclass
class Received:
    sender: str
    recipients: list[str]
    message: EmailMessage
    secure: bool
    login: str | None
    raw: bytes = b""  # the DATA as it came (the parsed headers re-render addresses)

    def text(self) -> str:
        return self.message.get_body(("plain",)).get_content()

    def html(self) -> str:
        return self.message.get_body(("html",)).get_content()


@dataclass
class SmtpSink:
    """A real aiosmtpd server; ``messages`` collects what arrives (thread-safe)."""

    tls_context: ssl.SSLContext | None = None
    require_starttls: bool = False
    users: dict[str, str] = field(default_factory=dict)
    implicit_tls: ssl.SSLContext | None = None  # TLS from the first byte (Smtp:Security Tls)
    temp_failures: int = 0  # answer 451 to this many DATA commands first
    smtputf8: bool = False  # offer SMTPUTF8 (RFC 6531) in the EHLO answer
    messages: list[Received] = field(default_factory=list)
    attempts: int = 0
    port: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _controller: Controller | None = None

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,  # noqa: N802
                          rcpt_options: list[str]) -> str:
        if address.startswith("reject"):
            return "550 5.1.1 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        with self._lock:
            self.attempts += 1
            if self.temp_failures > 0:
                self.temp_failures -= 1
                return "451 4.3.0 try again later"
            message = message_from_bytes(envelope.content, policy=policy.default)
            login = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None
            secure = bool(session.ssl) or server.transport.get_extra_info("ssl_object") is not None
            self.messages.append(
                Received(envelope.mail_from, list(envelope.rcpt_tos), message, secure, login, envelope.content))
        return "250 2.0.0 OK"

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                      data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and self.users.get(data.login.decode()) == data.password.decode()
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    def start(self) -> SmtpSink:
        self.port = free_port()
        kwargs: dict[str, Any] = {}
        if self.tls_context is not None:
            kwargs.update(tls_context=self.tls_context, require_starttls=self.require_starttls)
        if self.implicit_tls is not None:
            kwargs.update(ssl_context=self.implicit_tls)
        if self.users:
            kwargs.update(authenticator=self._authenticate, auth_require_tls=self.tls_context is not None)
        kwargs.update(enable_SMTPUTF8=self.smtputf8)  # aiosmtpd's Controller would offer it by default
        self._controller = Controller(self, hostname=LOOPBACK, port=self.port, ready_timeout=10, **kwargs)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def wait_for(self, count: int, timeout: float = 15) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.05)
        pytest.fail(f"expected {count} mail(s) at the SMTP server within {timeout}s, "
                    f"got {len(self.messages)}", pytrace=False)
        raise AssertionError("unreachable")


@pytest.fixture
def smtp_factory() -> Iterator[Callable[..., SmtpSink]]:
    made: list[SmtpSink] = []

    def make(**kwargs: Any) -> SmtpSink:
        sink = SmtpSink(**kwargs)
        made.append(sink)
        return sink.start()

    yield make
    for sink in made:
        sink.stop()


@pytest.fixture
def smtp(smtp_factory: Callable[..., SmtpSink]) -> SmtpSink:
    return smtp_factory()


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl), as (cert.pem, key.pem)."""
    if not shutil.which(OPENSSL):
        pytest.fail(f"{OPENSSL} is missing: run scripts/install.sh (apt-get install openssl)", pytrace=False)
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def smtp_settings(port: int, **over: Any) -> SmtpSettings:
    values: dict[str, Any] = dict(host=LOOPBACK, port=port, security="None", username="", password="",
                                  sender="gateway@example.org", timeout=5.0, retries=2, retry_delay=0.05)
    values.update(over)
    return SmtpSettings(**values)


MAIL = Mail("gateway@example.org", ("ops@example.org", "lead@example.org"), "Hello", "plain text",
            "<p>html</p>")


# ----------------------------------------------------------------------------- transport
async def test_transport_delivers_text_and_html(smtp: SmtpSink) -> None:
    assert await SmtpTransport(smtp_settings(smtp.port)).send(MAIL) == 1
    (got,) = await asyncio.to_thread(smtp.wait_for, 1)
    assert got.sender == "gateway@example.org"
    assert got.recipients == ["ops@example.org", "lead@example.org"]
    assert got.message["Subject"] == "Hello"
    assert got.text().strip() == "plain text" and got.html().strip() == "<p>html</p>"
    assert not got.secure


INTERNATIONAL = Mail("gateway@klinik-zürich.local", ("jö@bücher.de", "a@bücher.de"), "Grüße", "Bilder für Sie")


async def test_transport_international_addresses_go_over_smtputf8(smtp_factory: Callable[..., SmtpSink]) -> None:
    smtp = smtp_factory(smtputf8=True)
    assert await SmtpTransport(smtp_settings(smtp.port)).send(INTERNATIONAL) == 1
    (got,) = smtp.messages
    # IDNA domains of ASCII local parts travel in ASCII; an international one needs (and got) SMTPUTF8
    assert got.sender == "gateway@xn--klinik-zrich-klb.local"
    assert got.recipients == ["jö@bücher.de", "a@xn--bcher-kva.de"]
    assert got.message["To"] == "jö@bücher.de, a@xn--bcher-kva.de"
    assert got.message["Subject"] == "Grüße" and got.text().strip() == "Bilder für Sie"


async def test_transport_without_smtputf8_fails_clearly_and_at_once(smtp: SmtpSink) -> None:
    started = time.monotonic()
    settings = smtp_settings(smtp.port, retries=3, retry_delay=5)
    with pytest.raises(PermanentMailError, match=r"SMTPUTF8 is not supported by this server.*Smtp:Host must offer "
                                                 r"SMTPUTF8 \(RFC 6531\), or use an ASCII address"):
        await SmtpTransport(settings).send(INTERNATIONAL)
    assert time.monotonic() - started < 4  # permanent: not retried
    assert smtp.attempts == 0
    # an IDNA domain alone needs no SMTPUTF8: the same server takes it in ASCII
    idna_only = Mail("gateway@example.org", ("a@bücher.de",), "s", "t")
    assert await SmtpTransport(settings).send(idna_only) == 1
    assert smtp.messages[0].recipients == ["a@xn--bcher-kva.de"]


async def test_transport_retries_temporary_failures(smtp_factory: Callable[..., SmtpSink]) -> None:
    smtp = smtp_factory(temp_failures=2)
    assert await SmtpTransport(smtp_settings(smtp.port, retries=2)).send(MAIL) == 3
    assert smtp.attempts == 3 and len(smtp.messages) == 1


async def test_transport_gives_up_after_the_configured_retries(smtp_factory: Callable[..., SmtpSink]) -> None:
    smtp = smtp_factory(temp_failures=10)
    started = time.monotonic()
    with pytest.raises(Exception, match="451"):
        await SmtpTransport(smtp_settings(smtp.port, retries=1)).send(MAIL)
    assert smtp.attempts == 2 and not smtp.messages
    assert time.monotonic() - started < 5


async def test_transport_connection_refused_is_retried_then_raised() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(Exception) as info:
        await SmtpTransport(smtp_settings(port, retries=1, timeout=2)).send(MAIL)
    assert "Connect" in type(info.value).__name__ or isinstance(info.value, OSError)


async def test_transport_starttls_with_self_signed_cert_and_auth(
    smtp_factory: Callable[..., SmtpSink], self_signed: tuple[Path, Path]
) -> None:
    cert, key = self_signed
    smtp = smtp_factory(tls_context=server_tls(cert, key), require_starttls=True, users={"mailer": "s3cret"})
    settings = smtp_settings(smtp.port, security="StartTls", username="mailer", password="s3cret",
                             ca_file=cert)
    assert await SmtpTransport(settings).send(MAIL) == 1
    (got,) = smtp.messages
    assert got.secure and got.login == "mailer"

    # Without trusting the certificate the handshake fails, and that is not retried into success.
    untrusted = smtp_settings(smtp.port, security="StartTls", username="mailer", password="s3cret", retries=0)
    with pytest.raises(Exception, match="(?i)certificate"):
        await SmtpTransport(untrusted).send(MAIL)
    # A wrong password is a permanent 535: no retries.
    wrong = smtp_settings(smtp.port, security="StartTls", username="mailer", password="nope", ca_file=cert,
                          retries=3, retry_delay=5)
    started = time.monotonic()
    with pytest.raises(PermanentMailError, match="535"):
        await SmtpTransport(wrong).send(MAIL)
    assert time.monotonic() - started < 4
    assert len(smtp.messages) == 1


async def test_transport_implicit_tls(
    smtp_factory: Callable[..., SmtpSink], self_signed: tuple[Path, Path]
) -> None:
    cert, key = self_signed
    smtp = smtp_factory(implicit_tls=server_tls(cert, key))
    assert await SmtpTransport(smtp_settings(smtp.port, security="Tls", ca_file=cert)).send(MAIL) == 1
    (got,) = smtp.messages
    assert got.secure and got.message["Subject"] == "Hello"


# ----------------------------------------------------------------------------- through the gateway
MAIL_SCRIPT = r"""
function onSendMail(mail)
  if mail.Subject == "drop me" then return true end
  if mail.Subject == "edit me" then
    mail.Subject = "edited by onSendMail"
    mail.To = "edited@example.org"
    mail.TextBody = mail.TextBody .. " + checked by onSendMail"
  end
  if mail.Subject == "break me" then mail.To = "broken address" end
  if mail.Subject == "redirect me" then
    -- handled here by sending another mail; that one does not come through onSendMail again
    SendMail({To = "redirected@example.org", Subject = "redirect me", TextBody = "was for " .. mail.To})
    return true
  end
  if string.find(mail.Subject, "[DicomProxy]", 1, true) then
    mail.HtmlBody = mail.HtmlBody .. "<p>footer from onSendMail</p>"
  end
  return false
end

local mails = {
  ["/test/mail/plain"] = {To = "script@example.org", Subject = "from a script",
                          TextBody = "hello", HtmlBody = "<p>hello</p>"},
  ["/test/mail/many"] = {From = "other@example.org", To = {"a@example.org", "b@example.org"},
                         Subject = "two recipients", TextBody = "x"},
  ["/test/mail/edit"] = {To = "script@example.org", Subject = "edit me", TextBody = "original"},
  ["/test/mail/drop"] = {To = "script@example.org", Subject = "drop me", TextBody = "x"},
  ["/test/mail/break"] = {To = "script@example.org", Subject = "break me", TextBody = "x"},
  ["/test/mail/redirect"] = {To = "script@example.org", Subject = "redirect me"},
  ["/test/mail/reject"] = {To = "reject@example.org", Subject = "refused by the server"},
  ["/test/mail/bad"] = {To = "not an address", Subject = "bad"},
  ["/test/mail/badfrom"] = {From = "a..b@example.org", To = "x@example.org"},
  ["/test/mail/intl"] = {To = "jö@bücher.de", Subject = "Grüße", TextBody = "für Sie"},
  ["/test/mail/edges"] = {To = {string.rep("a", 64) .. "@example.org", '"john..doe"@example.org', "ops@[10.0.0.5]"},
                          Subject = "at the RFC edges"},
  ["/test/mail/toolong"] = {To = string.rep("a", 65) .. "@example.org"},
  ["/test/mail/badsecond"] = {To = {"ok@example.org", "bad@@example.org"}},
  ["/test/mail/crlf"] = {To = "x@example.org\r\nBcc: victim@example.org"},
}

function onHttpRequest(req)
  local m = mails[req.Path]
  if m == nil then return false end
  local ok, err = pcall(SendMail, m)
  req:ResponseWrite(ok and "queued" or ("error: " .. tostring(err)))
  return true
end
"""


def mail_settings(smtp: SmtpSink, **smtp_over: Any) -> dict[str, Any]:
    return {
        "Smtp": {"Host": LOOPBACK, "Port": smtp.port, "From": "gateway@example.org", "Retries": 1,
                 "RetrySeconds": 0.2, "TimeoutSeconds": 5, **smtp_over},
        "Notifications": {"Email": [{"Events": ["script.failed", "upload.imported"],
                                     "To": ["ops@example.org"]}]},
    }


@pytest.fixture
def mail_gateway(gateway_factory: Callable[..., GatewayProcess], smtp: SmtpSink) -> GatewayProcess:
    return gateway_factory(mail_settings(smtp), {"main.lua": MAIL_SCRIPT})


def trigger(gateway: GatewayProcess, path: str) -> str:
    resp = gateway.get(path, timeout=10)
    assert resp.status_code == 200, (resp.status_code, resp.text, gateway.log_text()[-3000:])
    return resp.text


def mail_health(gateway: GatewayProcess) -> dict[str, Any]:
    resp = gateway.get("/dicomproxy/health")
    assert resp.status_code == 200, resp.text
    return resp.json()["mail"]


def feed(gateway: GatewayProcess) -> list[dict[str, Any]]:
    resp = gateway.get("/dicomproxy/notifications")
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_script_send_mail_arrives(mail_gateway: GatewayProcess, smtp: SmtpSink) -> None:
    assert trigger(mail_gateway, "/test/mail/plain") == "queued"
    (got,) = smtp.wait_for(1)
    assert got.sender == "gateway@example.org"  # Smtp:From, as the script gave none
    assert got.recipients == ["script@example.org"]
    assert got.message["From"] == "gateway@example.org" and got.message["To"] == "script@example.org"
    assert got.message["Subject"] == "from a script"
    assert got.text().strip() == "hello" and got.html().strip() == "<p>hello</p>"

    assert trigger(mail_gateway, "/test/mail/many") == "queued"
    got = smtp.wait_for(2)[1]
    assert got.sender == "other@example.org"
    assert got.recipients == ["a@example.org", "b@example.org"]


def test_on_send_mail_edits_are_sent(mail_gateway: GatewayProcess, smtp: SmtpSink) -> None:
    assert trigger(mail_gateway, "/test/mail/edit") == "queued"
    (got,) = smtp.wait_for(1)
    assert got.recipients == ["edited@example.org"]
    assert got.message["Subject"] == "edited by onSendMail"
    assert got.text().strip() == "original + checked by onSendMail"


def test_on_send_mail_returning_true_sends_nothing(mail_gateway: GatewayProcess, smtp: SmtpSink) -> None:
    assert trigger(mail_gateway, "/test/mail/drop") == "queued"
    # logged once onSendMail returned true: from then on that mail is done with
    mail_gateway.wait_for_log("mail to script@example.org handled by onSendMail; not sent")
    assert smtp.attempts == 0 and not smtp.messages
    # The gateway still sends others: the dropped one was not just slow.
    trigger(mail_gateway, "/test/mail/plain")
    (got,) = smtp.wait_for(1)
    assert got.message["Subject"] == "from a script"
    # counted once the server's reply is in, which is just after the mail arrived
    wait_until(lambda: mail_gateway.metric("dicomproxy_mails_total", outcome="sent") == 1, what="the mail counted")
    assert mail_gateway.metric("dicomproxy_mails_total", outcome="handled") == 1


def test_send_mail_inside_on_send_mail_does_not_loop(mail_gateway: GatewayProcess, smtp: SmtpSink) -> None:
    assert trigger(mail_gateway, "/test/mail/redirect") == "queued"
    (got,) = smtp.wait_for(1)
    assert got.recipients == ["redirected@example.org"]
    assert got.text().strip() == "was for script@example.org"
    # The redirected mail arrived, so onSendMail did not run for it (it would have returned true
    # and kept it). Once the original counts as handled, the hook has returned: every mail it
    # sent is the one that arrived, and a mail that skips the hook cannot make another.
    wait_until(lambda: mail_health(mail_gateway)["handled_by_script"] == 1 and mail_health(mail_gateway)["sent"] == 1,
               what="the original handled by onSendMail and the redirected one sent")
    assert len(smtp.messages) == 1


def test_invalid_address_is_a_clear_lua_error(mail_gateway: GatewayProcess, smtp: SmtpSink) -> None:
    text = trigger(mail_gateway, "/test/mail/bad")
    assert text.startswith("error: ")
    assert "SendMail: To: 'not an address' is not a valid email address" in text
    text = trigger(mail_gateway, "/test/mail/badfrom")
    assert "SendMail: From: 'a..b@example.org' is not a valid email address" in text
    assert "two periods in a row" in text
    # SendMail raised before queueing anything: a good mail sent afterwards is the only one there is
    trigger(mail_gateway, "/test/mail/plain")
    (got,) = smtp.wait_for(1)
    assert got.message["Subject"] == "from a script"
    health = wait_until(lambda: (h := mail_health(mail_gateway))["sent"] == 1 and h, what="the good mail counted")
    assert health["failed"] == 0 and health["handled_by_script"] == 0


def test_rfc_edges_through_the_real_mail_path(mail_gateway: GatewayProcess, smtp: SmtpSink) -> None:
    """A 64-octet local part, a quoted local part and a domain literal are delivered as given; one
    octet more, a bad second recipient or a header injection is a Lua error naming field and value."""
    text = trigger(mail_gateway, "/test/mail/toolong")
    assert text.startswith("error: SendMail: To: 'aaaa") and "is not a valid email address" in text
    assert "too long before the @-sign (1 character too many)" in text
    text = trigger(mail_gateway, "/test/mail/badsecond")
    assert text.startswith("error: SendMail: To[2]: 'bad@@example.org' is not a valid email address"), text
    text = trigger(mail_gateway, "/test/mail/crlf")
    assert text.startswith("error: SendMail: To: 'x@example.org\\r\\nBcc: victim@example.org' is not a valid"), text
    assert trigger(mail_gateway, "/test/mail/edges") == "queued"
    (got,) = smtp.wait_for(1)
    # aiosmtpd's RCPT parser (the stdlib's get_addr_spec) gives the quoted local part unquoted;
    # the header as it came shows what the gateway sent
    assert got.recipients == ["a" * 64 + "@example.org", "john..doe@example.org", "ops@[10.0.0.5]"]
    unfolded = got.raw.replace(b"\r\n ", b" ")
    assert f'\nTo: {"a" * 64}@example.org, "john..doe"@example.org, ops@[10.0.0.5]\r\n'.encode() in unfolded
    assert smtp.attempts == 1  # the refused ones never reached the server


def test_international_address_from_a_script(gateway_factory: Callable[..., GatewayProcess],
                                             smtp_factory: Callable[..., SmtpSink], mail_gateway: GatewayProcess,
                                             smtp: SmtpSink) -> None:
    utf8 = smtp_factory(smtputf8=True)
    gateway = gateway_factory(mail_settings(utf8), {"main.lua": MAIL_SCRIPT})
    assert trigger(gateway, "/test/mail/intl") == "queued"
    (got,) = utf8.wait_for(1)
    assert got.recipients == ["jö@bücher.de"]
    assert got.message["Subject"] == "Grüße" and got.text().strip() == "für Sie"
    # a server without SMTPUTF8: not sent, not retried, and the notification says why
    assert trigger(mail_gateway, "/test/mail/intl") == "queued"
    failed = wait_until(lambda: [n for n in feed(mail_gateway) if n["kind"] == "mail.failed"],
                        what="a mail.failed notification")
    assert "must offer SMTPUTF8" in failed[0]["body"] and "jö@bücher.de" in failed[0]["body"]
    assert smtp.attempts == 0 and "attempt 1 of" not in mail_gateway.log_text()


def test_undeliverable_mail_raises_a_notification(mail_gateway: GatewayProcess, smtp: SmtpSink) -> None:
    # an onSendMail edit that breaks the address: checked again, not sent, notified
    trigger(mail_gateway, "/test/mail/break")
    failed = wait_until(lambda: [n for n in feed(mail_gateway) if n["kind"] == "mail.failed"],
                        what="a mail.failed notification")
    assert "'broken address'" in failed[0]["body"] and "after onSendMail" in failed[0]["body"]
    # the server refuses the recipient (550): permanent, not retried, notified
    trigger(mail_gateway, "/test/mail/reject")
    failed = wait_until(lambda: [n for n in feed(mail_gateway) if n["kind"] == "mail.failed"
                                 and "550" in n["body"]], what="a mail.failed notification for the 550")
    assert "reject@example.org" in failed[0]["body"]
    assert not smtp.messages


def test_app_event_mail_for_a_script_that_fails_to_load(mail_gateway: GatewayProcess, smtp: SmtpSink) -> None:
    # A broken edit of main.lua: the gateway keeps the old script and emits script.failed,
    # which the Notifications:Email rule mails to ops@ (through the old script's onSendMail).
    mail_gateway.write_script("main.lua", MAIL_SCRIPT + "\nthis is not lua (\n")
    (got,) = smtp.wait_for(1, timeout=20)
    assert got.recipients == ["ops@example.org"]
    assert got.sender == "gateway@example.org"
    assert got.message["Subject"].startswith("[DicomProxy] ")
    assert "main.lua" in got.text() and "Event: script.failed" in got.text()
    assert "footer from onSendMail" in got.html()


def test_sending_never_blocks_the_request(gateway_factory: Callable[..., GatewayProcess]) -> None:
    dead = free_port()  # no SMTP server there: every attempt fails, with retries in between
    gateway = gateway_factory(
        {"Smtp": {"Host": LOOPBACK, "Port": dead, "Retries": 2, "RetrySeconds": 0.5, "TimeoutSeconds": 2}},
        {"main.lua": MAIL_SCRIPT},
    )
    started = time.monotonic()
    assert trigger(gateway, "/test/mail/plain") == "queued"
    assert time.monotonic() - started < 1.0
    failed = wait_until(lambda: [n for n in feed(gateway) if n["kind"] == "mail.failed"], timeout=20,
                        what="a mail.failed notification after the retries")
    assert "script@example.org" in failed[0]["body"]
    assert gateway.log_text().count("mail to script@example.org: attempt") == 2  # Retries: 2


def test_starttls_through_the_gateway(gateway_factory: Callable[..., GatewayProcess],
                                      smtp_factory: Callable[..., SmtpSink],
                                      self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    smtp = smtp_factory(tls_context=server_tls(cert, key), require_starttls=True, users={"mailer": "pw"})
    gateway = gateway_factory(
        mail_settings(smtp, Security="StartTls", CaFile=str(cert), Username="mailer", Password="pw"),
        {"main.lua": MAIL_SCRIPT},
    )
    trigger(gateway, "/test/mail/plain")
    (got,) = smtp.wait_for(1)
    assert got.secure and got.login == "mailer"


def test_bad_config_addresses_stop_the_start(gateway_factory: Callable[..., GatewayProcess],
                                             smtp: SmtpSink) -> None:
    settings = mail_settings(smtp)
    settings["Notifications"]["Email"][0]["To"] = ["ops@example.org", "ops at example.org"]
    gateway = gateway_factory(settings, start=False)
    with pytest.raises(pytest.fail.Exception) as info:
        gateway.start(timeout=20)
    assert "Notifications:Email:0:To[2]: 'ops at example.org' is not a valid email address" in str(info.value)


def test_app_event_mails_for_an_imported_upload_and_a_failed_forward(
    gateway_factory: Callable[..., GatewayProcess], smtp: SmtpSink, fresh_orthanc: Any, dicom_samples: Any,
    sample_dir: Path,
) -> None:
    from tusclient import client as tus_client

    from tests.peers import run_dcmtk

    settings = mail_settings(smtp)
    settings["Notifications"]["Email"] = [
        {"Events": ["upload.imported"], "To": ["uploads@example.org"]},
        {"Events": ["*.failed"], "To": ["ops@example.org", "uploads@example.org"]},
    ]
    # The DICOM side stores and forwards to Orthanc, which refuses an instance without a Series Instance
    # UID (0xA700); one attempt, then failed/ and forward.failed. (A PACS that cannot be reached at all
    # fails no instance: forwarding waits for it.)
    settings["Dicom"] = {"StoreMode": "StoreAndForward", "ForwardMaxAttempts": 1, "ForwardRetrySeconds": 0.1}
    gateway = gateway_factory(settings, {"main.lua": MAIL_SCRIPT}, orthanc=fresh_orthanc)

    path, _ = dicom_samples.make_instance(sample_dir / "up.dcm", patient_id="MAIL1", patient_name="Mail^Test")
    tus_client.TusClient(gateway.url + "/files/").uploader(str(path), metadata={"filename": "up.dcm"}).upload()
    (got,) = smtp.wait_for(1, timeout=30)
    assert got.recipients == ["uploads@example.org"]
    assert got.message["Subject"] == "[DicomProxy] Upload imported: up.dcm"
    assert "Event: upload.imported" in got.text()

    refused = dicom_samples.build_dataset(patient_id="MAIL2", patient_name="Mail^Test")
    del refused.SeriesInstanceUID
    refused.save_as(sample_dir / "refused.dcm", enforce_file_format=True)
    run_dcmtk("storescu", "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port), str(sample_dir / "refused.dcm"))
    got = smtp.wait_for(2, timeout=30)[1]
    assert got.recipients == ["ops@example.org", "uploads@example.org"]  # one mail, rules merged
    assert got.message["Subject"].startswith("[DicomProxy] Forwarding failed")
    assert "Event: forward.failed" in got.text()
