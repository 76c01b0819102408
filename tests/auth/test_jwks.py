"""The issuer's keys: discovery checks, refresh on an unknown kid at most once per interval, one fetch
for concurrent requests, stale keys kept when the issuer is down."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from dicomproxy.auth.jwks import IssuerKeys, KeysUnavailable, parse_jwks

ISSUER = "https://idp.example"


def rsa_jwk(kid: str) -> dict[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    return {**json.loads(RSAAlgorithm.to_jwk(key)), "kid": kid, "alg": "RS256", "use": "sig"}


def ec_jwk(kid: str) -> dict[str, Any]:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return {**json.loads(ECAlgorithm.to_jwk(key)), "kid": kid, "alg": "ES256"}


class Issuer:
    """A fake fetch (this is a unit test of the cache; the real issuer is in tests/e2e/test_identity.py)."""

    def __init__(self, *keys: dict[str, Any]) -> None:
        self.keys = list(keys)
        self.urls: list[str] = []
        self.down = False
        self.meta_issuer = ISSUER
        self.jwks_uri = "https://idp.example/jwks"
        self.gate: asyncio.Event | None = None

    async def __call__(self, url: str) -> Any:
        self.urls.append(url)
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise KeysUnavailable("down")
        if url.endswith("/.well-known/openid-configuration"):
            return {"issuer": self.meta_issuer, "jwks_uri": self.jwks_uri}
        return {"keys": self.keys}

    def jwks_fetches(self) -> int:
        return sum(1 for u in self.urls if u.endswith("/jwks"))


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_keys_by_kid_and_unknown_kid_refresh_is_rate_limited() -> None:
    idp, clock = Issuer(rsa_jwk("a")), Clock()
    keys = IssuerKeys(ISSUER, idp, min_interval=30, clock=clock)
    assert (await keys.key("a")) is not None and idp.jwks_fetches() == 1
    assert idp.urls[0] == ISSUER + "/.well-known/openid-configuration"
    for i in range(50):  # a flood of made-up kids
        assert await keys.key(f"bogus-{i}") is None
    assert idp.jwks_fetches() == 1, "an unknown kid refetched inside the interval"
    idp.keys.append(ec_jwk("b"))  # the issuer rotates
    clock.now += 30
    assert (await keys.key("b")) is not None and idp.jwks_fetches() == 2
    assert await keys.key(None) is None, "no kid with several keys: no guess"


async def test_concurrent_unknown_kids_share_one_fetch() -> None:
    idp, clock = Issuer(rsa_jwk("a")), Clock()
    keys = IssuerKeys(ISSUER, idp, min_interval=30, clock=clock)
    await keys.key("a")
    clock.now += 31
    idp.keys.append(rsa_jwk("new"))
    idp.gate = asyncio.Event()
    waiting = [asyncio.create_task(keys.key("new")) for _ in range(20)]
    await asyncio.sleep(0.05)
    idp.gate.set()
    assert all(k is not None for k in await asyncio.gather(*waiting))
    assert idp.jwks_fetches() == 2


async def test_issuer_down_first_is_unavailable_then_stale_keys_are_kept() -> None:
    idp, clock = Issuer(rsa_jwk("a")), Clock()
    idp.down = True
    keys = IssuerKeys(ISSUER, idp, min_interval=30, max_age=600, clock=clock)
    with pytest.raises(KeysUnavailable):
        await keys.key("a")
    with pytest.raises(KeysUnavailable):
        await keys.key("a")  # inside the interval: no new attempt, still unavailable
    assert len(idp.urls) == 1 and keys.status()["ok"] is False and keys.status()["error"] == "down"
    clock.now += 30
    idp.down = False
    assert await keys.key("a") is not None and keys.status()["ok"] is True
    clock.now += 700  # older than max_age, issuer down again: the old keys still serve
    idp.down = True
    assert await keys.key("a") is not None


@pytest.mark.parametrize("meta_issuer,jwks_uri,allow_http,why", [
    ("https://other.example", "https://idp.example/jwks", False, "names issuer"),
    (ISSUER, "http://idp.example/jwks", False, "not an https URL"),
])
async def test_discovery_is_checked(meta_issuer: str, jwks_uri: str, allow_http: bool, why: str) -> None:
    idp = Issuer(rsa_jwk("a"))
    idp.meta_issuer, idp.jwks_uri = meta_issuer, jwks_uri
    keys = IssuerKeys(ISSUER, idp, allow_http=allow_http, clock=Clock())
    with pytest.raises(KeysUnavailable, match=why):
        await keys.key("a")


def test_parse_jwks_skips_what_it_cannot_use() -> None:
    good = rsa_jwk("a")
    keys = parse_jwks({"keys": [good, {**ec_jwk("enc"), "use": "enc"}, {"kty": "oct", "k": "c2VjcmV0", "kid": "h"},
                                {"kty": "nonsense"}, "x"]}, "test")
    assert list(keys) == ["a"] or set(keys) == {"a", "h"}
    with pytest.raises(KeysUnavailable):
        parse_jwks({"keys": []}, "test")
    with pytest.raises(KeysUnavailable):
        parse_jwks(["not", "jwks"], "test")
