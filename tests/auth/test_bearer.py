"""Bearer tokens: what is checked (signature, alg, iss, aud, exp, nbf), the claim mapping, the cache."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from dicomproxy.auth.bearer import BearerVerifier, ClaimMapping, TokenError
from dicomproxy.auth.identity import Scheme
from dicomproxy.auth.jwks import IssuerKeys

ISSUER = "https://idp.example"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwks() -> dict[str, Any]:
    return {"keys": [{**json.loads(RSAAlgorithm.to_jwk(RSA_KEY.public_key())), "kid": "r", "alg": "RS256"},
                     {**json.loads(ECAlgorithm.to_jwk(EC_KEY.public_key())), "kid": "e", "alg": "ES256"}]}


async def fetch(url: str) -> Any:  # a fake issuer: the real one is in tests/e2e/test_identity.py
    return {"issuer": ISSUER, "jwks_uri": ISSUER + "/jwks"} if "well-known" in url else jwks()


class Clock:
    def __init__(self) -> None:
        self.now = time.time()  # when the test runs, not when the module was imported (xdist imports early)

    def __call__(self) -> float:
        return self.now


def token(claims: dict[str, Any] | None = None, key: Any = RSA_KEY, alg: str = "RS256", kid: str = "r",
          drop: tuple[str, ...] = ()) -> bytes:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": "dicomproxy", "sub": "u-1", "exp": now + 300, "iat": now, **(claims or {})}
    for name in drop:
        body.pop(name)
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid}).encode()


def verifier(mapping: ClaimMapping | None = None, clock: Clock | None = None, **kw: Any) -> BearerVerifier:
    keys = IssuerKeys(ISSUER, fetch, min_interval=1000)
    return BearerVerifier(keys, audience=("dicomproxy", "other"), leeway=5, mapping=mapping,
                          clock=clock or time.time, **kw)


async def test_rs256_and_es256_tokens_give_an_identity_with_claims() -> None:
    v = verifier()
    for t in (token({"roles": ["viewer", "x y", 3]}), token({"roles": "viewer"}, EC_KEY, "ES256", "e")):
        ident = await v.verify(t)
        assert (ident.name, ident.scheme, ident.roles) == ("u-1", Scheme.BEARER, {"viewer"})
        assert ident.claims["iss"] == ISSUER


@pytest.mark.parametrize("bad,reason", [
    (lambda: token({"exp": int(time.time()) - 60}), "expired"),
    (lambda: token({"aud": "someone-else"}), "wrong audience"),
    (lambda: token({"iss": "https://evil.example"}), "wrong issuer"),
    (lambda: token({"nbf": int(time.time()) + 600}), "not valid yet"),
    (lambda: token(drop=("exp",)), "no 'exp' claim"),
    (lambda: token(drop=("aud",)), "no 'aud' claim"),
    (lambda: token(key=OTHER_KEY), "bad signature"),
    (lambda: token(kid="unknown"), "unknown key"),
    (lambda: token(key=RSA_KEY, alg="RS256", kid="e"), "invalid"),  # an RSA signature under the EC key's kid
    (lambda: jwt.encode({"iss": ISSUER}, "s" * 32, algorithm="HS256").encode(), "algorithm 'HS256' not allowed"),
    (lambda: jwt.encode({"iss": ISSUER, "aud": "dicomproxy", "exp": 2**40}, None, algorithm="none").encode(),
     "algorithm 'none' not allowed"),
    (lambda: b"not-a-jwt", "not a JWT"),
    (lambda: token({"sub": ""}), "no 'sub' claim"),
], ids=["expired", "audience", "issuer", "nbf", "no-exp", "no-aud", "signature", "kid", "alg-vs-key", "hs256", "none",
        "garbage", "no-sub"])
async def test_refused_tokens(bad: Any, reason: str) -> None:
    with pytest.raises(TokenError, match=reason):
        await verifier().verify(bad())


async def test_leeway_applies_to_exp() -> None:
    assert (await verifier().verify(token({"exp": int(time.time()) - 2}))).name == "u-1"


async def test_claim_mapping_nested_claims_role_map_and_default_roles() -> None:
    mapping = ClaimMapping("preferred_username", "realm_access.roles",
                           {"pacs-admins": ("admin",), "radiology": ("viewer", "uploader")}, frozenset({"viewer"}))
    v = verifier(mapping)
    ident = await v.verify(token({"preferred_username": "dr.who", "realm_access": {"roles": ["pacs-admins", "admin"]}}))
    assert ident.name == "dr.who" and ident.roles == {"admin", "viewer"}, "only mapped values give roles"
    ident = await v.verify(token({"preferred_username": "n", "realm_access": {"roles": "radiology"}}))
    assert ident.roles == {"viewer", "uploader"}
    with pytest.raises(TokenError, match="preferred_username"):
        await v.verify(token())


async def test_accepted_tokens_are_cached_until_they_expire_and_the_cache_is_bounded() -> None:
    clock = Clock()
    v = verifier(clock=clock, cache_size=3)
    t = token({"exp": int(clock.now) + 60})
    first = await v.verify(t)
    v.keys = None  # type: ignore[assignment]  # a cache hit must not need the keys
    assert await v.verify(t) is first
    clock.now += 66  # past exp + leeway
    with pytest.raises(TokenError, match="expired"):
        await v.verify(t)
    v.keys = IssuerKeys(ISSUER, fetch)
    for i in range(10):
        await v.verify(token({"sub": f"s{i}"}))
    assert len(v._cache) == 3
