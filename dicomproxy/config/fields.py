"""How a key is declared: :func:`key` (name, default, description, secret) and the value kinds.

A value kind (:class:`Kind` and its subclasses) is one object that knows three things about a
key's value: how to read it from JSON *or* from a string (environment variables and the command
line only give strings), the one-line ``expected ..., got ...`` message when it cannot, and the
type the README's table shows. Putting the three in one place is what keeps the messages the
users already know (``Lua:TimeoutMs: expected an integer, got 'fast'``) while pydantic does the
structure: sections, maps, lists, defaults, immutability.

The kinds are pydantic plain validators (``__get_pydantic_core_schema__``): pydantic's own lax
coercion accepts ``True`` for a number and words its errors for programmers
(``Input should be a valid integer, unable to parse string as an integer``), so each kind parses
by itself. A kind reads the folder relative paths resolve against (``ConfigRoot``) from the
validation context (``{"root": Path}``); without one (a section built directly in a test) the
working directory is used.

:class:`Section` is the base of every section model: frozen, unknown fields forbidden,
constructible by attribute name (``TusSettings(base_path=...)``) as well as by key.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar, NamedTuple
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, ValidationInfo
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError, PydanticUndefined, core_schema

REQUIRED: Any = PydanticUndefined
MASK = "***"
VALUE_ERROR = "config_value"


class Problem(ValueError):
    """A value a kind cannot read: what was expected, and the value (kept apart: a secret's is never shown)."""

    def __init__(self, expected: str, value: Any) -> None:
        super().__init__(f"expected {expected}, got {shown(value)}")
        self.expected, self.value = expected, value


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


class Kind:
    """A value kind: parse(), the noun of its messages and the README's type."""

    noun = "a value"

    @property
    def type_name(self) -> str:
        """The README's type column: the noun without its article."""
        return re.sub(r"^(an?|one of) ", "", self.noun) if not self.noun.startswith("one of") else self.noun

    def parse(self, value: Any, root: Path) -> Any:
        raise NotImplementedError

    def fail(self, value: Any) -> Problem:
        return Problem(self.noun, value)

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.with_info_plain_validator_function(self._validate)

    def _validate(self, value: Any, info: ValidationInfo) -> Any:
        context = info.context if isinstance(info.context, dict) else {}
        root = context.get("root")
        try:
            return self.parse(value, root if isinstance(root, Path) else Path.cwd())
        except Problem as e:
            raise PydanticCustomError(VALUE_ERROR, "expected {expected}, got {got}",
                                      {"expected": e.expected, "got": shown(e.value)}) from None


class Text(Kind):
    """A string (numbers are taken as their text); ``nonempty``: blank is refused."""

    def __init__(self, nonempty: bool = False) -> None:
        self.nonempty = nonempty
        self.noun = "a non-empty string" if nonempty else "a string"

    def parse(self, value: Any, root: Path) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.fail(value)
        if self.nonempty and not str(value).strip():
            raise self.fail(value)
        return str(value)


class Whole(Kind):
    """An integer, from a number or a string of digits; ``minimum`` inclusive."""

    def __init__(self, minimum: int | None = None, maximum: int | None = None) -> None:
        self.minimum, self.maximum = minimum, maximum
        self.noun = ("an integer" if minimum is None else f"an integer >= {minimum}" if maximum is None
                     else f"an integer from {minimum} to {maximum}")

    def parse(self, value: Any, root: Path) -> int:
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise Problem("an integer", value)
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            raise self.fail(value)
        return value


class WorkerCount(Kind):
    """How many HTTP worker processes: a whole number from 1, or ``auto`` (one per core,
    ``os.cpu_count()``), resolved when the configuration is read."""

    noun = "a whole number >= 1, or auto (one per core)"

    @property
    def type_name(self) -> str:
        return "integer or auto"

    def parse(self, value: Any, root: Path) -> int:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return max(1, os.cpu_count() or 1)
        try:
            return Whole(1, 256).parse(value, root)
        except Problem:
            raise self.fail(value) from None


class Number(Kind):
    """A number of any kind; ``minimum`` inclusive, ``above`` exclusive."""

    def __init__(self, minimum: float | None = None, above: float | None = None) -> None:
        self.minimum, self.above = minimum, above
        self.noun = ("a number" if minimum is None and above is None
                     else f"a number >= {minimum:g}" if minimum is not None else f"a number > {above:g}")

    def parse(self, value: Any, root: Path) -> float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise Problem("a number", value) from None
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise Problem("a number", value)
        if (self.minimum is not None and value < self.minimum) or (self.above is not None and value <= self.above):
            raise self.fail(value)
        return float(value)


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


class Flag(Kind):
    noun = "true or false"

    @property
    def type_name(self) -> str:
        return "boolean"

    def parse(self, value: Any, root: Path) -> bool:
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        if not isinstance(value, bool):
            raise self.fail(value)
        return value


class Choice(Kind):
    """One of fixed words, matched case-insensitively; the declared spelling is the value."""

    def __init__(self, *options: str) -> None:
        self.options = options
        self.noun = "one of " + ", ".join(options)

    def parse(self, value: Any, root: Path) -> str:
        text = Text().parse(value, root) if not isinstance(value, bool) else None
        for option in self.options:
            if text is not None and option.lower() == text.strip().lower():
                return option
        raise self.fail(value)


class Duration(Kind):
    """Seconds: a number, or an ASP.NET TimeSpan ``[d.]hh:mm:ss[.fff]``."""

    noun = "seconds or a time span like 1.00:00:00"

    @property
    def type_name(self) -> str:
        return "seconds or d.hh:mm:ss"

    def parse(self, value: Any, root: Path) -> float:
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            return float(value)
        if isinstance(value, str):
            m = re.fullmatch(r"\s*(?:(\d+)\.)?(\d+):(\d\d):(\d\d(?:\.\d+)?)\s*", value)
            if m:
                d, h, mi, s = m.groups()
                return int(d or 0) * 86400 + int(h) * 3600 + int(mi) * 60 + float(s)
            try:
                seconds = float(value)
            except ValueError:
                raise self.fail(value) from None
            if seconds >= 0:
                return seconds
        raise self.fail(value)


def resolve_path(value: str | Path, root: Path) -> Path:
    """``~`` expanded; a relative path is relative to ``root`` (ConfigRoot)."""
    p = Path(os.path.expanduser(str(value)))
    return p if p.is_absolute() else (root / p).resolve()


class FsPath(Kind):
    """A file or folder; relative to ConfigRoot. ``optional``: an empty string means none."""

    def __init__(self, optional: bool = False) -> None:
        self.optional = optional
        self.noun = "a path"

    @property
    def type_name(self) -> str:
        return "path (or empty)" if self.optional else "path"

    def parse(self, value: Any, root: Path) -> Path | None:
        if isinstance(value, Path):
            return resolve_path(value, root)
        text = Text().parse(value, root) if not isinstance(value, bool) and value is not None else None
        if text is None or (not text.strip() and not self.optional):
            raise self.fail(value)
        return resolve_path(text.strip(), root) if text.strip() else None


def mask_userinfo(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part masked (``http://orthanc:***@pacs``)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or "/" in userinfo:
        return url
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}{':' + MASK if colon else ''}@{host}"


class HttpUrl(Kind):
    """An absolute http(s) URL; the trailing slash is dropped. A password in it is masked wherever it
    is shown (:func:`mask_userinfo`: messages here, the public view)."""

    noun = "an http(s) URL"

    def fail(self, value: Any) -> Problem:
        return Problem(self.noun, mask_userinfo(value) if isinstance(value, str) else value)

    @property
    def type_name(self) -> str:
        return "URL"

    def parse(self, value: Any, root: Path) -> str:
        text = Text().parse(value, root) if isinstance(value, str) else None
        parts = urlsplit(text.strip()) if text is not None else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.fail(value)
        return text.strip().rstrip("/") if text is not None else ""


class SyslogUrl(Kind):
    """An audit collector: ``tls://HOST:PORT`` (RFC 5425) or ``udp://HOST:PORT`` (RFC 5426)."""

    noun = "tls://HOST:PORT or udp://HOST:PORT"

    @property
    def type_name(self) -> str:
        return "URL"

    def parse(self, value: Any, root: Path) -> str:
        text = value.strip() if isinstance(value, str) else ""
        try:
            parts = urlsplit(text)
            ok = parts.scheme in ("tls", "udp") and bool(parts.hostname) and parts.path in ("", "/")
            ok = ok and (parts.port is None or parts.port > 0)
        except ValueError:
            ok = False
        if not ok:
            raise self.fail(value)
        return text.rstrip("/")


class Endpoint(NamedTuple):
    """One entry of ``Urls``: the scheme (``http`` or ``https``), the address to bind and the port."""

    scheme: str
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


DEFAULT_PORTS = {"http": 80, "https": 443}


class Listen(Kind):
    """``Urls``: ``http://HOST:PORT`` or ``https://HOST:PORT``, several separated by ``;`` (ASP.NET's
    form; ``*`` and ``+`` mean every interface). Each entry is checked; the same address twice is refused."""

    noun = "http(s)://HOST:PORT"

    @property
    def type_name(self) -> str:
        return "URLs"

    def parse(self, value: Any, root: Path) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(value)
        seen: set[tuple[str, int]] = set()
        for entry in value.split(";"):
            if not entry.strip():
                continue
            endpoint = self.endpoint(entry)
            if (endpoint.host, endpoint.port) in seen:
                raise Problem(f"each address once ({endpoint.host}:{endpoint.port} is listed twice)", value)
            seen.add((endpoint.host, endpoint.port))
        return ";".join(e.strip() for e in value.split(";") if e.strip())

    def endpoint(self, entry: str) -> Endpoint:
        """One entry as an :class:`Endpoint`; raises :class:`Problem` naming the entry."""
        try:
            parts = urlsplit(entry.strip())
            port = parts.port
        except ValueError:
            raise self.fail(entry.strip()) from None
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/") or port == 0:
            raise self.fail(entry.strip())
        if parts.query or parts.fragment or parts.username or parts.password:
            raise self.fail(entry.strip())
        host = "0.0.0.0" if parts.hostname in ("*", "+") else parts.hostname
        return Endpoint(parts.scheme, host, port or DEFAULT_PORTS[parts.scheme])

    def endpoints(self, value: str) -> tuple[Endpoint, ...]:
        return tuple(self.endpoint(e) for e in value.split(";") if e.strip())


class UrlPath(Kind):
    """A URL path, normalised to one leading slash (and one trailing slash with ``folder``)."""

    def __init__(self, folder: bool = False) -> None:
        self.folder = folder
        self.noun = "a URL path like /files/" if folder else "a URL path like /dicom-web"

    @property
    def type_name(self) -> str:
        return "URL path"

    def parse(self, value: Any, root: Path) -> str:
        text = Text().parse(value, root)
        if any(c in text for c in "?#\\ ") or "//" in text.strip("/"):
            raise self.fail(value)
        inner = text.strip("/")
        return "/" + inner + ("/" if self.folder and inner else "")


class AeTitle(Kind):
    """A DICOM AE title: 1-16 characters, no backslash or control characters (PS3.5 AE)."""

    noun = "an AE title (1-16 characters, no backslash)"

    @property
    def type_name(self) -> str:
        return "AE title"

    def parse(self, value: Any, root: Path) -> str:
        text = value.strip() if isinstance(value, str) else ""
        if not 1 <= len(text) <= 16 or "\\" in text or any(ord(c) < 32 or ord(c) > 126 for c in text):
            raise self.fail(value)
        return text


class Cidr(Kind):
    """An IPv4 or IPv6 address or network (``10.0.0.0/8``, ``2001:db8::/32``, ``192.168.1.7``)."""

    noun = "an IP address or CIDR network (10.0.0.0/8, 2001:db8::/32)"

    @property
    def type_name(self) -> str:
        return "CIDR"

    def parse(self, value: Any, root: Path) -> str:
        text = value.strip() if isinstance(value, str) else ""
        try:
            return str(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise self.fail(value) from None


def as_list(value: Any) -> list[Any] | None:
    """A JSON array, a JSON array in a string, ``a,b,c``, or ASP.NET's index keys ``{"0": a, "1": b}``."""
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, dict) and value and all(isinstance(k, str) and k.isdigit() for k in value):
        return [value[k] for k in sorted(value, key=int)]
    if isinstance(value, str):
        if value.strip().startswith("["):
            try:
                parsed = json.loads(value)
            except ValueError:
                return None
            return parsed if isinstance(parsed, list) else None
        return [v.strip() for v in value.split(",") if v.strip()]
    return None


class Names(Kind):
    """A list of words (each checked by ``item``), as a tuple."""

    def __init__(self, item: Kind | None = None, nonempty: bool = False, upper: bool = False) -> None:
        self.item = item or Text(nonempty=True)
        self.nonempty, self.upper = nonempty, upper
        words = re.sub(r"^an? (non-empty )?", "", self.item.noun).split(" (")[0] + "s"
        self.noun = ("a non-empty list of " if nonempty else "a list of ") + words

    @property
    def type_name(self) -> str:
        return re.sub(r"^an? ", "", self.noun)

    def parse(self, value: Any, root: Path) -> tuple[str, ...]:
        items = as_list(value)
        if items is None or (self.nonempty and not items):
            raise self.fail(value)
        try:
            parsed = tuple(self.item.parse(v, root) for v in items)
        except Problem:
            raise self.fail(value) from None
        return tuple(v.upper() for v in parsed) if self.upper else parsed


class FlagOrNames(Kind):
    """``true``/``false``, or a list of names (``Lua:FailOpen``: which callbacks fail open)."""

    noun = "true or false (or a list of callback names)"

    @property
    def type_name(self) -> str:
        return "boolean or list"

    def parse(self, value: Any, root: Path) -> bool | tuple[str, ...]:
        if isinstance(value, list | tuple) or (isinstance(value, str) and value.strip().startswith("[")):
            names = as_list(value)
            if names is not None and names and all(isinstance(v, str) and v.strip() for v in names):
                return tuple(v.strip() for v in names)
            raise self.fail(value)
        try:
            return Flag().parse(value, root)
        except Problem:
            raise self.fail(value) from None


# --------------------------------------------------------------------------- declaring keys
def key(name: str, default: Any = REQUIRED, description: str = "", *, secret: bool = False) -> Any:
    """One key: its name in the file, its default, what it means; ``secret`` keys never show.

    A secret key may also be given as ``<name>File``: the path of a file holding the value.
    """
    extra: dict[str, Any] = {"secret": True} if secret else {}
    return Field(default, alias=name, description=description, repr=not secret, json_schema_extra=extra)


def section(name: str, description: str) -> Any:
    """A nested object (a section, or a fixed-shape value such as ``Dicom:Upstream``)."""
    return Field(default_factory=dict, alias=name, description=description)


def collection(name: str, description: str, empty: Any) -> Any:
    """A map keyed by names the site chooses, or a list of objects; ``empty`` is the default."""
    return Field(default_factory=type(empty), alias=name, description=description)


def internal(default: Any = None) -> Any:
    """An attribute the loader fills in (``config_root``, ``tus.upload_folder``): not a key."""
    return Field(default, exclude=True, repr=False)


def is_secret(info: FieldInfo) -> bool:
    return isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("secret") is True


def is_key(info: FieldInfo) -> bool:
    return not info.exclude and info.alias is not None


def kind_of(info: FieldInfo) -> Kind | None:
    return next((m for m in info.metadata if isinstance(m, Kind)), None)


class Section(BaseModel):
    """A section of ``appsettings.json``: frozen; fields are keys declared with :func:`key`."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_by_name=True, validate_by_alias=True,
                              validate_default=True)

    #: a bare value stands for ``{shorthand: value}`` (``Authentication:Users:alice: "pw"``)
    shorthand: ClassVar[str | None] = None
    #: how messages name the expected value when it is not an object of this shape
    noun: ClassVar[str] = "an object"
