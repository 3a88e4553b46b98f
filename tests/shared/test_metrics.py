"""The metrics facility: counters and histograms by labels, the Prometheus text they write, read back."""

from __future__ import annotations

import math

import pytest

from shared.metrics import DURATION_BUCKETS, Registry, parse_exposition, total


def test_counter_counts_per_label_set() -> None:
    """Each label set counts apart; a counter never decreases; its name must end in _total."""
    registry = Registry()
    hits = registry.counter("fedhub_test_hits_total", "hits", ("result",))
    hits.inc(result="hit")
    hits.inc(2, result="hit")
    hits.inc(result="miss")
    assert hits.value(result="hit") == 3
    assert hits.value(result="miss") == 1
    assert hits.value(result="never") == 0
    with pytest.raises(ValueError, match="cannot decrease"):
        hits.inc(-1, result="hit")
    with pytest.raises(ValueError, match="_total"):
        registry.counter("fedhub_test_hits", "no suffix")


def test_histogram_buckets_sum_and_count() -> None:
    """Observations land in the first bucket whose bound is not below them; sum and count add up."""
    registry = Registry()
    seconds = registry.histogram("fedhub_test_seconds", "durations", ("route",), buckets=(0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        seconds.observe(value, route="/a")
    seconds.observe(-1.0, route="/b")  # clocks of two hosts: counted as 0
    assert seconds.count(route="/a") == 4
    assert seconds.sum(route="/a") == pytest.approx(3.65)
    assert seconds.sum(route="/b") == 0.0
    samples = parse_exposition(registry.exposition())
    bucket = "fedhub_test_seconds_bucket"
    assert samples[(bucket, frozenset({("route", "/a"), ("le", "0.1")}))] == 2
    assert samples[(bucket, frozenset({("route", "/a"), ("le", "1.0")}))] == 3
    assert samples[(bucket, frozenset({("route", "/a"), ("le", "+Inf")}))] == 4
    assert samples[("fedhub_test_seconds_count", frozenset({("route", "/a")}))] == 4
    assert samples[("fedhub_test_seconds_sum", frozenset({("route", "/a")}))] == pytest.approx(3.65)


def test_time_observes_the_block_even_when_it_raises() -> None:
    """`time()` records one observation per block, also for a block that raised."""
    registry = Registry()
    seconds = registry.histogram("fedhub_test_block_seconds", "blocks")
    with seconds.time():
        pass
    with pytest.raises(RuntimeError), seconds.time():
        raise RuntimeError("boom")
    assert seconds.count() == 2
    assert 0 <= seconds.sum() < 60


def test_labels_must_match_the_declaration() -> None:
    """A missing, extra or misnamed label is refused rather than silently making a new series."""
    registry = Registry()
    seconds = registry.histogram("fedhub_test_labels_seconds", "x", ("a", "b"))
    with pytest.raises(ValueError, match="takes labels"):
        seconds.observe(1.0, a="1")
    with pytest.raises(ValueError, match="takes labels"):
        seconds.observe(1.0, a="1", c="2")
    with pytest.raises(ValueError, match="not allowed"):
        registry.histogram("fedhub_test_le_seconds", "x", ("le",))
    with pytest.raises(ValueError, match="not a valid"):
        registry.counter("fedhub test_total", "x")


def test_registry_returns_the_same_metric_and_refuses_a_different_one() -> None:
    """Asking twice for a name gives the same object; another kind or other labels is an error."""
    registry = Registry()
    first = registry.histogram("fedhub_test_same_seconds", "x", ("route",))
    assert registry.histogram("fedhub_test_same_seconds", "x", ("route",)) is first
    with pytest.raises(ValueError, match="exists as a histogram"):
        registry.counter("fedhub_test_same_seconds", "x", ("route",))
    with pytest.raises(ValueError, match="exists as a histogram"):
        registry.histogram("fedhub_test_same_seconds", "x", ("method",))


def test_exposition_format_and_escaping_round_trip() -> None:
    """HELP and TYPE lines come first; label values with quotes, backslashes and newlines survive."""
    registry = Registry()
    hits = registry.counter("fedhub_test_escape_total", "a help\nline", ("path",))
    odd = 'a "quoted" \\ path\nwith a newline'
    hits.inc(path=odd)
    text = registry.exposition()
    lines = text.splitlines()
    assert lines[0] == "# HELP fedhub_test_escape_total a help\\nline"
    assert lines[1] == "# TYPE fedhub_test_escape_total counter"
    assert text.endswith("\n")
    assert parse_exposition(text) == {("fedhub_test_escape_total", frozenset({("path", odd)})): 1.0}


def test_default_buckets_cover_a_cached_lookup_to_a_long_aggregation() -> None:
    """The duration buckets start below a millisecond and go past ten seconds, in order."""
    assert list(DURATION_BUCKETS) == sorted(DURATION_BUCKETS)
    assert DURATION_BUCKETS[0] <= 0.001
    assert DURATION_BUCKETS[-1] >= 10
    registry = Registry()
    registry.histogram("fedhub_test_default_seconds", "x").observe(math.inf)
    samples = parse_exposition(registry.exposition())
    assert samples[("fedhub_test_default_seconds_bucket", frozenset({("le", "+Inf")}))] == 1


def test_total_sums_matching_series_and_parse_refuses_garbage() -> None:
    """`total` adds the samples whose labels include the ones asked for; a bad line is an error."""
    registry = Registry()
    seconds = registry.histogram("fedhub_test_total_seconds", "x", ("app", "route"))
    seconds.observe(1.0, app="api", route="/a")
    seconds.observe(2.0, app="notifier", route="/a")
    seconds.observe(4.0, app="api", route="/b")
    samples = parse_exposition(registry.exposition())
    assert total(samples, "fedhub_test_total_seconds_sum", route="/a") == 3.0
    assert total(samples, "fedhub_test_total_seconds_count", app="api") == 2
    assert total(samples, "fedhub_test_total_seconds_count") == 3
    with pytest.raises(ValueError, match="not a metrics sample"):
        parse_exposition("this is not { a sample")
