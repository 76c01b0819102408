"""An OpenID issuer's signing keys: discovery document and JWKS, fetched, cached, refreshed.

``{Issuer}/.well-known/openid-configuration`` names the ``jwks_uri``; the key set found there
is parsed by PyJWT (:class:`jwt.PyJWKSet`) and kept by ``kid``. The keys are refetched

* when they are older than ``max_age`` (``Authentication:Oidc:JwksMaxAgeSeconds``): the next
  token that needs them waits for the fetch, and keeps the old keys if it fails;
* when a token names a ``kid`` the set does not have (the issuer rotated its keys), but at most
  once per ``min_interval`` (``JwksMinRefreshSeconds``) whatever happens: a flood of tokens with
  made-up kids costs the issuer one request per interval, and concurrent requests share one
  fetch (a lock, re-checked after waiting).

The issuer and every URL fetched from it must be ``https`` unless ``allow_http`` (tests); the
discovery document's ``issuer`` must be the configured one (OpenID Connect Discovery 1.0, 4.3).
Answers are capped at :data:`MAX_DOCUMENT_BYTES`.

HTTP goes through :func:`http_fetcher`, the one place to switch onto the gateway's shared
upstream client (``httpx.AsyncClient(transport=...)``) once that client offers a transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt

log = logging.getLogger("dicomproxy.auth.jwks")

MAX_DOCUMENT_BYTES = 1 << 20
DISCOVERY_PATH = "/.well-known/openid-configuration"

FetchJson = Callable[[str], Awaitable[Any]]


class KeysUnavailable(Exception):
    """The issuer's keys could not be fetched (yet): tokens cannot be checked."""


class HttpFetcher:
    """GET a JSON document with timeouts and a size cap (httpx)."""

    def __init__(self, timeout: float, ca_file: Path | None = None) -> None:
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
        self.client = httpx.AsyncClient(timeout=timeout, verify=verify, follow_redirects=False, trust_env=False)

    async def __call__(self, url: str) -> Any:
        async with self.client.stream("GET", url, headers={"Accept": "application/json"}) as r:
            if r.status_code != 200:
                raise KeysUnavailable(f"GET {url}: HTTP {r.status_code}")
            body = bytearray()
            async for chunk in r.aiter_bytes():
                body += chunk
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise KeysUnavailable(f"GET {url}: larger than {MAX_DOCUMENT_BYTES} bytes")
        try:
            return json.loads(body)
        except ValueError:
            raise KeysUnavailable(f"GET {url}: not JSON") from None

    async def close(self) -> None:
        await self.client.aclose()


def http_fetcher(timeout: float, ca_file: Path | None = None) -> HttpFetcher:
    """The HTTP client for the issuer (see the module docstring)."""
    return HttpFetcher(timeout, ca_file)


