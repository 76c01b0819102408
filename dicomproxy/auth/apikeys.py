"""``X-API-Key``: keys the gateway issued, stored in the configuration as SHA-256 hashes.

``Authentication:ApiKeys:{name}`` holds ``{"Hash": "sha256:<64 hex>", "Roles": [...]}``; the key
itself is never stored (``dicomproxy new-api-key`` prints a new key once, with the entry to
paste). A fast hash is right here, unlike for passwords: a key is 32 random bytes (256 bits,
from :func:`secrets.token_urlsafe`), so there is nothing to guess from its hash, and a slow hash
would only cost every request. A presented key is hashed once, looked up by its hash and the
stored hash compared in constant time; the lookup itself can only leak timing about the hash of
what the client sent, never about a valid key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping

from dicomproxy.auth.identity import Identity, Scheme

PREFIX = "sha256:"
KEY_PREFIX = "dpk_"
HEADER = b"x-api-key"
_HASH = re.compile(r"sha256:[0-9a-f]{64}\Z")


def new_key() -> str:
    """A new API key: ``dpk_`` and 43 characters of base64url (32 random bytes)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str | bytes) -> str:
    """What the configuration stores for ``key``: ``sha256:<hex>``."""
    raw = key.encode("utf-8") if isinstance(key, str) else key
    return PREFIX + hashlib.sha256(raw).hexdigest()


def check_hash(text: str) -> str:
    """``text`` if it is a stored key hash (any case of hex), lower-cased; ValueError otherwise."""
    value = text.strip().lower()
    if not _HASH.match(value):
        raise ValueError("sha256:<64 hex digits> (make a key and its hash with `dicomproxy new-api-key`)")
    return value


class ApiKeyVerifier:
    """The configured keys by their hash."""

    def __init__(self, keys: Mapping[str, tuple[str, frozenset[str]]]) -> None:
        """``keys``: name -> (stored hash ``sha256:<hex>``, roles)."""
        self._by_digest: dict[bytes, tuple[bytes, Identity]] = {}
        for name, (stored, roles) in keys.items():
            digest = bytes.fromhex(check_hash(stored)[len(PREFIX):])
            self._by_digest[digest] = (digest, Identity(name, Scheme.API_KEY, roles))

    def __len__(self) -> int:
        return len(self._by_digest)

    def verify(self, key: bytes) -> Identity | None:
        digest = hashlib.sha256(key.strip()).digest()
        found = self._by_digest.get(digest)
        if found is None or not hmac.compare_digest(found[0], digest):
            return None
        return found[1]
