"""Which logins are recorded, and bursts of failures."""

from __future__ import annotations

from dicomproxy.audit.logins import MAX_TRACKED, LoginWatch


def test_success_once_per_pair_and_quiet_interval() -> None:
    w = LoginWatch(burst=3, window=10, success_interval=60)
    assert w.success("alice", "1.1.1.1", 0)
    assert not w.success("alice", "1.1.1.1", 30)
    assert w.success("alice", "2.2.2.2", 31)
    assert not w.success("alice", "1.1.1.1", 89)  # 59 s after the last request
    assert w.success("alice", "1.1.1.1", 150)
    assert LoginWatch(3, 10, 0).success("a", "b", 0)


def test_burst_within_window_alerts_once_then_counts_again() -> None:
    w = LoginWatch(burst=3, window=10, success_interval=60)
    assert [w.failure("9.9.9.9", t) for t in (0, 1, 2)] == [0, 0, 3]
    assert [w.failure("9.9.9.9", t) for t in (3, 4)] == [0, 0]
    assert w.failure("9.9.9.9", 5) == 3
    assert [w.failure("8.8.8.8", t) for t in (0, 20, 40)] == [0, 0, 0]  # spread out: no burst


def test_tables_are_bounded() -> None:
    w = LoginWatch(burst=2, window=10, success_interval=60)
    for i in range(MAX_TRACKED + 50):
        w.failure(f"10.0.{i // 256}.{i % 256}", 0)
        w.success("u", str(i), 0)
    assert len(w._failures) <= MAX_TRACKED and len(w._seen) <= MAX_TRACKED
