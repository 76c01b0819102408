"""Basic users: header parsing, the verified-hash cache (bounded, keyed) and that slow checks leave the loop."""

from __future__ import annotations

import asyncio
import base64
import threading

import bcrypt

from dicomproxy.auth.basic import BasicVerifier, VerifiedCache, parse_basic
from dicomproxy.auth.identity import Scheme
from dicomproxy.auth.passwords import StoredPassword, parse_stored


def test_parse_basic() -> None:
    assert parse_basic(base64.b64encode(b"alice:pa:ss")) == ("alice", b"pa:ss")
    assert parse_basic(b" " + base64.b64encode(b"bob:") + b" ") == ("bob", b"")
    assert parse_basic(base64.b64encode(b"no-colon")) is None
    assert parse_basic(b"!!!") is None
    assert parse_basic(base64.b64encode(b"\xff:pw")) is None


class CountingStored(StoredPassword):
    """A bcrypt hash whose checks are counted, with the thread each ran on."""

    calls: list[str]

    def verify(self, password: bytes) -> bool:
        self.calls.append(threading.current_thread().name)
        return super().verify(password)


def counting(password: bytes) -> CountingStored:
    base = parse_stored(bcrypt.hashpw(password, bcrypt.gensalt(4)).decode())
    stored = CountingStored(base.kind, base.text)
    object.__setattr__(stored, "calls", [])
    return stored


async def test_a_hash_is_checked_once_off_the_loop_then_cached() -> None:
    stored = counting(b"s3cret")
    v = BasicVerifier.from_passwords({"alice": (stored, frozenset({"viewer"}))})
    loop_thread = threading.current_thread().name
    first = await v.verify("alice", b"s3cret")
    assert first is not None and first.scheme is Scheme.BASIC and first.roles == {"viewer"}
    assert len(stored.calls) == 1 and stored.calls[0] != loop_thread
    for _ in range(5):
        assert await v.verify("alice", b"s3cret") is first
    assert len(stored.calls) == 1, "a cached check ran the hash again"
    assert await v.verify("alice", b"wrong") is None
    assert await v.verify("alice", b"wrong") is None
    assert len(stored.calls) == 3, "a wrong password must run the hash every time (never cached)"


async def test_an_unknown_user_costs_a_check_too() -> None:
    stored = counting(b"s3cret")
    v = BasicVerifier.from_passwords({"alice": (stored, frozenset())})
    assert await v.verify("mallory", b"s3cret") is None
    assert len(stored.calls) == 1


async def test_plain_passwords_are_compared_on_the_loop() -> None:
    v = BasicVerifier.from_passwords({"bob": (parse_stored("pw"), frozenset())})
    assert (await v.verify("bob", b"pw")) is not None and await v.verify("bob", b"pw!") is None
    assert len(v.cache) == 0


async def test_slow_checks_run_two_at_a_time() -> None:
    running, peak = 0, 0
    lock = threading.Lock()
    release = threading.Event()

    class Held(StoredPassword):
        def verify(self, password: bytes) -> bool:
            nonlocal running, peak
            with lock:
                running += 1
                peak = max(peak, running)
            release.wait(5)
            with lock:
                running -= 1
            return False

    stored = Held(parse_stored("$2b$04$" + "a" * 53).kind, "$2b$04$" + "a" * 53)
    v = BasicVerifier.from_passwords({"alice": (stored, frozenset())})
    tasks = [asyncio.create_task(v.verify("alice", f"pw{i}".encode())) for i in range(6)]
    while True:  # wait until two checks are inside the hash
        with lock:
            if running == 2:
                break
        await asyncio.sleep(0.01)
    release.set()
    assert await asyncio.gather(*tasks) == [None] * 6
    assert peak == 2


def test_the_cache_is_bounded_and_keyed() -> None:
    cache = VerifiedCache(size=3)
    digests = [cache.digest("u", f"pw{i}".encode()) for i in range(5)]
    for d in digests:
        cache.add(d)
    assert len(cache) == 3 and digests[0] not in cache and digests[4] in cache
    assert cache.digest("u", b"pw") != VerifiedCache().digest("u", b"pw"), "the digest key is per process"
    assert cache.digest("u", b"a:b") != cache.digest("u:a", b"b")
