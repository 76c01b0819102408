"""Mail: the ``Smtp`` transport, ``SendMail`` for scripts, and ``Notifications:Email`` rules.

Every mail, whether a script asked for it or an app event matched a rule, takes one path:

1. its fields are checked (``From``/``To`` are the Lua API's *Email* type: an RFC 5322
   ``addr-spec``, international (RFC 6531) and IDNA ones included, checked by email-validator),
   so a typo fails where it was made, with the field, the value and the reason named;
2. ``onSendMail(mail)`` runs (singleton, then transient engine); returning ``true`` means the
   script took care of it and nothing is sent; edits to the table are taken and checked again;
3. it is handed to a background task that talks SMTP (aiosmtplib) and retries transient
   failures. A mail that cannot be sent is logged and raises a ``mail.failed`` app event, which
   the notification feed shows. Nothing here ever makes a request or a script wait for SMTP.

A mail sent from inside ``onSendMail`` does not run ``onSendMail`` again: a script that
redirects mail by sending a different one must not loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import fnmatch
import html
import logging
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any, NamedTuple

import aiosmtplib
from dicomproxy_middleware import LuaExportError
from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError
from email_validator import validate_email as _library_validate
from lupa import lua_type

from dicomproxy.config.settings import ConfigError, Settings, SmtpSettings
from dicomproxy.host import Host
from dicomproxy.metrics import Counter
from dicomproxy.notify.events import EVENT_KINDS, AppEvent, EventBus, create_task_threadsafe

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- Email type
# email-validator checks the syntax (RFC 5322 dot-atom / quoted-string local parts, RFC 6531
# international local parts, IDNA 2008 domains, domain literals) and the RFC 5321 / 3696 length
# limits: 64 octets before the @ (strict), 254 in all, 63 per domain label. A CR or LF (header
# injection) is refused like any other invalid character. Deliverability (DNS) is never
# checked: the gateway often runs where the mail relay is the only name it can resolve.
_VALIDATOR_OPTIONS: dict[str, Any] = {
    "check_deliverability": False,
    "globally_deliverable": False,  # intranet relays: single-label domains such as "pacs"
    "allow_smtputf8": True,
    "allow_quoted_local": True,
    "allow_domain_literal": True,
    "allow_display_name": False,  # the Lua API's Email is an addr-spec, as before
    "strict": True,
}

MAIL_FIELDS = ("From", "To", "Subject", "TextBody", "HtmlBody")


def to_python(value: Any) -> Any:
    """A lupa table (if the host hands one over unconverted) as a dict, or a list for 1..n."""
    if lua_type(value) != "table":
        return value
    items = {k: to_python(v) for k, v in value.items()}
    if items and all(isinstance(k, int) for k in items) and sorted(items) == list(range(1, len(items) + 1)):
        return [items[k] for k in range(1, len(items) + 1)]
    return items


class MailError(ValueError):
    """A mail that cannot be sent as given; the message names the field, the value and why."""


class _Checked(NamedTuple):
    normalized: str  # what scripts and logs see
    wire: str  # what SMTP is given: the ASCII (IDNA) form when there is one


def _special_use_suffix(domain: str) -> str | None:
    lowered = domain.lower()
    for name in SPECIAL_USE_DOMAIN_NAMES:
        if lowered == name or lowered.endswith("." + name):
            return name
    return None


def _check(address: str) -> _Checked:
    """email-validator's verdict on ``address``, or :class:`EmailNotValidError`.

    The library refuses the special-use names of RFC 6761/6762 (``localhost``, ``.local``,
    ``.test``, ...) whatever the options, through a module-level list that only a global edit
    could change. Hospital intranets use exactly those (the default ``Smtp:From`` is
    ``dicomproxy@localhost``), so such an address is checked with that suffix replaced by as many
    ``x`` (same length, so the limits hold; the suffixes are plain ASCII labels) and given back.
    """
    local, at, domain = address.rpartition("@")
    special = _special_use_suffix(domain) if at else None
    probe = address if special is None else f"{local}@{domain[: -len(special)]}{'x' * len(special)}"
    result = _library_validate(probe, **_VALIDATOR_OPTIONS)
    normalized: str = result.normalized
    wire: str = result.ascii_email or normalized
    if special is not None:
        normalized = normalized[: -len(special)] + special
        wire = wire[: -len(special)] + special
    return _Checked(normalized, wire)


def validate_email(value: Any, field: str) -> str:
    """Return ``value`` as a valid address (email-validator's normalized form: the domain in
    lower case, Unicode in NFC, quotes dropped where the local part does not need them), or
    raise :class:`MailError` naming ``field``, the value and the library's reason.

    Surrounding white space is dropped (a trailing space from a config file is not a typo
    worth failing on).
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        raise MailError(f"{field}: expected an email address (a string), got {value!r}")
    try:
        return _check(value.strip(" \t")).normalized
    except EmailNotValidError as e:
        raise MailError(f"{field}: {value!r} is not a valid email address (local@domain): {e}") from None


