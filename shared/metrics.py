"""Process metrics: counters and duration histograms keyed by name and labels, in Prometheus text.

Each process has one registry (`REGISTRY`); in embedded mode the four services share it, in
distributed mode each process exposes its own at `GET /metrics` (the API and the notifier apps, and
the probe server of the orchestrator and the aggregators). A dozen series and a lock per metric:
no dependency, no background thread, cheap enough to record on every request.

    REQUESTS = REGISTRY.histogram("fedhub_x_seconds", "what it times", ("route",))
    REQUESTS.observe(0.012, route="/v1/me")
    with REQUESTS.time(route="/v1/me"):
        ...

`parse_exposition` reads the text back (the bench scrapes before and after a run; tests check counts).
"""

from __future__ import annotations

import bisect
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Final

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
"""The media type of the text exposition format."""

DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
"""Upper bounds (seconds) of duration histograms: from a cached lookup to a large aggregation."""

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelValues = tuple[str, ...]


class _Metric:
    kind: str = ""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str]) -> None:
        if not _NAME.match(name):
            raise ValueError(f"metric name {name!r} is not a valid Prometheus name")
        for label in labelnames:
            if not _LABEL.match(label) or label == "le":
                raise ValueError(f"metric {name}: label name {label!r} is not allowed")
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: Mapping[str, object]) -> LabelValues:
        # On every request's path: a list comprehension, no generator (a few microseconds each).
        try:
            key = tuple([str(labels[name]) for name in self.labelnames])
        except KeyError:
            key = ()
        if len(labels) != len(self.labelnames) or len(key) != len(self.labelnames):
            raise ValueError(f"metric {self.name} takes labels {self.labelnames}, got {sorted(labels)}")
        return key

    def _labels(self, key: LabelValues, extra: tuple[tuple[str, str], ...] = ()) -> str:
        pairs = [*zip(self.labelnames, key, strict=True), *extra]
        if not pairs:
            return ""
        return "{" + ",".join(f'{n}="{_escape(v)}"' for n, v in pairs) + "}"

    def _header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def lines(self) -> list[str]:
        """This metric in the text exposition format."""
        raise NotImplementedError


class Counter(_Metric):
    """A monotonically increasing count per label set; its name ends in `_total`."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str]) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name!r} must end in _total")
        super().__init__(name, help_text, labelnames)
        self._values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        """Add `amount` (never negative) to the label set's count."""
        if amount < 0:
            raise ValueError(f"counter {self.name} cannot decrease (got {amount})")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: object) -> float:
        """The label set's count (0 before any `inc`)."""
        key = self._key(labels)
        with self._lock:
            return self._values.get(key, 0.0)

    def lines(self) -> list[str]:
        """`name{labels} value` per label set."""
        with self._lock:
            items = sorted(self._values.items())
        return [*self._header(), *(f"{self.name}{self._labels(k)} {_number(v)}" for k, v in items)]


class _Series:
    __slots__ = ("buckets", "count", "sum")

    def __init__(self, size: int) -> None:
        self.buckets = [0] * size
        self.count = 0
        self.sum = 0.0


