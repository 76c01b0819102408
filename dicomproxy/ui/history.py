"""The last hour of the gateway's own metrics, in memory, for the status page's graphs.

One asyncio task (:class:`History`, a component) reads the gateway's prometheus_client registry
once a second, off the request path, and appends one point to a fixed ring per derived series:

* a counter becomes its rate per second (``dicomproxy_proxy_requests_total{status="2xx"}``);
* a gauge its value (``dicomproxy_dicom_spool_depth``);
* a histogram, per label set and over all of them, the p50 and p99 of the observations made
  in the last second (``...first_byte_seconds:p50``, interpolated within the bucket like
  PromQL's ``histogram_quantile``) and their rate (``:rate``).

The names are the ``/dicomproxy/metrics`` sample names, so the graphs, the Prometheus series
and the Grafana dashboard (``scripts/grafana_dashboard.py``) cannot drift apart, and a series a
feature adds later appears without a change here.

Memory is bounded: ``capacity`` points (3600: one hour at one a second) per series in an
``array('d')`` (8 bytes a point, 28.8 KB a series), at most ``MAX_SERIES`` series (a label with
runaway values stops adding series and says so once in the log). Values keep 6 significant
digits, so the JSON stays short.

:meth:`History.since` answers ``GET /dicomproxy/ui/history?since=SEQ``: only the points after
``SEQ`` (the ``seq`` of the previous answer), so a page polling every second gets one point
per series; ``since=0`` (or a ``seq`` from before a restart) gets the whole ring.

Measured in tests/ui/test_history.py with a full ring (a day of uptime) of 47 series, process
CPU time on the shared 2-core machine at load ~20: 1.38 MB of rings; one sample 1.5 ms (once a
second, on the loop, never on a request's path); a one-point delta as JSON 0.1 ms (2.4 KB); the
whole ring 71 ms (1.2 MB, once when a page opens).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from array import array
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from dicomproxy.background import BackgroundTask

log = logging.getLogger(__name__)

CAPACITY = 3600  # points kept per series: one hour at one a second
INTERVAL = 1.0  # seconds between samples
MAX_SERIES = 400
QUANTILES = (("p50", 0.5), ("p99", 0.99))
NAN = math.nan


def _labels(labels: dict[str, str], drop: str = "") -> str:
    items = [f'{k}="{v}"' for k, v in sorted(labels.items()) if k != drop]
    return "{" + ",".join(items) + "}" if items else ""


def _round(value: float) -> float:
    if value != value or value in (math.inf, -math.inf):
        return NAN
    return float(f"{value:.6g}")


def quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """The ``q`` quantile of observations counted in cumulative ``(le, count)`` buckets, as
    PromQL's ``histogram_quantile`` (linear within the bucket; the top bucket's lower bound when
    it falls into ``+Inf``). NaN without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return NAN
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == math.inf:
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


class _Histogram:
    """A histogram's cumulative state at the last sample, per label set."""

    def __init__(self) -> None:
        self.buckets: dict[float, float] = {}
        self.count = 0.0


