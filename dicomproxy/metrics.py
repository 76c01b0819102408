"""The gateway's Prometheus metrics: a thin facade over prometheus_client.

Owns one ``CollectorRegistry`` per gateway object (no module globals: two gateways in one
process, as the tests make, never share a series) and the three kinds features declare:
``counter(name, help, labels=...)``, ``gauge(name, help, func)`` and ``histogram(name, help,
labels=..., buckets=...)``. Label names are declared up front (prometheus_client needs them at
construction); values are given as keywords, ``.inc(status="2xx")``, as before. ``render()`` is
what ``GET /dicomproxy/metrics`` answers, in the classic text format (:data:`CONTENT_TYPE`).

Why the library and not the 80-line registry this replaced: that one rendered values with
``{:g}`` (1,234,568 became ``1.23457e+06``, six digits kept), its ``inc()`` was an unlocked
read-modify-write called from the DICOM association threads, and it had no histograms.
prometheus_client's values take a lock each and render with ``repr`` (exact).

Cost on the proxy's hot path, measured with ``timeit`` (best of 3 x 200,000, this shared 2-core
machine, 3 rounds): ``labels(status=...)`` alone costs ~1.8 us (it sorts and checks the names,
then takes the family lock), so the facade keeps the labelled children in a dict keyed by the
keyword items. ``Histogram.observe`` then costs ~1.5 us for a 4 ms answer and ~2.5 us at the
top bucket (prometheus_client scans the bounds linearly and takes one lock for the bucket, one
for the sum); the labelled ``Counter.inc`` ~1.7 us against ~1.6 us for the old unlocked dict.
Per proxied request, counter + histogram + two clock reads cost ~3.4 us against ~1.6 us before:
+1.8 us, about 1.4 % of the proxy's ~130 us of CPU per request.

The histograms observed on every proxied request (time to first byte, the Lua hooks' seconds)
are a :class:`LeanHistogram` instead: a child bound once per label set by the caller, a bisect
for the bucket and one lock for the counts and the sum; the proxy's ``_count`` per label set is
also rendered as the ``dicomproxy_proxy_requests_total`` counter (the two were always
incremented together). Measured in-process (``bench/proxy_instructions.py`` driver under
``time.process_time``, best of 5 x 3,000 requests), the labelled counter and histogram through
prometheus_client cost ~7 us of a ~44 us proxied request; ``timeit`` of the calls alone:
3.0 us (through this facade), 2.0 us (pre-bound prometheus_client children), 0.36 us
(:class:`LeanHistogram`'s ``observe``; 0.29 us without its lock).

Buckets (seconds) are chosen for a PACS gateway, not prometheus_client's web defaults (5 ms ..
10 s): a QIDO-RS answer takes milliseconds, a STOW-RS upload's answer comes after the whole
study is stored (minutes), Lua hooks run in microseconds, and an instance may wait in the spool
while the PACS is down. Each set keeps ~15 bounds, since every bound is one more comparison per
observation and one more series per label value.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, generate_latest, values
from prometheus_client import Counter as _Counter
from prometheus_client import Gauge as _Gauge
from prometheus_client import Histogram as _Histogram
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.multiprocess import mark_process_dead as _mark_process_dead
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)

__all__ = [
    "CONTENT_TYPE",
    "DICOM_BUCKETS",
    "FORWARD_BUCKETS",
    "HOOK_BUCKETS",
    "HTTP_BUCKETS",
    "Counter",
    "Gauge",
    "Histogram",
    "LeanHistogram",
    "Tally",
    "Metrics",
]

# The classic text format (0.0.4), which every Prometheus version scrapes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Proxied requests until the answer's head: QIDO/WADO metadata in ms; STOW and big retrieves
# whose head comes after the body was stored or assembled upstream, up to Upstream's timeouts.
HTTP_BUCKETS = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# A Lua hook: microseconds for a header edit, up to Lua:TimeoutMs (default 5 s) for one that waits.
HOOK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0)
# Answering one C-STORE: parse the header, scripts, an fsync'ed spool write.
DICOM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# From reception to the PACS's acceptance: the spool wait and retries included (the PACS may be
# down for an hour; the top bucket still says how many waited longer).
FORWARD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

_M = TypeVar("_M", bound=MetricWrapperBase)


class _Family(Generic[_M]):
    """One metric family and a cache of its labelled children (``labels()`` is the costly part)."""

    kind = ""

    def __init__(self, metric: _M, labelnames: tuple[str, ...]) -> None:
        self.metric = metric
        self.labelnames = labelnames
        self._children: dict[tuple[tuple[str, object], ...], _M] = {}

    def _child(self, labels: dict[str, object]) -> _M:
        if not labels:
            return self.metric  # prometheus_client says "missing label values" if it needs some
        key = tuple(labels.items())
        child = self._children.get(key)
        if child is None:  # a race makes the same child twice: labels() returns one object
            child = self._children[key] = self.metric.labels(**labels)
        return child


class Counter(_Family[_Counter]):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        self._child(labels).inc(amount)


class Gauge(_Family[_Gauge]):
    kind = "gauge"

    def set(self, value: float, **labels: object) -> None:
        self._child(labels).set(value)

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        self._child(labels).inc(amount)

    def dec(self, amount: float = 1.0, **labels: object) -> None:
        self._child(labels).dec(amount)

    def set_function(self, func: Callable[[], float]) -> None:
        """Read ``func()`` at each scrape. A probe that raises gives NaN (a broken probe must
        not break the scrape) and is logged."""
        name = self.metric._name

        def read() -> float:
            try:
                return float(func())
            except Exception as e:
                log.warning("metric %s: its probe failed: %s", name, e)
                return math.nan

        self.metric.set_function(read)


class Histogram(_Family[_Histogram]):
    kind = "histogram"

    def observe(self, value: float, **labels: object) -> None:
        self._child(labels).observe(value)


class LeanHistogramChild:
    """One label set of a :class:`LeanHistogram`: counts per bucket and the sum, under one lock."""

    __slots__ = ("_bounds", "_lock", "counts", "sum", "created")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._lock = threading.Lock()
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self._bounds, value)  # the first bound >= value: Prometheus's "le"
        with self._lock:
            self.counts[i] += 1
            self.sum += value

    def snapshot(self) -> tuple[list[int], float]:
        with self._lock:
            return list(self.counts), self.sum


class LeanHistogram:
    """A labelled histogram for a hot path (a custom prometheus_client collector).

    ``child(*label_values)`` is bound once per label set by the caller and kept; its
    ``observe`` is a bisect and two additions under one lock (prometheus_client's: a linear
    scan of the bounds, a lock for the bucket and one for the sum, and the labels() lookup).
    With ``count_as=(name, help)`` the per-label-set counts are also rendered as that counter,
    so a request counter kept beside the histogram costs nothing more per request. Renders as
    prometheus_client's ``Histogram`` and ``Counter`` do (``_bucket``, ``_count``, ``_sum``,
    ``_created``; ``_total``, ``_created``).
    """

    kind = "histogram"

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...], buckets: Sequence[float],
                 count_as: tuple[str, str] | None = None) -> None:
        bounds = tuple(sorted(float(b) for b in buckets if b != math.inf))
        self.name = name
        self.help = help
        self.labelnames = labelnames
        self.bounds = bounds
        self.count_as = count_as
        self._les = [floatToGoString(b) for b in bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        self._children: dict[tuple[str, ...], LeanHistogramChild] = {}
        self._lock = threading.Lock()

    def child(self, *values: str) -> LeanHistogramChild:
        if len(values) != len(self.labelnames):
            raise ValueError(f"metric {self.name} takes the labels {self.labelnames}, got {values}")
        found = self._children.get(values)
        if found is None:
            with self._lock:
                found = self._children.setdefault(values, LeanHistogramChild(self.bounds))
        return found

    def observe(self, value: float, **labels: str) -> None:
        """The facade's keyword form (not for a hot path: bind a :meth:`child`)."""
        self.child(*(str(labels[n]) for n in self.labelnames)).observe(value)

    def describe(self) -> list[Metric]:
        return list(self._families([]))

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            children = list(self._children.items())
        return self._families(children)

    def _families(self, children: list[tuple[tuple[str, ...], LeanHistogramChild]]) -> Iterator[Metric]:
        hist = HistogramMetricFamily(self.name, self.help, labels=self.labelnames)
        counted = []
        for label_values, child in children:
            counts, total = child.snapshot()
            counted.append((label_values, sum(counts), child.created))
            running, buckets = 0, []
            for le, n in zip(self._les, counts, strict=True):
                running += n
                buckets.append((le, float(running)))
            hist.add_metric(list(label_values), buckets, total)
            hist.samples.append(Sample(self.name + "_created", dict(zip(self.labelnames, label_values, strict=True)),
                                       child.created))
        yield hist
        if self.count_as is not None:
            name, help = self.count_as
            counter = CounterMetricFamily(name, help, labels=self.labelnames)
            for label_values, count, created in counted:
                counter.add_metric(list(label_values), float(count), created=created)
            yield counter