class Histogram(_Metric):
    """Observations (durations in seconds) per label set: cumulative buckets, their sum and count."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str],
        buckets: Sequence[float] = DURATION_BUCKETS,
    ) -> None:
        super().__init__(name, help_text, labelnames)
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"histogram {name}: buckets must be distinct and at least one finite")
        self.bounds = tuple(bounds)
        self._series: dict[LabelValues, _Series] = {}

    def observe(self, value: float, **labels: object) -> None:
        """Record one observation (a negative duration, from clocks of two hosts, counts as 0)."""
        value = max(float(value), 0.0)
        key = self._key(labels)
        index = bisect.bisect_left(self.bounds, value)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Series(len(self.bounds) + 1)
            series.buckets[index] += 1
            series.count += 1
            series.sum += value

    @contextmanager
    def time(self, **labels: object) -> Iterator[None]:
        """Observe the wall time the block takes (also when it raises)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.observe(time.perf_counter() - started, **labels)

    def count(self, **labels: object) -> int:
        """How many observations the label set has."""
        key = self._key(labels)
        with self._lock:
            series = self._series.get(key)
            return 0 if series is None else series.count

    def sum(self, **labels: object) -> float:
        """The sum of the label set's observations."""
        key = self._key(labels)
        with self._lock:
            series = self._series.get(key)
            return 0.0 if series is None else series.sum

    def lines(self) -> list[str]:
        """Cumulative `_bucket` lines (`le` up to `+Inf`), then `_sum` and `_count`, per label set."""
        with self._lock:
            items = sorted((k, list(s.buckets), s.sum, s.count) for k, s in self._series.items())
        out = self._header()
        for key, buckets, total, count in items:
            running = 0
            for bound, n in zip((*self.bounds, math.inf), buckets, strict=True):
                running += n
                out.append(f"{self.name}_bucket{self._labels(key, (('le', _number(bound)),))} {running}")
            out.append(f"{self.name}_sum{self._labels(key)} {_number(total)}")
            out.append(f"{self.name}_count{self._labels(key)} {count}")
        return out


class Registry:
    """The metrics of one process, by name; asking twice for a name returns the same metric."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._lock = threading.Lock()

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Counter:
        """The counter `name`, created on first use."""
        metric = self._get_or_add(Counter, name, labelnames, lambda: Counter(name, help_text, labelnames))
        assert isinstance(metric, Counter)
        return metric

    def histogram(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DURATION_BUCKETS,
    ) -> Histogram:
        """The histogram `name`, created on first use."""
        metric = self._get_or_add(
            Histogram, name, labelnames, lambda: Histogram(name, help_text, labelnames, buckets)
        )
        assert isinstance(metric, Histogram)
        return metric

    def _get_or_add(
        self, kind: type[_Metric], name: str, labelnames: Sequence[str], make: Callable[[], _Metric]
    ) -> _Metric:
        with self._lock:
            found = self._metrics.get(name)
            if found is None:
                found = self._metrics[name] = make()
        if type(found) is not kind or found.labelnames != tuple(labelnames):
            raise ValueError(
                f"metric {name} exists as a {found.kind} with labels {found.labelnames}; "
                f"asked for a {kind.kind} with labels {tuple(labelnames)}"
            )
        return found

    def exposition(self) -> str:
        """Every metric in the Prometheus text exposition format (0.0.4), by name."""
        with self._lock:
            metrics = sorted(self._metrics.values(), key=lambda m: m.name)
        lines = [line for metric in metrics for line in metric.lines()]
        return "\n".join(lines) + "\n" if lines else ""


REGISTRY: Final = Registry()
"""The process's registry: every service in this process records here."""


def seconds_since(moment: datetime) -> float:
    """Seconds from an aware datetime (a row's or an envelope's time stamp) to now, by the wall clock."""
    return time.time() - moment.timestamp()


# --- reading the exposition back ------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
"""`(sample name, frozenset of (label, value)) -> value`, e.g. `("x_seconds_count", {("route", "/")})`."""

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?\s*')


def parse_exposition(text: str) -> Samples:
    """The samples of a text exposition (comments skipped); `ValueError` on a line it cannot read."""
    samples: Samples = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            raise ValueError(f"not a metrics sample: {line!r}")
        name, labels_text, value = match.groups()
        labels: list[tuple[str, str]] = []
        if labels_text:
            position = 0
            while position < len(labels_text):
                pair = _PAIR.match(labels_text, position)
                if pair is None:
                    raise ValueError(f"bad labels in {line!r}")
                labels.append((pair.group(1), _unescape(pair.group(2))))
                position = pair.end()
        samples[(name, frozenset(labels))] = float(value)
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (e.g. a histogram's `_sum` by route)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value)) + ".0"
    return repr(value)
