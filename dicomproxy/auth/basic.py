"""HTTP basic users: the ``Authorization: Basic`` header checked against ``Authentication:Users``.

Checking a hashed password takes a large fraction of a second of CPU (see
:mod:`~dicomproxy.auth.passwords`), far too much per request. So:

* a successful check is remembered in a :class:`VerifiedCache`: the key is a keyed BLAKE2b
  digest of (user, password) under a random key made at start-up, so the cache holds neither
  the password nor a digest that could be attacked offline without that key; it is bounded
  (:data:`CACHE_SIZE` entries, ~100 bytes each: under 1 MB) and evicts the least recently used.
  A repeat request with the same credentials costs one BLAKE2b (~1 us) and a dict lookup;
* a check that must run the hash runs in a worker thread (never on the event loop), at most
  :data:`SLOW_CHECKS` at once, so a burst of wrong passwords cannot take every thread or core;
  the failed-attempt limiter (:mod:`.ratelimit`) bounds how many one address may try;
* an unknown user name costs the same as a wrong password (a dummy check against one of the
  configured hashes), so the timing does not tell which names exist.

A plain password is compared in constant time on the loop, as before.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from dicomproxy.auth.identity import Identity, Scheme
from dicomproxy.auth.passwords import StoredPassword

CACHE_SIZE = 4096
SLOW_CHECKS = 2


@dataclass(frozen=True)
class BasicUser:
    stored: StoredPassword
    identity: Identity


class VerifiedCache:
    """Digests of (user, password) pairs that passed a slow check; bounded, least recently used out."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, None] = OrderedDict()

    def digest(self, name: str, password: bytes) -> bytes:
        return hashlib.blake2b(name.encode("utf-8") + b"\0" + password, key=self._key, digest_size=32).digest()

    def __contains__(self, digest: bytes) -> bool:
        if digest in self._entries:
            self._entries.move_to_end(digest)
            return True
        return False

    def add(self, digest: bytes) -> None:
        self._entries[digest] = None
        self._entries.move_to_end(digest)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def parse_basic(credentials: bytes) -> tuple[str, bytes] | None:
    """(user, password) from the part of an ``Authorization`` header after ``Basic ``; None if malformed."""
    try:
        # binascii in strict mode: what base64.b64decode(validate=True) checks, without its regex (~3x faster)
        decoded = binascii.a2b_base64(credentials.strip(), strict_mode=True)
        name, sep, password = decoded.partition(b":")
        return (name.decode("utf-8"), password) if sep else None
    except (binascii.Error, UnicodeDecodeError):
        return None


class BasicVerifier:
    """Checks basic credentials against the configured users; see the module docstring."""

    def __init__(self, users: Mapping[str, BasicUser], cache_size: int = CACHE_SIZE) -> None:
        self.users = dict(users)
        self.cache = VerifiedCache(cache_size)
        self._slots = asyncio.Semaphore(SLOW_CHECKS)
        self._dummy = next((u.stored for u in self.users.values() if u.stored.slow), None)

    @classmethod
    def from_passwords(cls, users: Mapping[str, tuple[StoredPassword, frozenset[str]]]) -> BasicVerifier:
        return cls({name: BasicUser(stored, Identity(name, Scheme.BASIC, roles))
                    for name, (stored, roles) in users.items()})

    def check(self, name: str, password: bytes) -> Identity | None | bool:
        """Without waiting: the identity, None (refused), or True when a slow check is needed
        (then :meth:`verify`). A plain password or a cached hash never needs one."""
        user = self.users.get(name)
        if user is None:
            return True if self._dummy is not None else None
        stored = user.stored
        if stored.plain is not None:
            return user.identity if hmac.compare_digest(stored.plain, password) else None
        return user.identity if self.cache.digest(name, password) in self.cache else True

    async def verify(self, name: str, password: bytes) -> Identity | None:
        """The identity for these credentials, or None; runs the slow check when needed."""
        quick = self.check(name, password)
        if quick is not True:
            return quick if isinstance(quick, Identity) else None
        user = self.users.get(name)
        if user is None:
            assert self._dummy is not None
            await self._slow(self._dummy, password)
            return None
        if not await self._slow(user.stored, password):
            return None
        self.cache.add(self.cache.digest(name, password))
        return user.identity

    async def _slow(self, stored: StoredPassword, password: bytes) -> bool:
        async with self._slots:
            return await asyncio.to_thread(stored.verify, password)
