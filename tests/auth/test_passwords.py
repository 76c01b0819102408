"""Stored password forms: each hash kind parses, checks right and wrong, and a broken hash is refused."""

from __future__ import annotations

import base64
import hashlib

import argon2
import bcrypt
import pytest

from dicomproxy.auth.passwords import Kind, hash_password, parse_stored

FAST_ARGON2 = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def django_pbkdf2(password: str, salt: str = "somesalt", iterations: int = 1000) -> str:
    raw = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return f"pbkdf2_sha256${iterations}${salt}${base64.b64encode(raw).decode()}"


def passlib_pbkdf2(password: str, digest: str = "sha256", iterations: int = 1000) -> str:
    salt = b"\x01\x02salt+/\xff"
    raw = hashlib.pbkdf2_hmac(digest, password.encode(), salt, iterations)
    ab64 = [base64.b64encode(b).decode().rstrip("=").replace("+", ".") for b in (salt, raw)]
    return f"$pbkdf2-{digest}${iterations}${ab64[0]}${ab64[1]}"


@pytest.mark.parametrize("stored,kind", [
    (FAST_ARGON2.hash("pw-1"), Kind.ARGON2),
    (bcrypt.hashpw(b"pw-1", bcrypt.gensalt(4)).decode(), Kind.BCRYPT),
    (bcrypt.hashpw(b"pw-1", bcrypt.gensalt(4, prefix=b"2a")).decode(), Kind.BCRYPT),
    (django_pbkdf2("pw-1"), Kind.PBKDF2),
    (passlib_pbkdf2("pw-1"), Kind.PBKDF2),
    (passlib_pbkdf2("pw-1", "sha512"), Kind.PBKDF2),
    ("pw-1", Kind.PLAIN),
], ids=["argon2id", "bcrypt-2b", "bcrypt-2a", "pbkdf2-django", "pbkdf2-passlib", "pbkdf2-passlib-sha512", "plain"])
def test_each_form_checks_the_right_password_only(stored: str, kind: Kind) -> None:
    parsed = parse_stored(stored)
    assert parsed.kind is kind and parsed.slow is (kind is not Kind.PLAIN)
    assert parsed.verify(b"pw-1")
    assert not parsed.verify(b"pw-2") and not parsed.verify(b"") and not parsed.verify(b"pw-1 ")


@pytest.mark.parametrize("broken", [
    "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA",
    "$2b$12$tooshort",
    "$pbkdf2-sha256$many$salt$hash",
    "$pbkdf2-sha256$1000$c2FsdA",
    "pbkdf2_sha256$1000$salt$not base64!",
    "pbkdf2_sha256$0$salt$aGFzaA==",
])
def test_a_value_that_starts_like_a_hash_but_is_broken_is_refused(broken: str) -> None:
    with pytest.raises(ValueError, match="hash like"):
        parse_stored(broken)


@pytest.mark.parametrize("kind", [Kind.BCRYPT, Kind.PBKDF2])
def test_hash_password_makes_a_hash_the_parser_accepts(kind: Kind) -> None:
    stored = hash_password("correct horse", kind)
    assert parse_stored(stored).kind is kind and parse_stored(stored).verify(b"correct horse")


def test_hash_password_argon2id_by_default() -> None:
    stored = hash_password("correct horse")
    assert stored.startswith("$argon2id$") and parse_stored(stored).verify(b"correct horse")


def test_bcrypt_refuses_to_hash_a_password_it_would_cut() -> None:
    with pytest.raises(ValueError, match="72 bytes"):
        hash_password("x" * 73, Kind.BCRYPT)