_F = TypeVar("_F", Counter, Gauge, Histogram, LeanHistogram)


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_metrics(folder: Path, *, first: bool) -> None:
    """Several workers (``Server:Workers``): every value this process creates from now on lives in
    ``folder`` (prometheus_client's multiprocess mode: one mmap'd file per process and kind), so
    any worker answers ``/dicomproxy/metrics`` for all of them. ``first``: the supervisor, before
    the workers start: empty the folder (the files of an earlier run would be added in).

    Cost, measured with ``timeit`` on this shared 2-core machine (best of 5 x 200,000): a
    counter ``inc`` 0.79 us in a mmap'd file against 0.35 us in memory, a histogram ``observe``
    1.65 us against 0.67 us; a proxied request (a counter, a histogram, with hooks one more
    histogram per hook) pays ~1.5-2.5 us more, 1-2 % of its CPU. Only with several workers."""
    if first:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(folder)
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


def mark_process_dead(pid: int) -> None:
    """A worker is gone: its live gauges no longer count (its counters and histograms still do)."""
    if os.environ.get(MULTIPROC_ENV):
        _mark_process_dead(pid)  # type: ignore[no-untyped-call]


class Metrics:
    """The gateway's registry. Declaring a name twice returns the first declaration (a feature
    installed twice in tests); declaring it as another kind or with other labels is an error.

    With several workers (:func:`multiprocess_metrics` called first) the values are shared files:
    ``render()`` and :attr:`exposed` read every worker's (counters and histograms summed; a gauge
    is the sum over live workers of what each last sampled: :meth:`sample_gauges`, once a second
    and before each scrape)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._families: dict[str, Counter | Gauge | Histogram | LeanHistogram] = {}
        self._tallies: dict[str, Tally] = {}
        self.shared = bool(os.environ.get(MULTIPROC_ENV)) and values.ValueClass is not values.MutexValue
        self._probes: list[tuple[Gauge, Callable[[], float]]] = []
        self.exposed = self.registry  # what a scrape and the status page's history read
        if self.shared:
            self.exposed = CollectorRegistry()
            MultiProcessCollector(self.exposed)  # type: ignore[no-untyped-call]

    def sample_gauges(self) -> None:
        """Several workers: write each probed gauge's current value to this worker's file."""
        for gauge, func in self._probes:
            try:
                gauge.set(float(func()))
            except Exception as e:
                log.warning("metric %s: its probe failed: %s", gauge.metric._name, e)

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        known = self._known(name, Counter, labels)
        if known is not None:
            return known
        return self._add(name, Counter(_Counter(name, help, tuple(labels), registry=self.registry), tuple(labels)))

    def gauge(
        self, name: str, help: str, func: Callable[[], float] | None = None, labels: Sequence[str] = ()
    ) -> Gauge:
        gauge = self._known(name, Gauge, labels)
        if gauge is None:
            metric = _Gauge(name, help, tuple(labels), registry=self.registry, multiprocess_mode="livesum")
            gauge = self._add(name, Gauge(metric, tuple(labels)))
        if func is not None and self.shared:
            self._probes.append((gauge, func))
        elif func is not None:
            gauge.set_function(func)
        return gauge

    def histogram(
        self, name: str, help: str, labels: Sequence[str] = (), buckets: Sequence[float] = HTTP_BUCKETS
    ) -> Histogram:
        known = self._known(name, Histogram, labels)
        if known is not None:
            return known
        metric = _Histogram(name, help, tuple(labels), registry=self.registry, buckets=tuple(buckets))
        return self._add(name, Histogram(metric, tuple(labels)))

    def tally(self, name: str, help: str) -> Tally:
        """A counter without labels (``name`` ends ``_total``) that the caller adds to as a plain
        attribute, ``tally.value += n``, read at each scrape: for a hot path, where
        prometheus_client's locked ``inc()`` (~1.6 us) is too dear and the adding is done on the
        event loop only (the ``+=`` is not atomic across threads). Declaring it twice returns the
        first (two proxies add to one series)."""
        known = self._tallies.get(name)
        if known is not None:
            return known
        if name in self._families:
            raise ValueError(f"metric {name} is already declared as a {self._families[name].kind}")
        if self.shared:  # several workers: a real counter in the shared files, fed by the same +=
            tally: Tally = SharedTally(self.counter(name, help))
            self._tallies[name] = tally
            return tally
        tally = self._tallies[name] = Tally(name.removesuffix("_total"), help)
        self.registry.register(tally)
        return tally

    def lean_histogram(
        self, name: str, help: str, labels: Sequence[str] = (), buckets: Sequence[float] = HTTP_BUCKETS,
        count_as: tuple[str, str] | None = None,
    ) -> LeanHistogram:
        """A :class:`LeanHistogram` (bind a child per label set), with its counts also as the
        counter ``count_as`` (name, help) if given."""
        known = self._known(name, LeanHistogram, labels)
        if known is not None:
            return known
        if self.shared:  # several workers: its counts must add up across them, in the shared files
            hist = self.histogram(name, help, labels, buckets)
            count = self.counter(count_as[0], count_as[1], labels) if count_as is not None else None
            shared = SharedLeanHistogram(name, help, tuple(labels), buckets, hist, count)
            self._families[name] = shared  # replaces the plain histogram's entry: one name, one kind
            return shared
        family = LeanHistogram(name, help, tuple(labels), buckets, count_as)
        self.registry.register(family)
        if count_as is not None:
            self._families[count_as[0]] = family
        return self._add(name, family)

    def render(self) -> bytes:
        """The text exposition of every series (``GET /dicomproxy/metrics``)."""
        if self.shared:
            self.sample_gauges()
        return generate_latest(self.exposed)

    def _known(self, name: str, kind: type[_F], labels: Sequence[str]) -> _F | None:
        family = self._families.get(name)
        if family is None:
            return None
        if not isinstance(family, kind) or family.labelnames != tuple(labels):
            raise ValueError(f"metric {name} is already declared as a {family.kind} with labels "
                             f"{family.labelnames}; now asked for a {kind.kind} with {tuple(labels)}")
        return family

    def _add(self, name: str, family: _F) -> _F:
        self._families[name] = family
        return family


class Tally:
    """The plain counter of :meth:`Metrics.tally`; a prometheus_client collector of one sample."""

    __slots__ = ("name", "help", "value")

    def __init__(self, name: str, help: str) -> None:
        self.name, self.help = name, help
        self.value = 0

    def collect(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self.name, self.help, value=float(self.value))]

    def describe(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self.name, self.help)]


class SharedTally(Tally):
    """:meth:`Metrics.tally` with several workers: ``value += n`` becomes ``inc(n)`` on a counter
    in prometheus_client's shared files (a plain attribute would be this worker's alone)."""

    __slots__ = ("_counter", "_seen")

    def __init__(self, counter: Counter) -> None:
        self._counter, self._seen = counter, 0

    @property
    def value(self) -> int:
        return self._seen

    @value.setter
    def value(self, new: int) -> None:
        if new > self._seen:
            self._counter.inc(new - self._seen)
        self._seen = new


class _SharedChild(LeanHistogramChild):
    """A :class:`SharedLeanHistogram` child: prometheus_client's, in the shared files."""

    __slots__ = ("_hist", "_count")

    def __init__(self, hist: _Histogram, count: _Counter | None) -> None:
        self._hist, self._count = hist, count

    def observe(self, value: float) -> None:
        self._hist.observe(value)
        if self._count is not None:
            self._count.inc()


class SharedLeanHistogram(LeanHistogram):
    """:meth:`Metrics.lean_histogram` with several workers (``Server:Workers``): the same calls,
    backed by prometheus_client's histogram and counter so that every worker's counts add up (the
    multiprocess cost, ~1.5-2.5 us a request, is paid only then: :func:`multiprocess_metrics`)."""

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...], buckets: Sequence[float],
                 hist: Histogram, count: Counter | None) -> None:
        super().__init__(name, help, labelnames, buckets)
        self._hist, self._count = hist, count
        self._shared: dict[tuple[str, ...], _SharedChild] = {}

    def child(self, *values: str) -> LeanHistogramChild:
        found = self._shared.get(values)
        if found is None:
            labels: dict[str, object] = dict(zip(self.labelnames, values, strict=True))
            found = self._shared[values] = _SharedChild(
                self._hist._child(labels), self._count._child(labels) if self._count is not None else None)
        return found

    def collect(self) -> Iterator[Metric]:
        return iter(())
