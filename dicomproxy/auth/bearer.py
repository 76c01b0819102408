"""``Authorization: Bearer``: JWT access tokens from an OpenID issuer, checked and mapped to an identity.

A token is accepted when PyJWT verifies, with the issuer's key its header's ``kid`` names
(:mod:`.jwks`): the signature with one of the allowed algorithms (``RS256``/``ES256`` by default;
the algorithm is the key's, never just the header's, and ``none``/HMAC are never accepted),
``iss`` (the configured issuer), ``aud`` (one of the configured audiences), ``exp`` (required),
``nbf``/``iat`` when present, each with ``leeway`` seconds of clock skew.

The claims then give the identity: the name from ``user_claim`` (``sub`` by default), the roles
from ``roles_claim`` (a list or a space-separated string; a dotted path such as
``realm_access.roles`` reaches into an object), through ``role_map`` when one is given (then
only mapped values count: an IdP group called ``admin`` is not the gateway's ``admin`` unless
mapped), plus ``default_roles``.

Checking costs ~0.1 ms (RS256) to ~0.2 ms (ES256) of CPU, so an accepted token is cached until it
expires (``exp`` + leeway): a repeat request costs one keyed BLAKE2b of the token and a dict
lookup. The cache holds at most ``cache_size`` tokens (their digests, not the tokens), least
recently used out; expired entries go first. Refused tokens are not cached (a token may become
valid at ``nbf``; a refusal costs the full check, and the failed-attempt limiter bounds those).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt

from dicomproxy.auth.identity import Identity, Scheme, clean_roles
from dicomproxy.auth.jwks import IssuerKeys

MAX_TOKEN_BYTES = 16384


class TokenError(Exception):
    """A refused token; ``str()`` is the reason (no part of the token), ``name`` the subject if it was readable."""

    def __init__(self, reason: str, name: str | None = None) -> None:
        super().__init__(reason)
        self.name = name


@dataclass(frozen=True)
class ClaimMapping:
    user_claim: str = "sub"
    roles_claim: str = "roles"
    role_map: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    default_roles: frozenset[str] = frozenset()

    def identity(self, claims: dict[str, Any]) -> Identity:
        name = claim(claims, self.user_claim)
        if not isinstance(name, str) or not name:
            raise TokenError(f"no {self.user_claim!r} claim (Authentication:Oidc:UserClaim)")
        values = clean_roles(claim(claims, self.roles_claim))
        if self.role_map:
            values = frozenset(r for v in values for r in self.role_map.get(v, ()))
        return Identity(name, Scheme.BEARER, values | self.default_roles, claims)


def claim(claims: Mapping[str, Any], path: str) -> Any:
    """``claims[path]``, or through nested objects for a dotted path (``realm_access.roles``)."""
    if path in claims:
        return claims[path]
    node: Any = claims
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


class BearerVerifier:
    """Validates bearer tokens against one issuer; see the module docstring."""

    def __init__(self, keys: IssuerKeys, *, audience: tuple[str, ...], algorithms: tuple[str, ...] = ("RS256", "ES256"),
                 leeway: float = 30, mapping: ClaimMapping | None = None, cache_size: int = 10000,
                 clock: Callable[[], float] = time.time) -> None:
        self.keys = keys
        self.issuer = keys.issuer
        self.audience = list(audience)
        self.algorithms = list(algorithms)
        self.leeway = leeway
        self.mapping = mapping or ClaimMapping()
        self.cache_size = cache_size
        self.clock = clock
        self._cache: OrderedDict[bytes, tuple[Identity, float]] = OrderedDict()
        self._key = secrets.token_bytes(32)
        self._swept_at = 0.0

    def cached(self, token: bytes) -> Identity | None:
        """The identity of a token accepted before and not expired (no waiting); TokenError once expired."""
        digest = hashlib.blake2b(token, key=self._key, digest_size=32).digest()
        hit = self._cache.get(digest)
        if hit is None:
            return None
        if self.clock() < hit[1]:
            self._cache.move_to_end(digest)
            return hit[0]
        del self._cache[digest]
        raise TokenError("expired", hit[0].name)

    async def verify(self, token: bytes) -> Identity:
        """The token's identity; TokenError (refused) or KeysUnavailable (cannot check now)."""
        hit = self.cached(token)
        if hit is not None:
            return hit
        digest = hashlib.blake2b(token, key=self._key, digest_size=32).digest()
        identity, until = await self._check(token)
        self._remember(digest, identity, until)
        return identity

    async def _check(self, token: bytes) -> tuple[Identity, float]:
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenError(f"longer than {MAX_TOKEN_BYTES} bytes")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise TokenError("not a JWT") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self.algorithms:
            raise TokenError(f"algorithm {alg!r} not allowed (Authentication:Oidc:Algorithms)")
        key = await self.keys.key(kid if isinstance(kid, str) else None)
        if key is None:
            raise TokenError(f"signed with an unknown key {kid!r}")
        claims = self._decode(token, key, alg)
        return self.mapping.identity(claims), float(claims["exp"]) + self.leeway

    def _decode(self, token: bytes, key: jwt.PyJWK, alg: str) -> dict[str, Any]:
        try:
            return jwt.decode(token, key, algorithms=[alg], audience=self.audience, issuer=self.issuer,
                              leeway=self.leeway, options={"require": ["exp", "iss", "aud"]})
        except jwt.ExpiredSignatureError:
            raise TokenError("expired", _subject(token)) from None
        except jwt.InvalidAudienceError:
            raise TokenError("wrong audience (Authentication:Oidc:Audience)", _subject(token)) from None
        except jwt.InvalidIssuerError:
            raise TokenError("wrong issuer", _subject(token)) from None
        except jwt.ImmatureSignatureError:
            raise TokenError("not valid yet", _subject(token)) from None
        except jwt.MissingRequiredClaimError as e:
            raise TokenError(f"no {e.claim!r} claim", _subject(token)) from None
        except jwt.InvalidSignatureError:
            raise TokenError("bad signature") from None
        except jwt.InvalidTokenError as e:
            raise TokenError(f"invalid: {type(e).__name__}") from None

    def _remember(self, digest: bytes, identity: Identity, until: float) -> None:
        cache = self._cache
        cache[digest] = (identity, until)
        if len(cache) <= self.cache_size:
            return
        now = self.clock()
        if now - self._swept_at >= 1:  # a full cache of live tokens is not scanned per insert
            self._swept_at = now
            for stale in [d for d, (_, t) in cache.items() if t <= now]:
                del cache[stale]
        while len(cache) > self.cache_size:
            cache.popitem(last=False)


def _subject(token: bytes) -> str | None:
    """The unverified ``sub`` of a refused token, for the log line only (never trusted)."""
    try:
        sub = jwt.decode(token, options={"verify_signature": False}).get("sub")
    except (jwt.InvalidTokenError, json.JSONDecodeError):
        return None
    return sub if isinstance(sub, str) and sub.isprintable() and len(sub) <= 200 else None
