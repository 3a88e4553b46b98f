"""The end-to-end bench at its test size: the JSON it writes has the documented shape, trainings
complete and the digits model learns. Figures are never asserted: this machine's timing is not a test."""

from __future__ import annotations

import gc
import os
from typing import Any
from uuid import uuid4

import asyncpg  # type: ignore[import-untyped]
import pytest

from bench.e2e import (
    SMALL_CLIENTS_B,
    SMALL_ROUNDS_A,
    BenchConfig,
    clients_heap_frozen,
    markdown_table,
    profile_text,
    run_bench,
)
from shared.runtime import GC_THRESHOLDS
from tests import postgres

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def _check_leaf(leaf: dict[str, Any], clients: int, rounds: int) -> None:
    assert "error" not in leaf, leaf.get("error")
    assert leaf["state"] == "COMPLETED"
    assert leaf["clients_finished"] == clients
    assert leaf["num_updates"] == [clients] * rounds
    assert len(leaf["round_s"]) == rounds
    assert all(isinstance(s, float) and s > 0 for s in leaf["round_s"])
    assert leaf["round_s_median"] == pytest.approx(sorted(leaf["round_s"])[rounds // 2])
    assert leaf["rss_mib"], "at least one process was sampled"
    assert all(mib > 0 for mib in leaf["rss_mib"].values())
    assert leaf["requests_per_client_round"] > 0
    assert leaf["connect_s"] > 0
    # The training started once every client listened; `fedhub serve` and `fedhub notifier` serve
    # a stream that opens its connection off the socket (a --set can say otherwise, see below).
    assert sum(leaf["streams_served_by"].values()) == clients
    # The accepted updates reach the orchestrator a group of reports at a time (`UpdatesReceived`):
    # at least one message per round, at most one per client and round (but for a broker's redeliveries).
    assert leaf["messages_by_type"]["UpdatesReceived"] >= rounds
    assert leaf["messages_per_client_round"] > 0
    # This machine's speed, measured just before the run (figures of different days compare by it).
    assert 0 < leaf["machine_ref_s"] < leaf["wall_s"]
    assert leaf["machine_memory_ns"] > 0
    # CPU over the training alone: within the run's, for the same processes.
    assert leaf["training_cpu_s"].keys() == leaf["cpu_s"].keys()
    for name, seconds in leaf["training_cpu_s"].items():
        assert 0 <= seconds <= leaf["cpu_s"][name]  # an idle second aggregator may use under a tick
    assert max(leaf["training_cpu_s"].values()) > 0


def _check(results: dict[str, Any], mode: str) -> None:
    assert set(results) == {"A", "B"}
    assert set(results["A"]) == {mode}
    assert set(results["B"]) == {mode}
    assert set(results["B"][mode]) == {str(SMALL_CLIENTS_B)}
    a = results["A"][mode]
    _check_leaf(a, 8, SMALL_ROUNDS_A)
    assert len(a["accuracy"]) == SMALL_ROUNDS_A + 1, "the initial model's accuracy, then one per round"
    assert a["accuracy"][-1] > a["accuracy"][0], f"the model did not learn: {a['accuracy']}"
    # The clients' own work in a round, measured without the server.
    assert a["local_round_s"] > 0
    assert f"local {a['local_round_s'] * 1000:.0f}" in markdown_table(results)
    assert f"mem {a['machine_memory_ns']:.0f}" in markdown_table(results)
    _check_leaf(results["B"][mode][str(SMALL_CLIENTS_B)], SMALL_CLIENTS_B, 5)
    assert mode in markdown_table(results)


def test_clients_heap_frozen_while_training_then_as_before() -> None:
    """The simulated clients' heap is out of the collector's scans during a training only."""
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)  # Python's default, whatever ran in this process before
    try:
        kept = [[] for _ in range(100)]  # container objects alive when the training starts
        with clients_heap_frozen():
            assert gc.get_freeze_count() >= len(kept)
            assert gc.get_threshold() == GC_THRESHOLDS, "young collections as rare as in fedhub's processes"
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold() == (700, 10, 10)
    finally:
        gc.set_threshold(*before)


async def _small(mode: str, config: BenchConfig) -> dict[str, Any]:
    return await run_bench(
        ("A", "B"), (mode,), (SMALL_CLIENTS_B,), rounds_a=SMALL_ROUNDS_A, rounds_b=5, config=config
    )


def _check_profile(leaf: dict[str, Any], clients: int, rounds: int, *, tests: bool) -> None:
    """The split of a round from the services' metrics: every phase counted as often as it happened."""
    profile = leaf["profile"]
    assert profile["upload"]["count"] >= clients * rounds  # a client may retry one under load
    # Both workloads' models are small: each round's notification carries it, and the training
    # starts once every client listens, so no client has a training under way to catch up with.
    assert profile["download"]["count"] == 0
    if tests:
        assert profile["test"]["count"] >= clients * rounds
    else:
        assert profile["test"]["count"] == 0
    assert profile["aggregation"]["job"]["count"] == rounds
    assert {"read", "decode", "validate", "aggregate", "store", "commit"} <= set(
        profile["aggregation"]["stages"]
    )
    assert profile["trigger"]["UpdatesReceived -> aggregation"]["count"] == rounds
    # Both workloads average small float32 models: every round on the numpy engine, torch never loaded.
    assert profile["aggregation"]["rounds_by_engine"] == {"numpy": rounds}
    streamed = profile["fan_out"]["issued_to_stream"]["count"]
    assert streamed >= clients * rounds, "each client's stream got each round's notification"
    assert profile["upload"]["per_round_s"] > 0
    assert profile["upload"]["mean_s"] > 0


async def test_embedded_small_bench(tmp_path) -> None:
    """Embedded mode (`fedhub serve` in a process of its own) with --profile: both workloads complete;
    the server and the clients' process are sampled apart; the profile counts every phase."""
    results = await _small("embedded", BenchConfig(work_dir=tmp_path, profile=True))
    _check(results, "embedded")
    assert set(results["A"]["embedded"]["rss_mib"]) == {"embedded", "bench (clients)"}
    assert set(results["A"]["embedded"]["cpu_s"]) == {"embedded", "bench (clients)"}
    _check_profile(results["A"]["embedded"], 8, SMALL_ROUNDS_A, tests=True)
    _check_profile(results["B"]["embedded"][str(SMALL_CLIENTS_B)], SMALL_CLIENTS_B, 5, tests=False)
    assert "upload" in profile_text(results)
    assert results["B"]["embedded"][str(SMALL_CLIENTS_B)]["streams_served_by"]["socket"] == SMALL_CLIENTS_B


async def test_embedded_in_process_small_bench(tmp_path) -> None:
    """`--embedded-in-process`: the server runs in the bench process, whose one figure covers both;
    a `--set` reaches it (here: every stream through the app) and leaves the environment as it was."""
    config = BenchConfig(
        work_dir=tmp_path, embedded_in_process=True, server_env={"FEDHUB_SOCKET_STREAMS": "false"}
    )
    results = await run_bench(("B",), ("embedded",), (SMALL_CLIENTS_B,), rounds_b=3, config=config)
    leaf = results["B"]["embedded"][str(SMALL_CLIENTS_B)]
    _check_leaf(leaf, SMALL_CLIENTS_B, 3)
    assert set(leaf["rss_mib"]) == {"embedded"}
    assert leaf["streams_served_by"] == {"socket": 0, "asgi": SMALL_CLIENTS_B}
    assert "FEDHUB_SOCKET_STREAMS" not in os.environ


@pytest.mark.integration
async def test_distributed_small_bench(tmp_path, rabbitmq_url: str) -> None:
    """Distributed mode with --profile: both workloads complete over PostgreSQL and RabbitMQ; every
    service is sampled and scraped."""
    try:
        await postgres.drop_database(f"fedhub_bench_probe_{uuid4().hex[:8]}")  # reachable?
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        postgres.unavailable(f"{type(exc).__name__}: {exc}")
    config = BenchConfig(
        admin_dsn=postgres.ADMIN_DSN,
        amqp_url=rabbitmq_url,
        work_dir=tmp_path,
        profile=True,
        server_env={"FEDHUB_SOCKET_STREAMS": "false"},
    )
    results = await _small("distributed", config)
    _check(results, "distributed")
    # The --set reached the notifier process: every stream went through the app.
    for leaf in (results["A"]["distributed"], results["B"]["distributed"][str(SMALL_CLIENTS_B)]):
        assert leaf["streams_served_by"]["socket"] == 0
    rss = results["B"]["distributed"][str(SMALL_CLIENTS_B)]["rss_mib"]
    assert {"api", "notifier", "orchestrator", "aggregator-1", "aggregator-2"} <= set(rss)
    # Scraped from every process: the api's requests, the orchestrator's triggers, both aggregators.
    _check_profile(results["A"]["distributed"], 8, SMALL_ROUNDS_A, tests=True)
    _check_profile(results["B"]["distributed"][str(SMALL_CLIENTS_B)], SMALL_CLIENTS_B, 5, tests=False)
