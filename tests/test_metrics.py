"""The metrics facade over prometheus_client (dicomproxy/metrics.py); the text is read back with
prometheus_client's own parser, as a Prometheus server would. The real gateway's scrape is in
tests/e2e/test_metrics.py."""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from dicomproxy.metrics import HOOK_BUCKETS, Metrics


def samples(metrics: Metrics) -> list[Sample]:
    return [s for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples]


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = [s.value for s in samples(metrics) if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, samples(metrics))
    return found[0]


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Let threads switch every microsecond, so an unlocked read-modify-write loses increments."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def test_large_counts_render_exactly() -> None:
    m = Metrics()
    c = m.counter("dicomproxy_tus_bytes_received_total", "bytes")
    c.inc(1_234_568)
    c.inc(2**53 - 1_234_569)  # the largest integer a float holds exactly
    assert "dicomproxy_tus_bytes_received_total 9.007199254740991e+15" in m.render().decode()
    assert value(m, "dicomproxy_tus_bytes_received_total") == 2**53 - 1
    one = Metrics()
    one.counter("x_total", "x").inc(1_234_568)
    assert "x_total 1.234568e+06" in one.render().decode()


def test_labelled_counters_keep_their_names_and_labels() -> None:
    m = Metrics()
    c = m.counter("dicomproxy_proxy_requests_total", "by status class", labels=("status",))
    c.inc(status="2xx")
    c.inc(status="2xx")
    c.inc(3, status="5xx")
    assert value(m, "dicomproxy_proxy_requests_total", status="2xx") == 2
    assert value(m, "dicomproxy_proxy_requests_total", status="5xx") == 3
    with pytest.raises(ValueError, match="Incorrect label names"):
        c.inc(kind="x")
    with pytest.raises(ValueError, match="missing label values"):
        c.inc()


def test_many_threads_incrementing_lose_nothing(fast_switching: None) -> None:
    m = Metrics()
    plain = m.counter("plain_total", "p")
    labelled = m.counter("labelled_total", "l", labels=("outcome",))
    hist = m.histogram("h_seconds", "h", buckets=(0.5, 1.0))
    threads, per_thread = 8, 20_000
    start = threading.Barrier(threads)

    def work() -> None:
        start.wait()
        for _ in range(per_thread):
            plain.inc()
            labelled.inc(outcome="sent")
            hist.observe(0.25)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    total = threads * per_thread
    assert value(m, "plain_total") == total
    assert value(m, "labelled_total", outcome="sent") == total
    assert value(m, "h_seconds_count") == total
    assert value(m, "h_seconds_sum") == total * 0.25


def test_histograms_have_buckets_sum_and_count() -> None:
    m = Metrics()
    h = m.histogram("dicomproxy_lua_hook_seconds", "hooks", labels=("callback",), buckets=HOOK_BUCKETS)
    for seconds in (0.0002, 0.003, 0.003, 20.0):
        h.observe(seconds, callback="onHttpRequest")
    name = "dicomproxy_lua_hook_seconds"
    assert value(m, f"{name}_bucket", callback="onHttpRequest", le="0.00025") == 1
    assert value(m, f"{name}_bucket", callback="onHttpRequest", le="0.005") == 3
    assert value(m, f"{name}_bucket", callback="onHttpRequest", le="10.0") == 3
    assert value(m, f"{name}_bucket", callback="onHttpRequest", le="+Inf") == 4
    assert value(m, f"{name}_count", callback="onHttpRequest") == 4
    assert value(m, f"{name}_sum", callback="onHttpRequest") == pytest.approx(20.0062)


