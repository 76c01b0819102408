"""The failed-attempt limiter: burst, refill, Retry-After, IPv6 /64, bounded table."""

from __future__ import annotations

from dicomproxy.auth.ratelimit import FailureLimiter, address_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_429_until_a_token_returns() -> None:
    clock = Clock()
    lim = FailureLimiter(burst=3, per_minute=6, clock=clock)  # a token every 10 s
    for _ in range(3):
        assert lim.retry_after("10.0.0.1") == 0
        lim.failed("10.0.0.1")
    assert lim.retry_after("10.0.0.1") == 10
    assert lim.retry_after("10.0.0.2") == 0, "another address is not affected"
    clock.now += 9.5
    assert lim.retry_after("10.0.0.1") == 1
    clock.now += 0.5
    assert lim.retry_after("10.0.0.1") == 0
    lim.failed("10.0.0.1")
    assert lim.retry_after("10.0.0.1") == 10


def test_ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() -> None:
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:10.1.2.3") == "10.1.2.3" and address_key("10.1.2.3") == "10.1.2.3"
    lim = FailureLimiter(burst=1, clock=Clock())
    lim.failed("2001:db8:1:2::1")
    assert lim.retry_after("2001:db8:1:2::ffff") > 0


def test_the_table_is_bounded_oldest_failure_out() -> None:
    lim = FailureLimiter(burst=1, max_addresses=100, clock=Clock())
    for i in range(1000):
        lim.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(lim) == 100
    assert lim.retry_after("10.0.3.231") > 0 and lim.retry_after("10.0.0.0") == 0


def test_burst_zero_is_off() -> None:
    lim = FailureLimiter(burst=0)
    for _ in range(100):
        lim.failed("h")
    assert lim.retry_after("h") == 0 and len(lim) == 0
