"""The authentication layer of the gateway's ASGI stack (inside CORS, outside the features).

One request, in order:

1. ``/dicomproxy/health`` is always answered: with a valid credential in full, otherwise with
   its anonymous summary (load balancers send none);
2. an address over its failed-attempt budget gets 429 + ``Retry-After`` (:mod:`.ratelimit`);
3. exactly one credential must be present: ``Authorization: Basic``, ``Authorization: Bearer``
   or ``X-API-Key``. None: 401 with a challenge per enabled scheme. More than one (two
   ``Authorization`` headers, or ``Authorization`` and ``X-API-Key``): 400. The gateway refuses
   to choose: a client that sends two credentials is confused or probing, and any order would
   let a valid credential hide a wrong one from the failed-attempt limiter and the log;
4. the credential is checked by its scheme's verifier; a failure is one log line (the user or
   key name when known, never the secret), one token off the address's budget, and a 401;
5. the role policy (:mod:`.policy`) may answer 403, naming the roles the route needs;
6. the request goes on with the identity in its scope (:mod:`.identity`) and without the
   client's ``Authorization`` and ``X-API-Key`` headers: those are the gateway's credentials,
   never the PACS's.

Hot-path cost for a request that passes: one scan of the header names, one dict lookup in the
limiter, the scheme's check (a plain password: a constant-time compare; a hashed password, key
or token seen before: one keyed hash and a dict lookup), the rule scan, one scope copy.
Measured with ``bench/auth_bench.py`` (in process, 20,000 requests x 5 alternating rounds, this
shared 2-core machine at load ~7): the basic auth this replaced 2.8-4.3 us per request; now a
plain password 6.2-8.6 us (2.0-2.2x), a cached bcrypt hash 7.1-8.7 us, an API key 4.9-7.8 us
(1.7-1.8x), a cached RS256 token 6.4-9.6 us (2.2x). The ~3-4 us added is ~2 % of what the proxy
itself spends on a small proxied GET (150-200 us CPU, bench/README.md).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from dicomproxy.audit.trail import AuditTrail
from dicomproxy.auth.apikeys import HEADER as API_KEY_HEADER
from dicomproxy.auth.apikeys import ApiKeyVerifier
from dicomproxy.auth.basic import BasicVerifier, parse_basic
from dicomproxy.auth.bearer import BearerVerifier, TokenError
from dicomproxy.auth.identity import Identity
from dicomproxy.auth.jwks import KeysUnavailable
from dicomproxy.auth.policy import Policy, Rule
from dicomproxy.auth.ratelimit import FailureLimiter

Scope = MutableMapping[str, Any]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

log = logging.getLogger("dicomproxy.auth")

HEALTH_PATH = "/dicomproxy/health"
AUTHORIZATION = b"authorization"
CREDENTIAL_HEADERS = (AUTHORIZATION, API_KEY_HEADER)


@dataclass(frozen=True)
class Schemes:
    """The verifiers of the enabled schemes (None: that scheme is off)."""

    basic: BasicVerifier | None = None
    api_keys: ApiKeyVerifier | None = None
    bearer: BearerVerifier | None = None

    def __bool__(self) -> bool:
        return any((self.basic, self.api_keys, self.bearer))


@dataclass(frozen=True)
class Refusal:
    """Why a credential was not accepted: for the log line and the answer."""

    what: str  # e.g. "basic user 'alice': wrong password"
    status: int = 401
    detail: str = ""  # bearer: the RFC 6750 error_description
    counts: bool = True  # a failed attempt for the limiter
    user: str = ""  # the name the caller gave, when there is one (the audit trail's UserID)


class AuthMiddleware:
    def __init__(self, app: Any, schemes: Schemes, policy: Policy, limiter: FailureLimiter,
                 realm: str = "DicomProxy", retry_unavailable: int = 30, audit: AuditTrail | None = None) -> None:
        self.app = app
        self.audit = audit
        self.schemes = schemes
        self.policy = policy
        self.limiter = limiter
        self.realm = realm
        self.retry_unavailable = retry_unavailable
        quoted = realm.replace("\\", "\\\\").replace('"', '\\"')
        self.challenges: list[tuple[bytes, bytes]] = []
        if schemes.basic is not None:
            self.challenges.append((b"www-authenticate", f'Basic realm="{quoted}", charset="UTF-8"'.encode()))
        if schemes.bearer is not None:
            self.challenges.append((b"www-authenticate", f'Bearer realm="{quoted}"'.encode()))
        self._bearer_realm = quoted

    async def __call__(self, scope: Scope, receive: Any, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        authorization, api_key, count = _credentials(scope["headers"])
        client = scope.get("client")
        host = client[0] if client else ""
        if scope["path"] == HEALTH_PATH:
            await self._health(scope, receive, send, authorization, api_key, count, host)
            return
        wait = self.limiter.retry_after(host)
        if wait:
            await _answer(scope, send, 429, {"error": "too many failed authentication attempts; retry later"},
                          [(b"retry-after", str(wait).encode())])
            return
        if count != 1:
            await self._no_single_credential(scope, send, count)
            return
        outcome = self._quick(authorization, api_key)
        if outcome is None:
            outcome = await self._authenticate(authorization, api_key)
        if isinstance(outcome, Refusal):
            await self._refuse(scope, send, outcome, host)
            return
        rule = self.policy.denied(outcome, scope["method"], scope["path"])
        if rule is not None:
            await self._forbidden(scope, send, outcome, rule)
            return
        if self.audit is not None:  # deduplicated there (basic auth logs in on every request)
            self.audit.login(outcome.name, host, True, via=f"HTTP {outcome.scheme.value} authentication")
        await self.app(_with_identity(scope, outcome), receive, send)

    # -- steps ----------------------------------------------------------------------------
    async def _health(self, scope: Scope, receive: Any, send: Send, authorization: bytes | None,
                      api_key: bytes | None, count: int, host: str) -> None:
        if count == 1 and not self.limiter.retry_after(host):
            outcome = await self._authenticate(authorization, api_key)
            if isinstance(outcome, Identity):
                await self.app(_with_identity(scope, outcome), receive, send)
                return
            if outcome.counts:
                self._log_failure(outcome, host)
        # open to load balancers, but only the summary: see http/api.health
        await self.app({**scope, "anonymous": True, "headers": _without_credentials(scope["headers"])},
                       receive, send)

    async def _authenticate(self, authorization: bytes | None, api_key: bytes | None) -> Identity | Refusal:
        quick = self._quick(authorization, api_key)
        if quick is not None:
            return quick
        assert authorization is not None
        scheme, _, rest = authorization.partition(b" ")
        if scheme.lower() == b"basic":
            return await self._basic(rest)
        return await self._bearer(rest.strip())

    def _quick(self, authorization: bytes | None, api_key: bytes | None) -> Identity | Refusal | None:
        """The answer when it needs no waiting (a key; a plain password, a hash or a token seen
        before; a refusal), else None: then the scheme's slow check runs."""
        if api_key is not None:
            return self._api_key(api_key)
        assert authorization is not None
        scheme, _, rest = authorization.partition(b" ")
        scheme = scheme.lower()
        if scheme == b"basic" and self.schemes.basic is not None:
            parsed = parse_basic(rest)
            if parsed is None:
                return Refusal("malformed basic credentials")
            found = self.schemes.basic.check(*parsed)
            if found is None:
                return self._basic_refusal(parsed[0])
            return found if isinstance(found, Identity) else None
        if scheme == b"bearer" and self.schemes.bearer is not None:
            try:
                return self.schemes.bearer.cached(rest.strip())
            except TokenError as e:
                return _token_refusal(e)
        return Refusal(f"the {_shown(scheme.decode('latin-1'))!r} scheme is not accepted")

    async def _basic(self, rest: bytes) -> Identity | Refusal:
        assert self.schemes.basic is not None
        parsed = parse_basic(rest)
        assert parsed is not None
        identity = await self.schemes.basic.verify(*parsed)
        return identity if identity is not None else self._basic_refusal(parsed[0])

    def _basic_refusal(self, name: str) -> Refusal:
        assert self.schemes.basic is not None
        known = name in self.schemes.basic.users
        return Refusal(f"basic user {_shown(name)!r}: {'wrong password' if known else 'unknown user'}",
                       user=_shown(name))

    def _api_key(self, key: bytes) -> Identity | Refusal:
        if self.schemes.api_keys is None:
            return Refusal("X-API-Key sent, but no API keys are configured")
        identity = self.schemes.api_keys.verify(key)
        return identity if identity is not None else Refusal("API key: not a configured key")

    async def _bearer(self, token: bytes) -> Identity | Refusal:
        assert self.schemes.bearer is not None
        try:
            return await self.schemes.bearer.verify(token)
        except TokenError as e:
            return _token_refusal(e)
        except KeysUnavailable as e:
            return Refusal(f"bearer token not checked: {e}", status=503, counts=False)

    # -- answers --------------------------------------------------------------------------
    async def _no_single_credential(self, scope: Scope, send: Send, count: int) -> None:
        if count == 0:
            await _answer(scope, send, 401, {"error": "authentication required"}, self.challenges)
            return
        await _answer(scope, send, 400, {"error": "more than one credential (Authorization, X-API-Key); send one"})

    async def _refuse(self, scope: Scope, send: Send, refusal: Refusal, host: str) -> None:
        if refusal.status == 503:
            log.warning("%s %s from %s: %s", scope["method"], scope["path"], host, refusal.what)
            await _answer(scope, send, 503, {"error": "the identity provider's keys are unavailable; retry later"},
                          [(b"retry-after", str(self.retry_unavailable).encode())])
            return
        self._log_failure(refusal, host)
        if refusal.detail:
            description = refusal.detail.replace('"', "'")
            challenge = f'Bearer realm="{self._bearer_realm}", error="invalid_token", ' \
                        f'error_description="{description}"'
            headers = [h for h in self.challenges if not h[1].startswith(b"Bearer")]
            headers.append((b"www-authenticate", challenge.encode("latin-1", "replace")))
            await _answer(scope, send, 401, {"error": f"invalid token: {refusal.detail}"}, headers)
            return
        await _answer(scope, send, 401, {"error": "authentication required"}, self.challenges)

    def _log_failure(self, refusal: Refusal, host: str) -> None:
        self.limiter.failed(host)
        log.warning("authentication failed from %s: %s", host or "?", refusal.what)
        if self.audit is not None:
            self.audit.login(refusal.user, host, False, via="HTTP authentication", reason=refusal.what)

    async def _forbidden(self, scope: Scope, send: Send, identity: Identity, rule: Rule) -> None:
        missing = sorted(rule.roles)
        log.info("%s %s: %s %r lacks role %s (rule %s)", scope["method"], scope["path"], identity.scheme.value,
                 identity.name, " or ".join(missing), rule.describe())
        await _answer(scope, send, 403, {"error": f"this needs the role {' or '.join(missing)}",
                                         "requiredRoles": missing, "rule": rule.describe()})