def test_gauge_probes_are_read_at_scrape_and_a_broken_one_does_not_break_it(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics()
    depth = [3]
    m.gauge("dicomproxy_dicom_spool_depth", "spool", lambda: depth[0])
    m.gauge("broken", "b", lambda: 1 / 0)
    assert value(m, "dicomproxy_dicom_spool_depth") == 3
    depth[0] = 7
    assert value(m, "dicomproxy_dicom_spool_depth") == 7
    assert math.isnan(value(m, "broken"))
    assert "metric broken: its probe failed: division by zero" in caplog.text
    g = m.gauge("set_by_hand", "s")
    g.set(5)
    g.inc(2)
    g.dec()
    assert value(m, "set_by_hand") == 6


def test_declaring_twice_returns_the_first_and_a_clash_is_an_error() -> None:
    m = Metrics()
    first = m.counter("a_total", "a", labels=("x",))
    assert m.counter("a_total", "again", labels=("x",)) is first
    with pytest.raises(ValueError, match=r"a_total is already declared as a counter with labels \('x',\)"):
        m.counter("a_total", "a", labels=("y",))
    with pytest.raises(ValueError, match="now asked for a gauge"):
        m.gauge("a_total", "a", labels=("x",))


def test_each_metrics_object_has_its_own_registry() -> None:
    one, two = Metrics(), Metrics()
    one.counter("same_total", "s").inc()
    two.counter("same_total", "s").inc(5)
    assert value(one, "same_total") == 1
    assert value(two, "same_total") == 5


def test_a_tally_is_a_counter_read_at_scrape_and_declared_once() -> None:
    metrics = Metrics()
    tally = metrics.tally("dicomproxy_proxy_bytes_sent_total", "bytes")
    assert value(metrics, "dicomproxy_proxy_bytes_sent_total") == 0
    tally.value += 12_345_678_901
    assert value(metrics, "dicomproxy_proxy_bytes_sent_total") == 12_345_678_901
    assert metrics.tally("dicomproxy_proxy_bytes_sent_total", "bytes") is tally  # a second proxy adds to it
    metrics.counter("dicomproxy_other_total", "other")
    with pytest.raises(ValueError, match="already declared"):
        metrics.tally("dicomproxy_other_total", "other")
    families = {f.name: f.type for f in text_string_to_metric_families(metrics.render().decode())}
    assert families["dicomproxy_proxy_bytes_sent"] == "counter"


def test_a_lean_histogram_renders_as_prometheus_clients_histogram_and_counter() -> None:
    """The proxy's histogram (metrics.LeanHistogram) and the
    request counter derived from its counts render the same series, values and types as
    prometheus_client's Histogram and Counter fed the same observations."""
    theirs, ours = Metrics(), Metrics()
    counter = theirs.counter("dicomproxy_proxy_requests_total", "by status class", labels=("status",))
    hist = theirs.histogram("dicomproxy_proxy_first_byte_seconds", "ttfb", labels=("status",))
    loop = ours.lean_histogram("dicomproxy_proxy_first_byte_seconds", "ttfb", labels=("status",),
                               count_as=("dicomproxy_proxy_requests_total", "by status class"))
    for seconds, status in ((0.004, "2xx"), (0.0025, "2xx"), (0.1, "2xx"), (1000.0, "5xx"), (0.0, "5xx")):
        counter.inc(status=status)
        hist.observe(seconds, status=status)
        loop.child(status).observe(seconds)

    def series(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for s in samples(m) if not s.name.endswith("_created")}

    assert series(ours) == series(theirs)
    assert value(ours, "dicomproxy_proxy_requests_total", status="2xx") == 3
    assert value(ours, "dicomproxy_proxy_first_byte_seconds_bucket", status="2xx", le="0.0025") == 1
    assert value(ours, "dicomproxy_proxy_first_byte_seconds_bucket", status="5xx", le="+Inf") == 2
    created = {s.name for s in samples(ours) if s.name.endswith("_created")}
    assert created == {"dicomproxy_proxy_requests_created", "dicomproxy_proxy_first_byte_seconds_created"}

    def types(m: Metrics) -> dict[str, str]:
        return {f.name: f.type for f in text_string_to_metric_families(m.render().decode())}

    assert types(ours) == types(theirs)
    assert types(ours)["dicomproxy_proxy_requests"] == "counter"
    with pytest.raises(ValueError, match="already declared"):
        ours.counter("dicomproxy_proxy_requests_total", "again", labels=("status",))