def wire_address(address: str) -> str:
    """A validated address as SMTP gets it (envelope and headers): an IDNA domain in ASCII, so
    no SMTPUTF8 is needed for it; an international local part as it is (that needs SMTPUTF8)."""
    return _check(address).wire


def validate_recipients(value: Any, field: str) -> tuple[str, ...]:
    """One address (a string) or several (a Lua array / list); each one validated."""
    if isinstance(value, str | bytes):
        items: list[Any] = [value]
    elif isinstance(value, list | tuple):
        items = list(value)
    elif isinstance(value, Mapping) and all(isinstance(k, int) for k in value):
        items = [value[k] for k in sorted(value)]
    else:
        raise MailError(f"{field}: expected an email address or an array of them, got {value!r}")
    if not items:
        raise MailError(f"{field}: at least one recipient is needed, got an empty list")
    many = len(items) > 1
    return tuple(validate_email(v, f"{field}[{i}]" if many else field) for i, v in enumerate(items, 1))


def _text(value: Any, field: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise MailError(f"{field}: expected a string, got {value!r}")
    return str(value)


# ----------------------------------------------------------------------------- Mail
@dataclass(frozen=True)
class Mail:
    """A validated mail. ``to_lua()``/``parse_mail`` convert from and to the Lua table."""

    sender: str
    to: tuple[str, ...]
    subject: str = ""
    text_body: str = ""
    html_body: str = ""

    def to_lua(self) -> dict[str, Any]:
        """The seed's mail table: ``To`` is a string for one recipient, an array for several."""
        return {
            "From": self.sender,
            "To": self.to[0] if len(self.to) == 1 else list(self.to),
            "Subject": self.subject,
            "TextBody": self.text_body,
            "HtmlBody": self.html_body,
        }

    def to_message(self) -> EmailMessage:
        msg = EmailMessage()
        sender = wire_address(self.sender)
        msg["From"] = sender
        msg["To"] = ", ".join(wire_address(a) for a in self.to)
        msg["Subject"] = self.subject
        msg["Date"] = formatdate(localtime=True)
        domain = sender.rpartition("@")[2]
        # make_msgid() without a domain resolves the host's FQDN, a blocking DNS lookup.
        msg["Message-ID"] = make_msgid(domain=domain if domain.isascii() and not domain.startswith("[")
                                       else "dicomproxy.invalid")
        if self.text_body or not self.html_body:
            msg.set_content(self.text_body)
            if self.html_body:
                msg.add_alternative(self.html_body, subtype="html")
        else:
            msg.set_content(self.html_body, subtype="html")
        return msg


def parse_mail(obj: Any, default_sender: str, where: str = "mail") -> Mail:
    """Check a mail table (from Lua or built here). ``From`` defaults to ``Smtp:From``.

    Field names are matched case-insensitively; an unknown field is an error rather than
    silently dropped text (``Body`` instead of ``TextBody`` would otherwise send an empty mail).
    """
    obj = to_python(obj)
    if not isinstance(obj, Mapping):
        raise MailError(f"{where}: expected a table with {', '.join(MAIL_FIELDS)}, got {obj!r}")
    fields: dict[str, Any] = {}
    for key, value in obj.items():
        name = next((f for f in MAIL_FIELDS if isinstance(key, str) and f.lower() == key.lower()), None)
        if name is None:
            raise MailError(f"{where}: unknown field {key!r} (expected {', '.join(MAIL_FIELDS)})")
        fields[name] = value
    sender = fields.get("From")
    if sender is None or sender == "":
        sender = default_sender
    if fields.get("To") in (None, ""):
        raise MailError(f"{where}: To: a recipient address is required")
    subject = _text(fields.get("Subject"), f"{where}: Subject")
    return Mail(
        sender=validate_email(sender, f"{where}: From"),
        to=validate_recipients(fields["To"], f"{where}: To"),
        # A line break in Subject would be a header injection; folding it is what mailers do.
        subject=" ".join(subject.splitlines()),
        text_body=_text(fields.get("TextBody"), f"{where}: TextBody"),
        html_body=_text(fields.get("HtmlBody"), f"{where}: HtmlBody"),
    )


# ----------------------------------------------------------------------------- transport
class PermanentMailError(Exception):
    """The server refused the mail for good (5xx): retrying would only repeat the refusal."""


def _tls_context(smtp: SmtpSettings) -> ssl.SSLContext | None:
    if smtp.security == "None":
        return None
    return ssl.create_default_context(cafile=str(smtp.ca_file) if smtp.ca_file else None)


class SmtpTransport:
    """Sends one :class:`Mail` over SMTP, retrying what may succeed on a later attempt.

    Retried: connection failures, time-outs and 4xx answers. Not retried: 5xx answers (bad
    recipient, authentication refused), which raise :class:`PermanentMailError`.
    """

    def __init__(self, smtp: SmtpSettings, max_connections: int = 4) -> None:
        self.smtp = smtp
        self._tls = _tls_context(smtp)
        self._slots = asyncio.Semaphore(max_connections)

    async def send_once(self, mail: Mail) -> None:
        smtp = self.smtp
        async with self._slots:
            _, reply = await aiosmtplib.send(
                mail.to_message(),
                sender=wire_address(mail.sender),
                recipients=[wire_address(a) for a in mail.to],
                hostname=smtp.host,
                port=smtp.port,
                username=smtp.username or None,
                password=smtp.password or None,
                use_tls=smtp.security == "Tls",
                # None would let aiosmtplib upgrade on its own; "None" means plain text.
                start_tls=smtp.security == "StartTls",
                tls_context=self._tls,
                timeout=smtp.timeout,
            )
        log.debug("mail to %s accepted: %s", ", ".join(mail.to), reply)

    async def send(self, mail: Mail) -> int:
        """Deliver with retries; returns the number of attempts it took."""
        attempts = 1 + max(0, self.smtp.retries)
        delay = self.smtp.retry_delay
        for attempt in range(1, attempts + 1):
            try:
                await self.send_once(mail)
                return attempt
            except aiosmtplib.SMTPRecipientsRefused as e:
                codes = [r.code for r in e.recipients]
                if all(500 <= c < 600 for c in codes):
                    raise PermanentMailError(f"all recipients refused: {e.recipients}") from e
                error: Exception = e
            except aiosmtplib.SMTPNotSupported as e:  # the server will not learn it on a retry
                raise PermanentMailError(
                    f"{e}: an address is international (non-ASCII before the @); the mail server at "
                    f"Smtp:Host must offer SMTPUTF8 (RFC 6531), or use an ASCII address") from e
            except aiosmtplib.SMTPResponseException as e:
                if 500 <= e.code < 600:
                    raise PermanentMailError(f"{e.code} {e.message}") from e
                error = e
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
                error = e
            if attempt == attempts:
                raise error
            wait = min(delay * 2 ** (attempt - 1), 300.0)
            log.warning("mail to %s: attempt %d of %d failed (%s); retrying in %.1fs",
                        ", ".join(mail.to), attempt, attempts, _describe(error), wait)
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if isinstance(error, PermanentMailError) else f"{type(error).__name__}: {text}"


# ----------------------------------------------------------------------------- Mailer
# Set while onSendMail runs: a SendMail from inside the hook skips the hook (no recursion).
_IN_SEND_HOOK: contextvars.ContextVar[bool] = contextvars.ContextVar("in_onSendMail", default=False)


class Mailer:
    """Runs ``onSendMail`` and hands mails to background delivery. A gateway component."""

    STOP_GRACE_SECONDS = 5.0

    def __init__(self, settings: Settings, host: Any, bus: EventBus, counter: Counter | None = None) -> None:
        self.settings = settings
        self.smtp = settings.smtp
        self.host = host
        self.bus = bus
        self.transport = SmtpTransport(settings.smtp)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.counter = counter  # dicomproxy_mails_total{outcome=sent|failed|handled}
        self.sent = 0
        self.failed = 0
        self.handled = 0

    @property
    def enabled(self) -> bool:
        return bool(self.smtp.host)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if not self.enabled and self.settings.notifications.email:
            log.warning("Notifications:Email has rules but Smtp:Host is empty: no mail will be sent "
                        "(set Smtp:Host in appsettings.json)")

    async def stop(self) -> None:
        """Give mails in flight a moment to leave, then cancel the rest."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.STOP_GRACE_SECONDS)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("%d mail(s) still being sent at shutdown were abandoned", len(pending))
                await asyncio.gather(*pending, return_exceptions=True)

    async def run_hook(self, mail: Mail, where: str) -> Mail | None:
        """``onSendMail``: ``None`` if a script handled the mail, else the (edited) mail."""
        if _IN_SEND_HOOK.get() or not self.host.defines("onSendMail"):
            return mail
        token = _IN_SEND_HOOK.set(True)
        try:
            result = await self.host.dispatch("onSendMail", mail.to_lua())
        finally:
            _IN_SEND_HOOK.reset(token)
        if result.handled:
            return None
        edited = result.args[0] if result.args else mail.to_lua()
        return parse_mail(edited, self.smtp.sender, f"{where} (after onSendMail)")

    def submit(self, mail: Mail, where: str) -> None:
        """Run the hook and deliver in the background. Callable from any thread: app events
        from the DICOM side are emitted on pynetdicom's threads, but Lua runs on the loop."""
        loop = self._loop
        if loop is None:  # an event during start-up, before start() ran: we are on the loop
            try:
                loop = self._loop = asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError("the mailer is not started (gateway.add_component runs start())") from None
        create_task_threadsafe(loop, self._process(mail, where), self._tasks)

    async def _process(self, mail: Mail, where: str) -> bool:
        try:
            final = await self.run_hook(mail, where)
        except MailError as e:
            self._fail(mail, where, str(e))
            return False
        except Exception as e:  # a script error: the mail may have been meant to be redacted
            if not self.settings.lua.fail_open:
                self._fail(mail, where, f"onSendMail failed: {e}")
                return False
            log.error("%s: onSendMail failed (%s); sending the mail unedited (Lua:FailOpen)", where, e)
            final = mail
        if final is None:
            self.handled += 1
            self._count("handled")
            log.info("%s: mail to %s handled by onSendMail; not sent", where, ", ".join(mail.to))
            return False
        if not self.enabled:
            self._fail(final, where, "Smtp:Host is not set in appsettings.json")
            return False
        try:
            attempts = await self.transport.send(final)
        except Exception as e:
            self._fail(final, where, _describe(e))
            return False
        self.sent += 1
        self._count("sent")
        log.info("%s: mail %r sent to %s (%d attempt(s))",
                 where, final.subject, ", ".join(final.to), attempts)
        return True

    def _count(self, outcome: str) -> None:
        if self.counter is not None:
            self.counter.inc(outcome=outcome)

    def _fail(self, mail: Mail, where: str, reason: str) -> None:
        self.failed += 1
        self._count("failed")
        log.error("%s: mail %r to %s not sent: %s", where, mail.subject, ", ".join(mail.to), reason)
        self.bus.emit(
            "mail.failed",
            "Mail not sent",
            f"{mail.subject!r} to {', '.join(mail.to)}: {reason}",
            "",
            subject=mail.subject,
            to=list(mail.to),
            reason=reason,
        )

    # -- the Lua export ----------------------------------------------------------------
    def lua_send_mail(self, mail: Any) -> bool:
        """``SendMail(mail)``: check now (a bad address is a Lua error naming the field), send later.

        Returns ``true`` once the mail is queued; whether ``onSendMail`` handled it or SMTP
        accepted it is logged (and a failure raises a notification), because waiting for an
        SMTP server would stall the script and the request it serves.
        """
        try:
            parsed = parse_mail(mail, self.smtp.sender, "SendMail")
        except MailError as e:  # the runtime prefixes the export's name itself
            raise LuaExportError(str(e).removeprefix("SendMail: ")) from None
        self.submit(parsed, "SendMail")
        return True


# ----------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class MailRule:
    patterns: tuple[str, ...]
    to: tuple[str, ...]

    def matches(self, kind: str) -> bool:
        return any(fnmatch.fnmatchcase(kind.lower(), p.lower()) for p in self.patterns)


def load_rules(settings: Settings) -> tuple[MailRule, ...]:
    """``Notifications:Email`` with every address checked now, so a typo stops the start-up."""
    rules = []
    source = settings.tree.source
    for i, rule in enumerate(settings.notifications.email):
        try:
            to = validate_recipients(list(rule.to), f"Notifications:Email:{i}:To")
        except MailError as e:
            raise ConfigError(f"{source}: {e}") from None
        for pattern in rule.events:
            if not any(fnmatch.fnmatchcase(k, pattern.lower()) for k in EVENT_KINDS):
                log.warning("Notifications:Email:%d: event %r matches no known event (known: %s)",
                            i, pattern, ", ".join(EVENT_KINDS))
        rules.append(MailRule(tuple(rule.events), to))
    return tuple(rules)


def event_mail(event: AppEvent, sender: str, to: Iterable[str]) -> Mail:
    """The mail an app event becomes: plain text and a small HTML version of the same."""
    lines = [event.title]
    if event.body:
        lines += ["", event.body]
    if event.link:
        lines += ["", f"Link: {event.link}"]
    lines += ["", f"Event: {event.kind}", "-- ", "DicomProxy"]
    parts = [f"<h3>{html.escape(event.title)}</h3>"]
    if event.body:
        parts.append(f"<p>{html.escape(event.body).replace(chr(10), '<br>')}</p>")
    if event.link:
        parts.append(f'<p><a href="{html.escape(event.link, quote=True)}">{html.escape(event.link)}</a></p>')
    parts.append(f'<p style="color:#666">Event: {html.escape(event.kind)} &middot; DicomProxy</p>')
    return Mail(
        sender=sender,
        to=tuple(to),
        subject=" ".join(f"[DicomProxy] {event.title}".splitlines()),
        text_body="\n".join(lines) + "\n",
        html_body="\n".join(parts),
    )


class EventMailer:
    """Bus listener: an app event that matches ``Notifications:Email`` rules becomes one mail
    to the union of their recipients. ``mail.failed`` never mails (it would feed on itself)."""

    def __init__(self, mailer: Mailer, rules: tuple[MailRule, ...]) -> None:
        self.mailer = mailer
        self.rules = rules

    def __call__(self, event: AppEvent) -> None:
        if event.kind == "mail.failed" or not self.rules:
            return
        to: list[str] = []
        for rule in self.rules:
            if rule.matches(event.kind):
                to += [a for a in rule.to if a not in to]
        if to:
            self.mailer.submit(event_mail(event, self.mailer.smtp.sender, to), f"event {event.kind}")


# ----------------------------------------------------------------------------- install
def install(gateway: Host) -> Mailer:
    """``SendMail`` in every engine, and mail for the app events ``Notifications:Email`` names."""
    settings = gateway.settings
    try:
        validate_email(settings.smtp.sender, "Smtp:From")
    except MailError as e:
        raise ConfigError(f"{settings.tree.source}: {e}") from None
    rules = load_rules(settings)
    counter = gateway.metrics.counter("dicomproxy_mails_total", "Mails by outcome: sent, failed, handled by onSendMail",
                                      labels=("outcome",))
    mailer = Mailer(settings, gateway.lua, gateway.bus, counter)
    gateway.add_component(mailer)
    if gateway.worker.owner:  # Server:Workers: a rule mails once, from worker 0 (SendMail works in every worker)
        gateway.bus.subscribe(EventMailer(mailer, rules))
    gateway.lua.add_export("SendMail", mailer.lua_send_mail)
    gateway.add_health("mail", lambda: {
        "ok": True,
        "enabled": mailer.enabled,
        "sent": mailer.sent,
        "failed": mailer.failed,
        "handled_by_script": mailer.handled,
    })
    return mailer
