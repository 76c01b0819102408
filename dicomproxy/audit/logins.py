"""Which logins become audit records, and when failures from one address are a burst.

HTTP basic authentication sends the password with every request, so a User Authentication
record per request would bury the trail (a viewer loading a study makes hundreds). A success
is recorded the first time a user authenticates from an address, and again once that pair
has been quiet for ``Audit:LoginSuccessIntervalSeconds`` (``0``: every request). Every
failure is recorded.

A burst is ``Audit:FailedLoginBurst`` failures from one address within
``Audit:FailedLoginWindowSeconds``: one Security Alert, then the count starts again.

Both tables are bounded (``MAX_TRACKED`` addresses/pairs; the oldest is forgotten first), so a
scan from many addresses costs memory it cannot grow.
"""

from __future__ import annotations

from collections import deque

MAX_TRACKED = 10_000


class LoginWatch:
    def __init__(self, burst: int, window: float, success_interval: float) -> None:
        self.burst = burst
        self.window = window
        self.success_interval = success_interval
        self._seen: dict[tuple[str, str], float] = {}
        self._failures: dict[str, deque[float]] = {}

    def success(self, user: str, address: str, now: float) -> bool:
        """Whether this success is recorded (first from the pair, or after a quiet interval)."""
        if self.success_interval <= 0:
            return True
        key = (user, address)
        last = self._seen.pop(key, None)  # re-inserted: the dict's order is least recently seen first
        self._seen[key] = now
        if len(self._seen) > MAX_TRACKED:
            del self._seen[next(iter(self._seen))]
        return last is None or now - last >= self.success_interval

    def failure(self, address: str, now: float) -> int:
        """The number of failures in the window when this one completes a burst, else 0."""
        times = self._failures.pop(address, None)
        if times is None:
            times = deque(maxlen=self.burst)
        self._failures[address] = times
        if len(self._failures) > MAX_TRACKED:
            del self._failures[next(iter(self._failures))]
        times.append(now)
        if len(times) >= self.burst and now - times[0] <= self.window:
            times.clear()
            return self.burst
        return 0
