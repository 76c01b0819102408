"""What the PACS is told about a proxied request, and which of its answers' URLs are rewritten.

Orthanc's DICOMweb plugin (``Plugin/Configuration.cpp``, ``GetBaseUrl``; read for 1.7, the
Debian version here, and the current mainline) builds every absolute URL it answers with from,
in this order: its own ``DicomWeb.Host``/``Ssl`` settings; ``X-Forwarded-Host`` together with
``X-Forwarded-Proto`` (mainline only, both needed); the first element of ``Forwarded``
(RFC 7239: its ``host`` and ``proto``, split on ``,`` ``;`` ``=`` and taken verbatim: a quoted
``host="gw:8080"`` comes back as ``http://"gw:8080"/dicom-web``, measured on 1.7); and last the
``Host`` header. So the gateway sends, on every proxied request:

* ``Forwarded: for=<client>;host=<host>;proto=<scheme>`` — one element, the gateway's, with the
  host unquoted (what Orthanc can read; lenient parsers such as Spring's take both forms). The
  client's own ``Forwarded`` is dropped like its ``X-Forwarded-Host``/``-Proto``: the PACS trusts
  the gateway, not what a client claims to be (its address chain stays in ``X-Forwarded-For``);
* ``X-Forwarded-For`` (the client's values, then its address), ``X-Forwarded-Proto``,
  ``X-Forwarded-Host``;
* ``Host``: the PACS's own, or with ``Upstream:PreserveHost`` the client's.

``<host>`` and ``<scheme>`` are the gateway's as the client reached it: the request's ``Host``
(when it is a valid host[:port]; else the address the connection came in on) and scheme, or
``Upstream:PublicUrl`` behind a load balancer that terminates TLS.

For a PACS that honours none of these, ``Upstream:RewriteUrls`` rewrites the URLs in its answers
(:mod:`dicomproxy.http.rewrite`): ``Location``/``Content-Location`` always (unless ``Never``), and
bodies of DICOM JSON/XML types under ``Upstream:DicomWebRoot`` (``Auto``) or on every path
(``Always``). The upstream base looked for is the scheme of ``Upstream:Url``, the ``Host`` the
PACS was sent and the URL's path prefix.

Cost on the hot path, measured with ``bench/proxy_instructions.py`` (callgrind, a 2 KB answer
outside the DICOMweb root, against the code before this module): 190 -> 209 thousand
instructions per proxied request (+10 %), most of it the ``Forwarded`` header and the answer's
header scan; what depends on the client's ``Host`` alone is computed once per distinct ``Host``
(:class:`Facing`). Body rewriting is in :mod:`dicomproxy.http.rewrite`'s figures.

Compression: when a body may be rewritten (in scope, and the ``Accept`` admits JSON or XML),
the PACS is asked for ``Accept-Encoding: identity``, and a rewritten body goes to the client in
the coding its ``Accept-Encoding`` admits (gzip, then deflate), compressed in streaming
(:mod:`dicomproxy.http.coding`, with the measurement that chose this over decoding the PACS's
gzip); an answer that comes encoded anyway passes unrewritten. Bulk retrievals (``Accept:
multipart/related; type="application/dicom"``, rendered images) keep the PACS's compression.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from dicomproxy.config.settings import UpstreamSettings
from dicomproxy.http.rewrite import MultipartRewriter, TextRewriter, UrlMap, content_rewriter
from dicomproxy.upstream.framing import HOST_VALUE as _HOST
from dicomproxy.upstream.framing import Headers, checked_lines
from dicomproxy.upstream.pool import Origin

_URL_HEADERS = (b"location", b"content-location")
_IDENTITY = b"identity"
# An Accept that admits an answer the rewriter reads (absent, */*, any JSON or XML type).
_TEXT_ACCEPTS = (b"json", b"xml", b"*/*")

Rewriter = TextRewriter | MultipartRewriter


class RewriteMode:
    """``Upstream:RewriteUrls``."""

    AUTO = "Auto"
    ALWAYS = "Always"
    NEVER = "Never"


@dataclass(slots=True)
class Rewrite:
    """One request's rewriting: the base the PACS was given and the gateway's; ``body``: whether a
    JSON/XML answer body is rewritten too (otherwise only ``Location`` headers)."""

    sent_base: bytes
    public_base: bytes
    body: bool

    def answer(self, status: int, headers: Headers, head_only: bool) -> tuple[Headers, Rewriter | None]:
        """The answer's headers for the client, and the body's rewriter (None: pass it as it is).

        With a rewriter, ``Content-Length`` is dropped (the proxy sends the new one or chunks)
        and a strong ``ETag`` becomes weak (the bytes differ from the PACS's, as nginx's
        ``sub_filter`` does it). A ``HEAD`` gets the rewriter too, so that the proxy gives it the
        headers the ``GET`` would have (its ``Content-Encoding``, RFC 9110 9.3.2), and says
        ``Transfer-Encoding: chunked`` as that ``GET`` does: the rewritten length is known only
        by producing the body (RFC 9110 8.6 lets a HEAD omit it)."""
        if not self.body:
            for i, (name, value) in enumerate(headers):
                if name in _URL_HEADERS:
                    headers[i] = (name, UrlMap.of(self.sent_base, self.public_base).replace_value(value))
            return headers, None
        urls: UrlMap | None = None  # built only when something may need it: most answers have no Location
        rewriter: Rewriter | None = None
        content_type = encoding = None
        for i, (name, value) in enumerate(headers):
            if name in _URL_HEADERS:
                urls = urls or UrlMap.of(self.sent_base, self.public_base)
                headers[i] = (name, urls.replace_value(value))
            elif name == b"content-type":
                content_type = value
            elif name == b"content-encoding":
                encoding = value
        if (self.body and content_type is not None and status not in (204, 206, 304)
                and (encoding is None or encoding.strip().lower() == _IDENTITY)):
            rewriter = content_rewriter(content_type, urls or UrlMap.of(self.sent_base, self.public_base))
        if rewriter is None:
            return headers, None
        out = [(k, _weak(v) if k == b"etag" else v) for k, v in headers if k != b"content-length"]
        if head_only:
            out.append((b"transfer-encoding", b"chunked"))
        return out, rewriter


@dataclass(frozen=True, slots=True)
class Facing:
    """What follows from the gateway's public host and scheme for one ``Host`` a client sent: the
    ``Forwarded`` tail, and the two possible :class:`Rewrite` (headers only, and bodies too).

    ``added`` keeps, per client address, the four forwarding headers of a request that brought no
    ``X-Forwarded-For`` of its own (nearly all: they are then the same for every request of that
    client), with the head lines they make (``checked_lines``), at most ``Relay.FACINGS``
    addresses; measured with ``bench/proxy_instructions.py``, building them per request cost
    ~2,000 instructions (~0.5 us)."""

    public: bytes
    scheme: bytes
    forwarded_tail: bytes  # b";host=<public>;proto=<scheme>"
    headers_only: Rewrite | None
    with_body: Rewrite | None
    host_for: bytes | None = None  # the Host sent upstream (None: the PACS's own): Relay.upstream_host_for
    added: dict[str, tuple[Headers, bytes]] = field(default_factory=dict)  # the headers, as checked lines too


class Relay:
    """The forwarding headers and the rewrite decision for each proxied request (one per gateway).

    Everything that depends only on the client's ``Host`` and the scheme is computed once per
    distinct pair and kept (at most ``FACINGS``; the set starts over when full): a proxied request
    then costs a dict lookup and two joins, not a regex match and a dozen concatenations."""

    FACINGS = 256

    def __init__(self, settings: UpstreamSettings, origin: Origin, prefix: bytes) -> None:
        self.preserve_host = bool(settings.preserve_host)
        self.mode = settings.rewrite_urls
        self.dicomweb_root = settings.dicomweb_root.rstrip("/").encode()
        self.upstream_scheme = origin.scheme.encode()
        self.upstream_host = origin.host_header
        self.prefix = prefix
        public = urlsplit(settings.public_url) if settings.public_url else None
        self.public_scheme = public.scheme.encode() if public else None
        self.public_host = public.netloc.encode() if public else None
        self.dicomweb_path = self.dicomweb_root.decode("latin-1")
        self._facings: dict[tuple[bytes, str, Any], Facing] = {}

    def facing(self, scope: dict[str, Any], host: bytes) -> Facing:
        """The :class:`Facing` for this request's ``Host`` (b"" when it sent none) and scheme."""
        scheme = scope.get("scheme", "http")
        key = (host, scheme, None if host else scope.get("server"))
        found = self._facings.get(key)
        if found is None:
            if len(self._facings) >= self.FACINGS:
                self._facings.clear()
            found = self._facings[key] = self._face(scope, host, scheme)
        return found

    def _face(self, scope: dict[str, Any], host: bytes, scheme_name: str) -> Facing:
        scheme = self.public_scheme or scheme_name.encode()
        public = self.public_host or (host if host and _HOST.fullmatch(host) else _server(scope))
        tail = b";host=" + public + b";proto=" + scheme
        host_for = public if self.preserve_host else None
        if self.mode == RewriteMode.NEVER:
            return Facing(public, scheme, tail, None, None, host_for)
        sent = self.upstream_scheme + b"://" + (public if self.preserve_host else self.upstream_host) + self.prefix
        public_base = scheme + b"://" + public
        if sent == public_base:
            return Facing(public, scheme, tail, None, None, host_for)
        return Facing(public, scheme, tail, Rewrite(sent, public_base, self.mode == RewriteMode.ALWAYS),
                      Rewrite(sent, public_base, True), host_for)

    def forwarding(self, scope: dict[str, Any], host: bytes, forwarded_for: list[bytes]
                   ) -> tuple[Headers, bytes, Facing]:
        """The ``X-Forwarded-*`` and ``Forwarded`` headers, the same as checked head lines when they
        are a client's cached ones (:func:`~dicomproxy.upstream.framing.checked_lines`; else b""),
        and the :class:`Facing` they come from."""
        # facing()'s lookup in line (its call is ~400 instructions); a new key goes through it
        facing = self._facings.get((host, scope.get("scheme", "http"), None if host else scope.get("server")))
        if facing is None:
            facing = self.facing(scope, host)
        client = scope.get("client")
        name = client[0] if client else "unknown"
        if not forwarded_for:
            cached = facing.added.get(name)
            if cached is None:
                if len(facing.added) >= self.FACINGS:
                    facing.added.clear()
                added = self._added(facing, name.encode(), [])
                cached = facing.added[name] = (added, checked_lines(added))
            return cached[0], cached[1], facing
        return self._added(facing, name.encode(), forwarded_for), b"", facing

    @staticmethod
    def _added(facing: Facing, address: bytes, forwarded_for: list[bytes]) -> Headers:
        forwarded_for.append(address)
        node = b'"[' + address + b']"' if b":" in address else address
        return [
            (b"x-forwarded-for", b", ".join(forwarded_for)),
            (b"x-forwarded-proto", facing.scheme),
            (b"x-forwarded-host", facing.public),
            (b"forwarded", b"for=" + node + facing.forwarded_tail),
        ]

    def upstream_host_for(self, facing: Facing) -> bytes | None:
        """The ``Host`` to send (None: the PACS's own, which the pool writes)."""
        return facing.host_for

    def rewrite(self, path: str, facing: Facing) -> Rewrite | None:
        """This request's :class:`Rewrite`, or None (``Never``, or nothing would change)."""
        headers_only = facing.headers_only
        if headers_only is None or headers_only.body:
            return headers_only
        root = self.dicomweb_path  # under DicomWebRoot, on the str: no encoding per request
        in_dicomweb = path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/")
        return facing.with_body if in_dicomweb else headers_only

    @staticmethod
    def wants_identity(accept: bytes | None) -> bool:
        """Whether an answer to this ``Accept`` may be a JSON or XML body the rewriter reads."""
        if accept is None:
            return True
        low = accept.lower()
        return any(t in low for t in _TEXT_ACCEPTS)


def _server(scope: dict[str, Any]) -> bytes:
    """``host:port`` of the address the connection came in on (when the ``Host`` header is unusable)."""
    server = scope.get("server")
    if not server:
        return b"localhost"
    host, port = server[0], server[1]
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}".encode() if port else host.encode()


def _weak(etag: bytes) -> bytes:
    return etag if etag.startswith(b"W/") else b"W/" + etag
