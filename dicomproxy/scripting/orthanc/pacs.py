"""The PACS's REST API (``Upstream:Url``) as the Orthanc layer calls it.

Requests go through the gateway's one upstream client (``Upstream.client``: httpx over the
proxy's own pool, its TLS and timeouts; no Accept-Encoding is sent, so bodies arrive as the
PACS stores them). A transport failure or a non-2xx answer raises
:class:`PacsError`, whose message names the method, the URL and the status: callers decide
whether that is a ``nil`` for the script (Orthanc's ``RestApi*``) or a Lua error.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import IO, Any

import httpx

from dicomproxy.upstream import Upstream

LEVELS = ("Patient", "Study", "Series", "Instance")
PLURAL = {"Patient": "patients", "Study": "studies", "Series": "series", "Instance": "instances"}
LEVEL_OF = {v: k for k, v in PLURAL.items()}
PARENT_KEY = {"Study": "ParentPatient", "Series": "ParentStudy", "Instance": "ParentSeries"}


class PacsError(Exception):
    """A PACS request failed; ``status`` is the HTTP status, or None when there was no answer."""

    def __init__(self, method: str, url: str, status: int | None, detail: str = "") -> None:
        self.method, self.url, self.status, self.detail = method, url, status, detail
        what = f"HTTP {status}" if status is not None else "no answer"
        super().__init__(f"{method} {url} -> {what}" + (f": {detail}" if detail else ""))


def _excerpt(data: bytes, limit: int = 300) -> str:
    """Orthanc's error answer says it best (``Message``: ``Details``); else the start of the body."""
    try:
        error = json.loads(data)
    except ValueError:
        error = None
    if isinstance(error, dict) and error.get("Message"):
        return f"{error['Message']}: {error['Details']}" if error.get("Details") else str(error["Message"])
    text = data[:limit].decode("utf-8", "replace").strip()
    return " ".join(text.split())


class Pacs:
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    def url(self, uri: str) -> str:
        return self.upstream.url(uri)

    async def request(
        self, method: str, uri: str, body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> bytes:
        url = self.upstream.url(uri)
        try:
            resp = await self.upstream.client.request(method, url, content=body, headers=dict(headers or {}))
            data, status = resp.content, resp.status_code
        except (httpx.HTTPError, OSError) as e:
            raise PacsError(method, url, None, str(e) or type(e).__name__) from None
        if not 200 <= status < 300:
            raise PacsError(method, url, status, _excerpt(data))
        return data

    async def download(self, uri: str, out: IO[bytes]) -> int:
        """``GET uri`` streamed into ``out`` (a local file: page-cache writes, never the whole body
        in memory); returns the byte count."""
        url = self.upstream.url(uri)
        size = 0
        try:
            async with self.upstream.client.stream("GET", url) as resp:
                if not 200 <= resp.status_code < 300:
                    raise PacsError("GET", url, resp.status_code, _excerpt(await resp.aread()))
                async for chunk in resp.aiter_raw():
                    out.write(chunk)
                    size += len(chunk)
        except (httpx.HTTPError, OSError) as e:
            raise PacsError("GET", url, None, str(e) or type(e).__name__) from None
        return size

    async def json(self, method: str, uri: str, payload: Any = None) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        data = await self.request(method, uri, body)
        if not data.strip():
            return None
        try:
            return json.loads(data)
        except ValueError:
            raise PacsError(method, self.upstream.url(uri), 200, "the answer is not JSON: " + _excerpt(data)) from None

    async def get(self, uri: str) -> Any:
        return await self.json("GET", uri)


def orthanc_id(*uids: str) -> str:
    """Orthanc's identifier of a resource: SHA-1 of ``PatientID|StudyUID|SeriesUID|SOPUID``
    (as many parts as the level needs), written as five dash-separated groups of 8 hex digits."""
    digest = hashlib.sha1("|".join(uids).encode()).hexdigest()
    return "-".join(digest[i : i + 8] for i in range(0, 40, 8))