class IssuerKeys:
    """The issuer's current key set; see the module docstring."""

    def __init__(self, issuer: str, fetch: FetchJson, *, max_age: float = 3600, min_interval: float = 30,
                 allow_http: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.issuer = issuer
        self.fetch = fetch
        self.max_age, self.min_interval = max_age, min_interval
        self.allow_http = allow_http
        self.clock = clock
        self.jwks_uri: str | None = None
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._loaded_at: float | None = None
        self._attempted_at: float | None = None
        self._error: str | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.fetches = 0  # JWKS documents fetched (tests and health)

    # -- component ------------------------------------------------------------------------
    async def start(self) -> None:
        """Fetch the keys in the background: an issuer that is down does not stop the gateway."""
        self._task = asyncio.create_task(self._initial())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        close = getattr(self.fetch, "close", None)
        if close is not None:
            await close()

    async def _initial(self) -> None:
        with contextlib.suppress(KeysUnavailable):
            await self.refresh()

    def status(self) -> dict[str, Any]:
        age = None if self._loaded_at is None else round(self.clock() - self._loaded_at, 1)
        return {"ok": self._loaded_at is not None, "issuer": self.issuer, "keys": len(self._keys),
                "keysAgeSeconds": age, **({"error": self._error} if self._error else {})}

    # -- keys -----------------------------------------------------------------------------
    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        """The key ``kid`` names (None: the issuer's only key). KeysUnavailable when there are no keys."""
        if self._loaded_at is None or self.clock() - self._loaded_at > self.max_age:
            await self._fresh_keys(stale_ok=self._loaded_at is not None)
        found = self._lookup(kid)
        if found is None:
            await self._fresh_keys(stale_ok=True)
            found = self._lookup(kid)
        if found is None and self._loaded_at is None:
            raise KeysUnavailable(self._error or "the issuer's keys are not loaded yet")
        return found

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    async def _fresh_keys(self, stale_ok: bool) -> None:
        """Wait for a fetch under way, or start one if the last began ``min_interval`` ago."""
        now = self.clock()
        if self._lock.locked():
            async with self._lock:  # another request is fetching: its result serves this one too
                return
        if self._attempted_at is not None and now - self._attempted_at < self.min_interval:
            return
        try:
            await self.refresh(since=now)
        except KeysUnavailable:
            if not stale_ok:
                raise

    async def refresh(self, since: float | None = None) -> None:
        """Fetch discovery and JWKS now (unless another fetch began after ``since``)."""
        async with self._lock:
            if since is not None and self._attempted_at is not None and self._attempted_at >= since:
                return  # someone else refreshed while this request waited
            self._attempted_at = self.clock()
            try:
                keys = await self._fetch_keys()
            except KeysUnavailable as e:
                self._error = str(e)
                log.warning("OpenID issuer %s: cannot load its keys: %s", self.issuer, e)
                raise
            except (httpx.HTTPError, OSError) as e:
                self._error = f"{type(e).__name__}: {e}"
                log.warning("OpenID issuer %s: cannot load its keys: %s", self.issuer, self._error)
                raise KeysUnavailable(self._error) from None
            self._keys, self._loaded_at, self._error = keys, self.clock(), None
            log.info("OpenID issuer %s: %d signing keys loaded (%s)", self.issuer, len(keys),
                     ", ".join(str(k) for k in keys))

    async def _fetch_keys(self) -> dict[str | None, jwt.PyJWK]:
        if self.jwks_uri is None or self._loaded_at is None or self.clock() - self._loaded_at > self.max_age:
            self.jwks_uri = await self._discover()
        document = await self.fetch(self.jwks_uri)
        self.fetches += 1
        return parse_jwks(document, self.jwks_uri)

    async def _discover(self) -> str:
        url = self.issuer.rstrip("/") + DISCOVERY_PATH
        meta = await self.fetch(url)
        if not isinstance(meta, dict):
            raise KeysUnavailable(f"{url}: not a JSON object")
        if meta.get("issuer") != self.issuer:
            raise KeysUnavailable(f"{url}: names issuer {meta.get('issuer')!r}, not {self.issuer!r} "
                                  "(set Authentication:Oidc:Issuer to exactly the issuer's own value)")
        uri = meta.get("jwks_uri")
        if not isinstance(uri, str) or not self._allowed(uri):
            raise KeysUnavailable(f"{url}: jwks_uri {uri!r} is not an https URL")
        return uri


    def _allowed(self, url: str) -> bool:
        scheme = urlsplit(url).scheme
        return scheme == "https" or (self.allow_http and scheme == "http")


def parse_jwks(document: Any, source: str) -> dict[str | None, jwt.PyJWK]:
    """Signing keys of a JWKS document by kid (keys PyJWT cannot use, or marked ``enc``, are skipped)."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise KeysUnavailable(f"{source}: not a JWKS document")
    keys: dict[str | None, jwt.PyJWK] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError):
            continue
        keys[entry.get("kid") if isinstance(entry.get("kid"), str) else None] = key
    if not keys:
        raise KeysUnavailable(f"{source}: no signing key PyJWT can use")
    return keys