# --------------------------------------------------------------------------- helpers
def _token_refusal(e: TokenError) -> Refusal:
    who = f" (unverified sub {_shown(e.name)!r})" if e.name else ""
    return Refusal(f"bearer token{who}: {e}", detail=str(e))


def _credentials(headers: list[tuple[bytes, bytes]]) -> tuple[bytes | None, bytes | None, int]:
    """(Authorization, X-API-Key, how many credential headers) in one scan."""
    authorization = api_key = None
    count = 0
    for k, v in headers:
        if k == AUTHORIZATION:
            authorization, count = v, count + 1
        elif k == API_KEY_HEADER:
            api_key, count = v, count + 1
    return authorization, api_key, count


def _without_credentials(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k not in CREDENTIAL_HEADERS]


def _with_identity(scope: Scope, identity: Identity) -> dict[str, Any]:
    out = {**scope, **identity.scope_items}
    out["headers"] = _without_credentials(scope["headers"])
    return out


def _shown(text: str, limit: int = 64) -> str:
    """Client-supplied text fit for one log line (no control characters, bounded)."""
    clean = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return clean + ("..." if len(text) > limit else "")


async def _answer(scope: Scope, send: Send, status: int, body: dict[str, Any],
                  headers: list[tuple[bytes, bytes]] | tuple[()] = ()) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        *headers, (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
