"""http/hsts.py: the header on every response (replacing the PACS's), the 308 to https with the
request's host and target, the health check answered in place, a bad Host refused."""

from __future__ import annotations

from typing import Any

from dicomproxy.http.hsts import Hsts, RedirectToHttps, hsts_value


async def call(app: Any, path: str = "/dicom-web/studies", *, host: bytes | None = b"gw.example:8080",
               query: bytes = b"", raw_path: bytes | None = None) -> list[dict[str, Any]]:
    headers = [(b"host", host)] if host is not None else []
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": raw_path or path.encode(),
             "query_string": query, "headers": headers}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"text/plain"), (b"Strict-Transport-Security", b"max-age=5; preload")]})
    await send({"type": "http.response.body", "body": b"inner " + scope["path"].encode()})


def headers(message: dict[str, Any]) -> dict[bytes, bytes]:
    return dict(message["headers"])


async def test_hsts_header_replaces_the_upstreams() -> None:
    sent = await call(Hsts(inner, hsts_value(31536000, False)))
    start = sent[0]
    assert start["status"] == 200
    assert [v for k, v in start["headers"] if k.lower() == b"strict-transport-security"] == [b"max-age=31536000"]
    assert sent[1]["body"] == b"inner /dicom-web/studies"
    assert hsts_value(600, True) == b"max-age=600; includeSubDomains"


async def test_hsts_leaves_other_scopes_alone() -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    await Hsts(app, b"max-age=1")({"type": "lifespan"}, None, None)
    assert seen == ["lifespan"]


async def test_redirect_keeps_host_path_and_query() -> None:
    sent = await call(RedirectToHttps(inner, 8443), raw_path=b"/dicom-web/studies/1.2%2F3", query=b"a=1&b=%20")
    assert sent[0]["status"] == 308
    location = headers(sent[0])[b"location"]
    assert location == b"https://gw.example:8443/dicom-web/studies/1.2%2F3?a=1&b=%20"
    assert location in sent[1]["body"]
    assert headers(sent[0])[b"content-length"] == str(len(sent[1]["body"])).encode()


async def test_redirect_to_the_default_port_and_ip_hosts() -> None:
    sent = await call(RedirectToHttps(inner, 443), host=b"10.0.0.7")
    assert headers(sent[0])[b"location"] == b"https://10.0.0.7/dicom-web/studies"
    sent = await call(RedirectToHttps(inner, 8443), host=b"[fe80::1]:8080")
    assert headers(sent[0])[b"location"] == b"https://[fe80::1]:8443/dicom-web/studies"


async def test_health_is_answered_over_plain_http() -> None:
    for path in ("/dicomproxy/health", "/dicomproxy/health/live", "/dicomproxy/health/ready"):
        sent = await call(RedirectToHttps(inner, 8443), path)
        assert sent[0]["status"] == 200 and sent[1]["body"] == b"inner " + path.encode()
    sent = await call(RedirectToHttps(inner, 8443), "/dicomproxy/health/other")
    assert sent[0]["status"] == 308


async def test_bad_or_missing_host_is_refused() -> None:
    for host in (None, b"", b"evil.example/path", b"a b", b"x\r\nSet-Cookie: y", b"user@host"):
        sent = await call(RedirectToHttps(inner, 8443), host=host)
        assert sent[0]["status"] == 400, host
        assert b"location" not in headers(sent[0])
