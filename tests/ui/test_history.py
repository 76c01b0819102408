"""The status page's metric history: rates, quantiles, the ring, the delta query, its cost."""

from __future__ import annotations

import asyncio
import json
import math
import time

import pytest

from dicomproxy.metrics import HTTP_BUCKETS, Metrics
from dicomproxy.ui.history import CAPACITY, History, quantile


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def make(capacity: int = CAPACITY) -> tuple[Metrics, History, Clock]:
    metrics, clock = Metrics(), Clock()
    return metrics, History(metrics.registry, capacity=capacity, clock=clock), clock


def test_counter_rate_gauge_value_and_histogram_quantiles() -> None:
    metrics, history, clock = make()
    requests = metrics.counter("dicomproxy_proxy_requests_total", "r", labels=("status",))
    depth = metrics.gauge("dicomproxy_dicom_spool_depth", "d")
    latency = metrics.histogram("dicomproxy_proxy_first_byte_seconds", "l", labels=("status",))
    history.sample()
    for _ in range(20):
        requests.inc(status="2xx")
    requests.inc(3, status="5xx")
    depth.set(7)
    for i in range(100):  # 99 fast answers, one slow
        latency.observe(0.004 if i < 99 else 20.0, status="2xx")
    clock.now += 2
    history.sample()
    data = history.since(1)
    assert data["seq"] == 2 and data["first"] == 2 and data["t"] == [clock.now]
    s = data["series"]
    assert s['dicomproxy_proxy_requests_total{status="2xx"}'] == [10.0]  # 20 in 2 s
    assert s['dicomproxy_proxy_requests_total{status="5xx"}'] == [1.5]
    assert s["dicomproxy_dicom_spool_depth"] == [7.0]
    p50 = s['dicomproxy_proxy_first_byte_seconds{status="2xx"}:p50'][0]
    assert 0.0025 < p50 <= 0.005
    assert s["dicomproxy_proxy_first_byte_seconds:p50"] == [p50]  # over every label set
    assert s["dicomproxy_proxy_first_byte_seconds:rate"] == [50.0]
    # p99 interpolates inside its bucket, as histogram_quantile does
    assert s['dicomproxy_proxy_first_byte_seconds{status="2xx"}:p99'][0] == pytest.approx(0.005, rel=1e-3)
    # the first point of a rate has nothing to compare with: null, not a made-up zero
    assert history.since(0)["series"]['dicomproxy_proxy_requests_total{status="2xx"}'][0] is None
    # a second without observations has no quantile
    clock.now += 1
    history.sample()
    assert history.since(2)["series"]["dicomproxy_proxy_first_byte_seconds:p50"] == [None]
    assert history.since(2)["series"]["dicomproxy_proxy_first_byte_seconds:rate"] == [0.0]


def test_quantile_matches_promql() -> None:
    assert math.isnan(quantile(0.5, []))
    assert math.isnan(quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]))
    assert quantile(0.5, [(1.0, 0.0), (2.0, 10.0), (math.inf, 10.0)]) == 1.5
    assert quantile(0.99, [(1.0, 0.0), (math.inf, 10.0)]) == 1.0  # in +Inf: the top bound


def test_ring_keeps_capacity_points_and_deltas_wrap() -> None:
    metrics, history, clock = make(capacity=5)
    gauge = metrics.gauge("g", "g")
    for i in range(12):
        gauge.set(i)
        history.sample()
        clock.now += 1
    full = history.since(0)
    assert full["seq"] == 12 and full["first"] == 8 and full["series"]["g"] == [7.0, 8.0, 9.0, 10.0, 11.0]
    assert history.since(10)["series"]["g"] == [10.0, 11.0]  # across the wrap
    assert history.since(12)["series"]["g"] == [] and history.since(12)["t"] == []
    assert history.since(2)["first"] == 8  # older than the ring: what is kept
    assert history.since(99)["first"] == 8  # from before a restart: everything
    # a series that appears late is null before
    metrics.gauge("late", "l").set(1)
    history.sample()
    assert history.since(0)["series"]["late"] == [None, None, None, None, 1.0]


def test_memory_and_cost_with_a_full_ring(capsys: pytest.CaptureFixture[str]) -> None:
    """A day of uptime: the ring is full. The numbers in the module docstring come from here."""
    metrics, history, clock = make()
    requests = metrics.counter("dicomproxy_proxy_requests_total", "r", labels=("status",))
    latency = metrics.histogram("dicomproxy_proxy_first_byte_seconds", "l", labels=("status",), buckets=HTTP_BUCKETS)
    hooks = metrics.histogram("dicomproxy_lua_hook_seconds", "h", labels=("callback",))
    for i in range(20):
        metrics.gauge(f"dicomproxy_gauge_{i}", "g").set(i)
    for i in range(CAPACITY + 10):
        for status in ("2xx", "4xx", "5xx"):
            requests.inc(status=status)
            latency.observe(0.01 * (i % 7), status=status)
        for cb in ("onHttpRequest", "onHttpResponse", "onStoredInstance"):
            hooks.observe(0.0002, callback=cb)
        history.sample()
        clock.now += 1
    n = len(history.series)
    assert 40 <= n <= 100, n
    assert history.memory_bytes() == (n + 1) * CAPACITY * 8  # nothing grows past the ring
    started = time.process_time()
    for _ in range(20):
        history.sample()
        clock.now += 1
    sample_ms = (time.process_time() - started) / 20 * 1000
    started = time.process_time()
    for _ in range(200):
        delta = json.dumps(history.since(history.seq - 1))
    delta_ms = (time.process_time() - started) / 200 * 1000
    started = time.process_time()
    full = json.dumps(history.since(0))
    full_ms = (time.process_time() - started) * 1000
    with capsys.disabled():
        print(f"\nhistory: {n} series, ring {history.memory_bytes() / 1e6:.2f} MB; sample {sample_ms:.3f} ms; "
              f"delta {delta_ms:.3f} ms ({len(delta)} B); full {full_ms:.1f} ms ({len(full) / 1e6:.2f} MB)")
    assert delta_ms < 5 and len(delta) < 20_000


async def test_the_component_samples_by_itself_and_stops() -> None:
    metrics = Metrics()
    metrics.gauge("g", "g").set(3)
    history = History(metrics.registry, interval=0.01)
    await history.start()
    assert history._sampling.running
    for _ in range(500):  # bounded: 5 s at most
        if history.seq >= 3:
            break
        await asyncio.sleep(0.01)
    await history.stop()
    assert history.seq >= 3 and history.since(0)["series"]["g"][-1] == 3.0
    assert not history._sampling.running
    assert history.health()["ok"] and history.health()["points"] == history.seq