class History:
    """The rings, the sampler and the delta query. ``clock`` is wall time (the page's x axis)."""

    def __init__(self, registry: CollectorRegistry, capacity: int = CAPACITY, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.time, before: Callable[[], None] | None = None) -> None:
        self.registry = registry
        self.before = before  # several workers: write this worker's gauges first (Metrics.sample_gauges)
        self.capacity = capacity
        self.interval = interval
        self.clock = clock
        self.seq = 0  # points taken so far; point n lives at index (n - 1) % capacity
        self.times = array("d", [NAN]) * capacity
        self.series: dict[str, array[float]] = {}
        self._counters: dict[str, float] = {}
        self._histograms: dict[str, dict[str, _Histogram]] = {}
        self._last_time = NAN
        self._full_warned = False
        self._sampling = BackgroundTask("ui-history")
        self.sample_seconds = 0.0  # CPU of the last sample (process time), for the health

    # -- sampling --------------------------------------------------------------------------
    def sample(self) -> None:
        """Take one point of every series now."""
        started = time.process_time()
        now = self.clock()
        dt = now - self._last_time if self._last_time == self._last_time else NAN
        values: dict[str, float] = {}
        if self.before is not None:
            self.before()
        for family in self.registry.collect():
            if family.type == "counter":
                self._counter(family, dt, values)
            elif family.type == "gauge":
                for s in family.samples:
                    values[s.name + _labels(s.labels)] = s.value
            elif family.type == "histogram":
                self._histogram(family, dt, values)
        self._push(now, values)
        self._last_time = now
        self.sample_seconds = time.process_time() - started

    def _counter(self, family: Metric, dt: float, values: dict[str, float]) -> None:
        for s in family.samples:
            if not s.name.endswith("_total"):
                continue  # _created
            key = s.name + _labels(s.labels)
            # a child born since the last point (a label value's first inc) was 0 then
            before = self._counters.get(key, 0.0 if dt == dt else None)
            self._counters[key] = s.value
            values[key] = (s.value - before) / dt if before is not None and s.value >= before and dt > 0 else NAN

    def _histogram(self, family: Metric, dt: float, values: dict[str, float]) -> None:
        now: dict[str, _Histogram] = {}
        for s in family.samples:
            if s.name.endswith("_bucket"):
                h = now.setdefault(_labels(s.labels, "le"), _Histogram())
                h.buckets[float(s.labels["le"])] = s.value
            elif s.name.endswith("_count"):
                now.setdefault(_labels(s.labels), _Histogram()).count = s.value
        before = self._histograms.get(family.name, {})
        self._histograms[family.name] = now
        total: dict[float, float] = {}
        total_count = 0.0
        for labels, h in now.items():
            old = before.get(labels, _Histogram())  # born since the last point: empty then
            if h.count < old.count or not dt > 0:
                if labels:
                    self._quantiles(f"{family.name}{labels}", [], NAN, values)
                continue
            delta = {le: c - old.buckets.get(le, 0.0) for le, c in h.buckets.items()}
            for le, c in delta.items():
                total[le] = total.get(le, 0.0) + c
            total_count += h.count - old.count
            if labels:
                self._quantiles(f"{family.name}{labels}", sorted(delta.items()), (h.count - old.count) / dt, values)
        rate = total_count / dt if dt > 0 else NAN
        self._quantiles(family.name, sorted(total.items()), rate, values)

    @staticmethod
    def _quantiles(key: str, buckets: list[tuple[float, float]], rate: float, values: dict[str, float]) -> None:
        for suffix, q in QUANTILES:
            values[f"{key}:{suffix}"] = quantile(q, buckets)
        values[f"{key}:rate"] = rate

    def _push(self, now: float, values: dict[str, float]) -> None:
        index = self.seq % self.capacity
        self.seq += 1
        self.times[index] = now
        for key, ring in self.series.items():
            ring[index] = _round(values.pop(key, NAN))
        for key, value in values.items():  # series seen for the first time
            if len(self.series) >= MAX_SERIES:
                if not self._full_warned:
                    self._full_warned = True
                    log.warning("status page history: %d series kept, %s and later ones are not graphed "
                                "(a metric label with too many values?)", MAX_SERIES, key)
                break
            ring = self.series[key] = array("d", [NAN]) * self.capacity
            ring[index] = _round(value)

    # -- the query -------------------------------------------------------------------------
    def since(self, seq: int, names: Iterable[str] | None = None) -> dict[str, Any]:
        """The points after ``seq`` (all kept ones when ``seq`` is 0, older than the ring, or from
        before a restart), as ``{"seq", "first", "interval", "t": [...], "series": {key: [...]}}``
        with ``null`` for a missing value."""
        kept = min(self.seq, self.capacity)
        if seq <= 0 or seq > self.seq or self.seq - seq > kept:
            seq = self.seq - kept
        first = seq + 1
        wanted = self.series.keys() if names is None else [n for n in names if n in self.series]
        return {"seq": self.seq, "first": first, "interval": self.interval,
                "t": self._slice(self.times, seq), "series": {k: self._slice(self.series[k], seq) for k in wanted}}

    def _slice(self, ring: array[float], seq: int) -> list[float | None]:
        start, end = seq % self.capacity, self.seq % self.capacity
        if self.seq - seq == 0:
            return []
        part = ring[start:end] if start < end else ring[start:] + ring[:end]
        return [None if v != v else v for v in part]

    def memory_bytes(self) -> int:
        """Bytes held by the rings (the arrays' buffers)."""
        return sum(r.buffer_info()[1] * r.itemsize for r in (self.times, *self.series.values()))

    # -- component -------------------------------------------------------------------------
    async def start(self) -> None:
        self._sampling.start(self._run)

    async def stop(self) -> None:
        await self._sampling.stop()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                self.sample()
            except Exception:  # a broken probe must not end the graphs
                log.exception("status page history: sampling the metrics failed")
            next_at = max(next_at + self.interval, loop.time())  # behind (a stalled loop): no burst to catch up
            await asyncio.sleep(next_at - loop.time())

    def health(self) -> dict[str, Any]:
        return {"ok": True, "series": len(self.series), "points": min(self.seq, self.capacity),
                "capacity": self.capacity, "bytes": self.memory_bytes(),
                "sampleMs": round(self.sample_seconds * 1000, 3)}
