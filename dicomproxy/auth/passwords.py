"""Stored passwords: the formats ``Authentication:Users:{name}:Password`` accepts, checked and made.

A password in the configuration is either the password itself (a warning at start-up says
which users) or one of these encoded hashes, recognised by their prefix:

=========================  =====================================================  ===============
form                       example                                                checked by
=========================  =====================================================  ===============
argon2 (PHC string)        ``$argon2id$v=19$m=65536,t=3,p=4$<salt>$<hash>``        argon2-cffi
                           (``$argon2i$``, ``$argon2d$`` too)
bcrypt                     ``$2b$12$<53 characters>`` (``$2a$``, ``$2y$`` too)     bcrypt
pbkdf2, passlib's form     ``$pbkdf2-sha256$<rounds>$<ab64 salt>$<ab64 hash>``     hashlib
                           (``$pbkdf2-sha512$``, ``$pbkdf2$`` = SHA-1)
pbkdf2, Django's form      ``pbkdf2_sha256$<iterations>$<salt>$<base64 hash>``     hashlib
                           (``pbkdf2_sha1$`` too)
=========================  =====================================================  ===============

A value that starts like a hash but does not parse is a configuration error (it is not taken
as a plain password). bcrypt only ever looks at a password's first 72 bytes (every bcrypt does;
``dicomproxy hash-password`` refuses longer ones for bcrypt). Checking a hash is deliberately
slow: with the defaults of ``dicomproxy hash-password`` one check took argon2id (64 MiB)
~0.6 s, bcrypt (cost 12) ~0.5 s, pbkdf2-sha256 (600,000 rounds) ~0.4 s on this 2-core shared
machine, so :mod:`dicomproxy.auth.basic` runs it off the event loop and caches the result.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import StrEnum

import argon2
import bcrypt

BCRYPT_MAX_BYTES = 72
PBKDF2_ITERATIONS = 600_000  # OWASP 2023 for PBKDF2-HMAC-SHA256

_PASSLIB_PBKDF2 = {"$pbkdf2$": "sha1", "$pbkdf2-sha256$": "sha256", "$pbkdf2-sha512$": "sha512"}
_DJANGO_PBKDF2 = {"pbkdf2_sha1$": "sha1", "pbkdf2_sha256$": "sha256"}
_HASHER = argon2.PasswordHasher()

FORMS = ("$argon2id$…", "$2b$…", "$pbkdf2-sha256$…", "pbkdf2_sha256$…")


class Kind(StrEnum):
    PLAIN = "plain"
    ARGON2 = "argon2"
    BCRYPT = "bcrypt"
    PBKDF2 = "pbkdf2"


@dataclass(frozen=True)
class StoredPassword:
    """A parsed ``Password`` value: its kind and what checking it needs."""

    kind: Kind
    text: str
    digest: str = ""  # pbkdf2: the hash function
    iterations: int = 0
    salt: bytes = b""
    expected: bytes = b""

    @property
    def slow(self) -> bool:
        """Worth running off the event loop and caching (everything but a plain password)."""
        return self.kind is not Kind.PLAIN

    @property
    def plain(self) -> bytes | None:
        """A plain password's bytes (None for a hash), for the basic check's fast path."""
        return self.expected if self.kind is Kind.PLAIN else None

    def verify(self, password: bytes) -> bool:
        """Does ``password`` match? Constant time for the comparison itself; may take ~0.1 s."""
        if self.kind is Kind.PLAIN:
            return hmac.compare_digest(self.expected, password)
        if self.kind is Kind.ARGON2:
            try:
                return _HASHER.verify(self.text, password)
            except argon2.exceptions.VerificationError:
                return False
        if self.kind is Kind.BCRYPT:
            return bcrypt.checkpw(password[:BCRYPT_MAX_BYTES], self.text.encode("ascii"))
        got = hashlib.pbkdf2_hmac(self.digest, password, self.salt, self.iterations, len(self.expected))
        return hmac.compare_digest(got, self.expected)


def parse_stored(text: str) -> StoredPassword:
    """The stored password ``text`` (plain or one of the hash forms); ValueError for a broken hash."""
    if text.startswith("$argon2"):
        try:
            argon2.extract_parameters(text)
        except argon2.exceptions.InvalidHashError:
            raise ValueError("an argon2 hash like $argon2id$v=19$m=65536,t=3,p=4$<salt>$<hash>") from None
        return StoredPassword(Kind.ARGON2, text)
    if text[:4] in ("$2a$", "$2b$", "$2y$"):
        parts = text.split("$")
        if len(parts) != 4 or not parts[2].isdigit() or len(parts[3]) != 53:
            raise ValueError("a bcrypt hash like $2b$12$<53 characters>")
        return StoredPassword(Kind.BCRYPT, text)
    for prefix, digest in _PASSLIB_PBKDF2.items():
        if text.startswith(prefix):
            return _pbkdf2(text, digest, text[len(prefix):], _ab64, f"{prefix}<rounds>$<salt>$<hash> (passlib)")
    for prefix, digest in _DJANGO_PBKDF2.items():
        if text.startswith(prefix):
            return _pbkdf2(text, digest, text[len(prefix):], None, f"{prefix}<iterations>$<salt>$<hash> (Django)")
    return StoredPassword(Kind.PLAIN, text, expected=text.encode("utf-8"))


def hash_password(password: str, kind: Kind = Kind.ARGON2) -> str:
    """A new encoded hash of ``password`` (what ``dicomproxy hash-password`` prints)."""
    raw = password.encode("utf-8")
    if kind is Kind.ARGON2:
        return _HASHER.hash(raw)
    if kind is Kind.BCRYPT:
        if len(raw) > BCRYPT_MAX_BYTES:
            raise ValueError(f"bcrypt only uses the first {BCRYPT_MAX_BYTES} bytes of a password; use argon2")
        return bcrypt.hashpw(raw, bcrypt.gensalt(12)).decode("ascii")
    if kind is Kind.PBKDF2:
        salt = secrets.token_bytes(16)
        out = hashlib.pbkdf2_hmac("sha256", raw, salt, PBKDF2_ITERATIONS)
        return f"$pbkdf2-sha256${PBKDF2_ITERATIONS}${_ab64_encode(salt)}${_ab64_encode(out)}"
    raise ValueError(f"cannot hash with {kind}")


# --------------------------------------------------------------------------- pbkdf2 forms
def _pbkdf2(text: str, digest: str, rest: str, salt_codec: object, form: str) -> StoredPassword:
    parts = rest.split("$")
    try:
        if len(parts) != 3 or not parts[0].isdigit() or int(parts[0]) < 1:
            raise ValueError
        salt = _ab64(parts[1]) if salt_codec is not None else parts[1].encode("utf-8")
        expected = _ab64(parts[2]) if salt_codec is not None else base64.b64decode(parts[2], validate=True)
    except (ValueError, binascii.Error):
        raise ValueError(f"a pbkdf2 hash like {form}") from None
    if not expected:
        raise ValueError(f"a pbkdf2 hash like {form}")
    return StoredPassword(Kind.PBKDF2, text, digest, int(parts[0]), salt, expected)


def _ab64(text: str) -> bytes:
    """passlib's "adapted base64": ``.`` for ``+``, no padding."""
    padded = text.replace(".", "+") + "=" * (-len(text) % 4)
    return base64.b64decode(padded, validate=True)


def _ab64_encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=").replace("+", ".")
