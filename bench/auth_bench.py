"""CPU per request of the authentication layer, in process: the old basic-auth middleware
(``dicomproxy/http/auth.py`` as of git ``main`` before dicomproxy/auth/) against the new one.

    python bench/auth_bench.py [--requests 20000] [--rounds 5]

Each round times every case once, in alternation (the machine is shared: compare ratios from
the same run, not absolute figures). A request is one ASGI call with 8 ordinary headers and the
credential, through the layer to an app that answers at once; the app's own cost is measured
and subtracted. Cases: basic with a plain password (old and new), basic with a bcrypt hash seen
before (new: the verified cache), an API key, a bearer token seen before (the token cache).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import bcrypt
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicomproxy.auth.apikeys import ApiKeyVerifier, hash_key  # noqa: E402
from dicomproxy.auth.basic import BasicVerifier  # noqa: E402
from dicomproxy.auth.bearer import BearerVerifier  # noqa: E402
from dicomproxy.auth.jwks import IssuerKeys  # noqa: E402
from dicomproxy.auth.middleware import AuthMiddleware, Schemes  # noqa: E402
from dicomproxy.auth.passwords import parse_stored  # noqa: E402
from dicomproxy.auth.policy import Policy, builtin_rules  # noqa: E402
from dicomproxy.auth.ratelimit import FailureLimiter  # noqa: E402

OLD_COMMIT = "94e876e"
HEADERS = [(b"host", b"gw"), (b"user-agent", b"bench"), (b"accept", b"application/dicom+json"),
           (b"accept-encoding", b"gzip"), (b"connection", b"keep-alive"), (b"x-request-id", b"abc"),
           (b"cache-control", b"no-cache"), (b"origin", b"https://viewer")]


def old_middleware() -> Any:
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:dicomproxy/http/auth.py"],
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("old_auth")
    exec(compile(source, "old_auth.py", "exec"), module.__dict__)
    return module.BasicAuthMiddleware


async def app(scope: Any, receive: Any, send: Any) -> None:
    return None


def cases() -> dict[str, tuple[Any, list[tuple[bytes, bytes]]]]:
    key = "dpk_" + "k" * 43
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**json.loads(RSAAlgorithm.to_jwk(private.public_key())), "kid": "k", "alg": "RS256"}

    async def fetch(url: str) -> Any:
        return {"issuer": "https://idp", "jwks_uri": "https://idp/jwks"} if "well-known" in url else {"keys": [jwk]}

    claims = {"iss": "https://idp", "aud": "gw", "sub": "t", "exp": int(time.time()) + 3600, "roles": ["viewer"]}
    token = jwt.encode(claims, private, algorithm="RS256", headers={"kid": "k"})
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    schemes = Schemes(
        basic=BasicVerifier.from_passwords({"alice": (parse_stored("s3cret"), frozenset({"viewer"})),
                                            "hashed": (parse_stored(hashed), frozenset({"viewer"}))}),
        api_keys=ApiKeyVerifier({"tool": (hash_key(key), frozenset({"viewer"}))}),
        bearer=BearerVerifier(IssuerKeys("https://idp", fetch), audience=("gw",)))
    new = AuthMiddleware(app, schemes, Policy((), builtin_rules()), FailureLimiter())
    old = old_middleware()(app, {"alice": "s3cret"}, "DicomProxy", {"alice": ("viewer",)})

    def basic(user: str) -> list[tuple[bytes, bytes]]:
        return [*HEADERS, (b"authorization", b"Basic " + base64.b64encode(f"{user}:s3cret".encode()))]

    return {
        "old basic, plain password": (old, basic("alice")),
        "new basic, plain password": (new, basic("alice")),
        "new basic, bcrypt (cached)": (new, basic("hashed")),
        "new X-API-Key": (new, [*HEADERS, (b"x-api-key", key.encode())]),
        "new bearer RS256 (cached)": (new, [*HEADERS, (b"authorization", f"Bearer {token}".encode())]),
        "(the app alone)": (app, HEADERS),
    }


async def run(layer: Any, headers: list[tuple[bytes, bytes]], n: int) -> float:
    scope = {"type": "http", "method": "GET", "path": "/dicom-web/studies", "headers": headers,
             "client": ("10.0.0.1", 1234), "query_string": b""}
    start = time.process_time()
    for _ in range(n):
        await layer(scope, None, None)
    return (time.process_time() - start) / n * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    table = cases()
    for layer, headers in table.values():  # warm the caches (and fetch the keys)
        await run(layer, headers, 10)
    results: dict[str, list[float]] = {name: [] for name in table}
    for _ in range(args.rounds):
        for name, (layer, headers) in table.items():
            results[name].append(await run(layer, headers, args.requests))
    base = statistics.median(results["(the app alone)"])
    old = statistics.median(results["old basic, plain password"]) - base
    print(f"{'case':32} {'us/request':>11} {'vs old basic':>13}")
    for name, values in results.items():
        own = statistics.median(values) - (base if name != "(the app alone)" else 0)
        print(f"{name:32} {own:11.2f} {own / old:12.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
