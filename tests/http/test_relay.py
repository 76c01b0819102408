"""What the PACS is told (Forwarded, X-Forwarded-*, Host) and which answers are rewritten."""

from __future__ import annotations

from typing import Any

from dicomproxy.config.settings import UpstreamSettings
from dicomproxy.http.relay import Relay, Rewrite
from dicomproxy.http.rewrite import MultipartRewriter, TextRewriter
from dicomproxy.upstream.pool import Origin


def relay(**keys: Any) -> Relay:
    settings = UpstreamSettings.model_validate({"Url": "http://pacs:8042", **keys})
    return Relay(settings, Origin.of(settings.url), b"")


def rw(path: str, host: bytes, **keys: Any) -> Rewrite | None:
    r = relay(**keys)
    return r.rewrite(path, r.facing(scope(), host))


def scope(client: str = "10.0.0.7") -> dict[str, Any]:
    return {"scheme": "http", "client": (client, 5000), "server": ("192.0.2.1", 8080)}


def test_forwarding_headers_name_the_gateway_as_the_client_reached_it() -> None:
    headers, _, facing = relay().forwarding(scope(), b"gw.example:8080", [b"203.0.113.9"])
    assert facing.public == b"gw.example:8080"
    assert dict(headers) == {
        b"x-forwarded-for": b"203.0.113.9, 10.0.0.7", b"x-forwarded-proto": b"http",
        b"x-forwarded-host": b"gw.example:8080", b"forwarded": b"for=10.0.0.7;host=gw.example:8080;proto=http"}
    headers, _, _ = relay().forwarding(scope("::1"), b"gw", [])
    assert dict(headers)[b"forwarded"] == b'for="[::1]";host=gw;proto=http'


def test_forwarding_headers_kept_per_client_never_mix_clients_or_chains() -> None:
    r = relay()
    first, _, _ = r.forwarding(scope("10.0.0.7"), b"gw", [])
    again, _, _ = r.forwarding(scope("10.0.0.7"), b"gw", [])
    assert again is first  # the same client with no chain of its own: built once
    other, _, _ = r.forwarding(scope("10.0.0.8"), b"gw", [])
    assert dict(other)[b"x-forwarded-for"] == b"10.0.0.8"
    chained, _, _ = r.forwarding(scope("10.0.0.7"), b"gw", [b"198.51.100.1"])
    assert dict(chained)[b"x-forwarded-for"] == b"198.51.100.1, 10.0.0.7"
    assert dict(r.forwarding(scope("10.0.0.7"), b"gw", [])[0])[b"x-forwarded-for"] == b"10.0.0.7"


def test_an_unusable_host_falls_back_to_the_listening_address_and_public_url_wins() -> None:
    _, _, facing = relay().forwarding(scope(), b"evil\r\nx: y", [])
    assert facing.public == b"192.0.2.1:8080"
    _, _, facing = relay().forwarding(scope(), b"", [])  # HTTP/1.0 without Host
    assert facing.public == b"192.0.2.1:8080"
    headers, _, facing = relay(PublicUrl="https://pacs.example.org").forwarding(scope(), b"gw:8080", [])
    assert facing.public == b"pacs.example.org" and dict(headers)[b"forwarded"].endswith(b"proto=https")


def test_facings_are_kept_within_their_bound() -> None:
    r = relay()
    assert r.facing(scope(), b"gw:1") is r.facing(scope(), b"gw:1")
    for i in range(Relay.FACINGS + 10):
        r.facing(scope(), b"gw:%d" % i)
    assert len(r._facings) <= Relay.FACINGS


def test_preserve_host() -> None:
    assert relay().upstream_host_for(relay().facing(scope(), b"gw:8080")) is None
    preserve = relay(PreserveHost=True)
    assert preserve.upstream_host_for(preserve.facing(scope(), b"gw:8080")) == b"gw:8080"


def test_rewrite_modes_and_scope() -> None:
    auto = rw("/dicom-web/studies", b"gw:8080")
    assert auto is not None and auto.body and auto.sent_base == b"http://pacs:8042"
    assert auto.public_base == b"http://gw:8080"
    rest = rw("/instances/x", b"gw:8080")
    assert rest is not None and not rest.body  # Location headers only
    assert rw("/dicom-webx", b"gw:8080").body is False  # type: ignore[union-attr]
    always = rw("/instances/x", b"gw:8080", RewriteUrls="always")
    assert always is not None and always.body
    assert rw("/dicom-web/studies", b"gw:8080", RewriteUrls="Never") is None
    # PreserveHost: the PACS was sent the gateway's host; nothing to rewrite with the same scheme
    assert rw("/dicom-web/studies", b"gw:8080", PreserveHost=True) is None


def test_answer_headers_location_length_and_etag() -> None:
    rewrite = rw("/dicom-web/studies", b"gw:8080")
    assert rewrite is not None
    headers = [(b"content-type", b"application/dicom+json"), (b"content-length", b"100"), (b"etag", b'"abc"'),
               (b"location", b"http://pacs:8042/dicom-web/studies/1"), (b"x-other", b"http://pacs:8042/")]
    out, rewriter = rewrite.answer(200, list(headers), head_only=False)
    assert isinstance(rewriter, TextRewriter)
    assert dict(out) == {b"content-type": b"application/dicom+json", b"etag": b'W/"abc"',
                         b"location": b"http://gw:8080/dicom-web/studies/1", b"x-other": b"http://pacs:8042/"}
    # encoded anyway, a binary type, a 304: headers only, the length stays
    for status, extra in ((200, [(b"content-encoding", b"gzip")]), (304, [])):
        out, rewriter = rewrite.answer(status, list(headers) + extra, head_only=False)
        assert rewriter is None and (b"content-length", b"100") in out
    out, rewriter = rewrite.answer(200, [(b"content-type", b"application/dicom"), (b"content-length", b"9")], False)
    assert rewriter is None and out == [(b"content-type", b"application/dicom"), (b"content-length", b"9")]
    ct = b'multipart/related; type="application/dicom+xml"; boundary=abc'
    _, rewriter = rewrite.answer(200, [(b"content-type", ct)], head_only=False)
    assert isinstance(rewriter, MultipartRewriter)
    # a HEAD: the headers a GET would have (its rewriter decides the coding), framed as that GET is
    out, rewriter = rewrite.answer(200, list(headers), head_only=True)
    assert isinstance(rewriter, TextRewriter) and b"content-length" not in dict(out)
    assert dict(out)[b"transfer-encoding"] == b"chunked" and dict(out)[b"etag"] == b'W/"abc"'


def test_identity_is_asked_only_for_answers_the_rewriter_reads() -> None:
    assert Relay.wants_identity(None) and Relay.wants_identity(b"application/dicom+json")
    assert Relay.wants_identity(b'multipart/related; type="application/dicom+xml"')
    assert Relay.wants_identity(b"*/*")
    assert not Relay.wants_identity(b'multipart/related; type="application/dicom"')
    assert not Relay.wants_identity(b"image/jpeg")
