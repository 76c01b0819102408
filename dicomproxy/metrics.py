"""A small Prometheus text-format registry.

Counters and gauges with optional labels, owned by the gateway object (no module globals),
rendered by ``GET /dicomproxy/metrics``. Kept dependency-free on purpose: the hot path
increments a dict entry, nothing more.
"""

from __future__ import annotations

from collections.abc import Callable


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str) -> None:
        self.name = name
        self.help = help
        self.values: dict[tuple[tuple[str, str], ...], float] = {}

    def _key(self, labels: dict[str, str] | None) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(labels.items())) if labels else ()

    def get(self, **labels: str) -> float:
        return self.values.get(self._key(labels), 0.0)


class Counter(_Metric):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help: str, func: Callable[[], float] | None = None) -> None:
        super().__init__(name, help)
        self.func = func

    def set(self, value: float, **labels: str) -> None:
        self.values[self._key(labels)] = value


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def counter(self, name: str, help: str) -> Counter:
        metric = self._metrics.setdefault(name, Counter(name, help))
        assert isinstance(metric, Counter), name
        return metric

    def gauge(self, name: str, help: str, func: Callable[[], float] | None = None) -> Gauge:
        metric = self._metrics.setdefault(name, Gauge(name, help, func))
        assert isinstance(metric, Gauge), name
        if func is not None:
            metric.func = func
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics.values():
            lines.append(f"# HELP {m.name} {m.help}")
            lines.append(f"# TYPE {m.name} {m.kind}")
            if isinstance(m, Gauge) and m.func is not None:
                try:
                    m.set(float(m.func()))
                except Exception:  # a broken probe must not break the scrape
                    pass
            if not m.values:
                lines.append(f"{m.name} 0")
            for key, value in m.values.items():
                labels = ",".join(f'{k}="{_escape(v)}"' for k, v in key)
                lines.append(f"{m.name}{{{labels}}} {value:g}" if labels else f"{m.name} {value:g}")
        return "\n".join(lines) + "\n"
