"""End-to-end round time of fedhub, round by round, in embedded and distributed mode.

Workload A trains the digits MLP with 8 non-IID clients (a fixed recipe, so the accuracy curve is
comparable between runs); workload B echoes one 10x10 tensor with 10 to 1,000 clients to measure
the server's per-round overhead. Round times come from the server's own timeline
(`GET /v1/trainings/{id}/rounds`): round i lasts from its `started_at` to round i+1's (the last one
to its `finished_at`). Clients run in this process (asyncio, real HTTP and event streams).

    python bench/e2e.py --json /tmp/e2e.json
    python bench/e2e.py --small --modes embedded
    python bench/e2e.py --workloads A --modes embedded --profile

`--profile` scrapes every service's `GET /metrics` before the first round and after the last and
splits a round into fan-out, download, upload, aggregation, test and trigger from the services' own
timing metrics (per round, and per request where a phase is one request per client).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import aiohttp
import httpx
import numpy as np
import torch
from torch import nn

from fedhub.client import ActorClient, Client
from fedhub.client.retry import RetryPolicy
from fedhub.client.transport import new_session
from fedhub.demo import Server
from fedhub.task import (
    NUM_CLASSES,
    NUM_FEATURES,
    dirichlet_split,
    load_digits_split,
    make_model,
    train_one_round,
)
from fedhub.task import evaluate as evaluate_model
from shared.metrics import Samples, parse_exposition, total
from shared.runtime import collect_less_often, freeze_startup_heap

MODES = ("embedded", "distributed")
WORKLOADS = ("A", "B")
A_CLIENTS = 8
SMALL_ROUNDS_A = 3
SMALL_CLIENTS_B = 20
DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"

# The goals, beside the figures in the table.
GOAL_A_S = {"embedded": 0.1, "distributed": 0.2}
GOAL_B_1000_S = {"embedded": 1.0, "distributed": 2.0}
GOAL_EMBEDDED_MIB = 250.0
GOAL_SERVICE_MIB = 150.0
GOAL_SERVICES = ("api", "orchestrator", "notifier")


@dataclass
class BenchConfig:
    """Where distributed runs find PostgreSQL and RabbitMQ, and where files go."""

    admin_dsn: str = field(
        default_factory=lambda: os.environ.get(
            "FEDHUB_BENCH_POSTGRES_DSN", os.environ.get("FEDHUB_TEST_POSTGRES_DSN", DEFAULT_ADMIN_DSN)
        )
    )
    """A PostgreSQL database the bench may connect to and create (and drop) databases from."""
    amqp_url: str = field(
        default_factory=lambda: os.environ.get("FEDHUB_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    work_dir: Path | None = None
    """Parent of each run's data (SQLite, blobs, logs); a temporary folder when None."""
    aggregators: int = 2
    log_level: str = "WARNING"
    round_timeout_s: float = 600.0
    run_timeout_s: float = 900.0
    """A run taking longer is cancelled and reported as failed, so that the others still run."""
    shared_http: bool = False
    """One HTTP session (`aiohttp.ClientSession`) for all the simulated clients instead of one each."""
    profile: bool = False
    """Scrape the services' metrics around the rounds and add the split of a round to each leaf."""
    embedded_in_process: bool = False
    """Run embedded mode inside the bench process (with the clients) instead of as `fedhub serve`."""
    server_env: dict[str, str] = field(default_factory=dict)
    """`FEDHUB_*` settings for the server's processes (`--set`), on top of the bench's own. The
    bench starts each with an environment it writes itself: exported variables do not reach them."""


# ---------------------------------------------------------------------------------------------------
# RSS sampling
# ---------------------------------------------------------------------------------------------------


def rss_mib(pid: int) -> float | None:
    """VmRSS of `pid` in MiB, None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time `pid` has used (seconds), None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # After the command's closing parenthesis: state is field 3, utime 14 and stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """A thread reading VmRSS of named processes every `interval_s`, keeping each one's peak; and
    the CPU time each used while it ran (wall time on a shared machine depends on what else runs,
    CPU time much less)."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.2) -> None:
        self.pids = pids
        self.interval_s = interval_s
        self.peak: dict[str, float] = {}
        self._cpu_start: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        for name, pid in self.pids.items():
            value = rss_mib(pid)
            if value is not None:
                self.peak[name] = max(self.peak.get(name, 0.0), value)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        for name, pid in self.pids.items():
            start = cpu_seconds(pid)
            if start is not None:
                self._cpu_start[name] = start
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        for name, start in self._cpu_start.items():
            end = cpu_seconds(self.pids[name])
            if end is not None:
                self.cpu[name] = round(end - start, 2)

    def cpu_now(self) -> dict[str, float]:
        """CPU seconds each process has used so far (those still running)."""
        now = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        return {name: value for name, value in now.items() if value is not None}

    def result(self) -> dict[str, float]:
        """Peak MiB per process, rounded."""
        return {name: round(value, 1) for name, value in self.peak.items()}


@contextlib.contextmanager
def clients_heap_frozen() -> Iterator[None]:
    """While a training runs, the simulated clients' process collects garbage as a serving process does.

    A real client is a process of its own, with a heap of one client. Here up to 1,000 clients share
    one heap (~280k objects once they are connected: sessions, streams, tasks), and each of Python's
    full collections walked all of it: 0.2-0.4 s with every client's loop stopped, five times a
    B 1,000 training, a cost of the simulation rather than of the server or of a client. So the
    heap as set up is frozen (`gc.freeze`) and young collections are as rare as in fedhub's own
    processes (`shared.runtime`); both are undone after the training, for the next run.
    """
    thresholds = gc.get_threshold()
    freeze_startup_heap()
    collect_less_often()
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


# ---------------------------------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serve(mode: str, config: BenchConfig) -> AsyncIterator[tuple[Server, dict[str, int]]]:
    """Run fedhub in `mode`; yield the server and the pids whose RSS to sample, by name.

    Embedded mode is `fedhub serve` (the four services in one process) in a process of its own, as a
    deployment runs it, with the clients in this one; `embedded_in_process` runs it inside this
    process instead (clients and server then share one event loop, and the one RSS figure is both's).
    Distributed mode gets a fresh PostgreSQL database and a bus namespace of its own, dropped after.
    """
    with tempfile.TemporaryDirectory(prefix="fedhub-bench-", dir=config.work_dir) as tmp:
        data_dir = Path(tmp)
        if mode == "embedded" and config.embedded_in_process:
            from fedhub.embedded import EmbeddedServer, EmbeddedSettings

            with _environ(config.server_env):
                settings = EmbeddedSettings(data_dir=data_dir, log_level=config.log_level)
                async with EmbeddedServer(settings) as server:
                    yield server, {"embedded": os.getpid()}
            return
        if mode == "embedded":
            async with embedded_process(data_dir, config) as process:
                pids = {"embedded": process.pid, "bench (clients)": os.getpid()}
                yield process, pids
            return
        if mode != "distributed":
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        from fedhub.distributed import ClusterSettings, LocalCluster

        database = await create_database(config.admin_dsn)
        try:
            cluster_settings = ClusterSettings(
                database_url=async_url(config.admin_dsn, database),
                amqp_url=config.amqp_url,
                aggregators=config.aggregators,
                log_dir=data_dir / "logs",
                log_level=config.log_level,
                bus_namespace=f"fedhub-bench-{uuid4().hex[:8]}",
                delete_bus_namespace=True,
                extra_env=dict(config.server_env),
            )
            async with LocalCluster(cluster_settings) as cluster:
                pids = {
                    name: service.process.pid
                    for name, service in cluster.services.items()
                    if service.process is not None
                }
                # The clients live in the bench process: shown apart from the services.
                pids["bench (clients)"] = os.getpid()
                yield cluster, pids
        finally:
            await drop_database(config.admin_dsn, database)


@dataclass(frozen=True)
class EmbeddedProcess:
    """A `fedhub serve` process: where its clients reach it."""

    base_url: str
    admin_token: str
    pid: int

    @property
    def events_url(self) -> str:
        """`/v1/events` is served by the same process."""
        return self.base_url


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """`values` set in this process's environment for the block (embedded in process reads them)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _start_serve(data_dir: Path, port: int, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "fedhub.cli", "serve", "--data-dir", str(data_dir), "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


@contextlib.asynccontextmanager
async def embedded_process(data_dir: Path, config: BenchConfig) -> AsyncIterator[EmbeddedProcess]:
    """Start `fedhub serve` on a free port over `data_dir`; wait for `/readyz`; SIGTERM it after."""
    from fedhub.distributed import free_port

    port = free_port()
    token = "fh_admin_" + uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDHUB_")}
    env.update(config.server_env)
    env.update(FEDHUB_ADMIN_TOKEN=token, FEDHUB_LOG_LEVEL=config.log_level)
    log_path = data_dir / "embedded.log"
    process = _start_serve(data_dir, port, env, log_path)
    base_url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=2) as http:
            deadline = time.monotonic() + 60
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"fedhub serve exited with {process.returncode}; see {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{base_url}/readyz")).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"fedhub serve not ready after 60 s; see {log_path}")
                await asyncio.sleep(0.1)
        yield EmbeddedProcess(base_url=base_url, admin_token=token, pid=process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 15)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)


def add_postgres_flag(parser: argparse.ArgumentParser, help_text: str) -> None:
    """`--postgres [ADMIN_DSN]`: the run over a fresh PostgreSQL database on that server (without a
    value: `BenchConfig`'s), None when not given."""
    parser.add_argument(
        "--postgres",
        nargs="?",
        const=BenchConfig().admin_dsn,
        default=None,
        metavar="ADMIN_DSN",
        help=help_text,
    )


def async_url(admin_dsn: str, database: str) -> str:
    """The SQLAlchemy asyncpg URL of `database` on the server of `admin_dsn`."""
    from sqlalchemy.engine import make_url

    url = make_url(admin_dsn).set(drivername="postgresql+asyncpg", database=database)
    return url.render_as_string(hide_password=False)


async def create_database(admin_dsn: str) -> str:
    """Create an empty, uniquely named database; return its name (`fedhub db upgrade` migrates it)."""
    import asyncpg  # type: ignore[import-untyped]

    name = f"fedhub_bench_{uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin_dsn, timeout=5)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_database(admin_dsn: str, name: str) -> None:
    """Drop `name`, closing the connections still open to it."""
    import asyncpg

    conn = await asyncpg.connect(admin_dsn, timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


# ---------------------------------------------------------------------------------------------------
# Profile: where a round's time goes, from the services' own metrics
# ---------------------------------------------------------------------------------------------------

HTTP = "fedhub_http_request_duration_seconds"
ROUTES = {
    "download": ("GET", "/v1/models/{model_id}/weights"),
    "upload": ("POST", "/v1/trainings/{training_id}/updates"),
    "test": ("POST", "/v1/trainings/{training_id}/test-metrics"),
}
"""The per-request phases: one request per client and round (test: per test round)."""


def metrics_urls(server: Server) -> list[str]:
    """Where each process of `server` answers `GET /metrics` (embedded: the one process)."""
    services = getattr(server, "services", None)
    if isinstance(services, dict):
        return [f"http://127.0.0.1:{s.health_port}/metrics" for s in services.values()]
    return [f"{server.base_url}/metrics"]


async def scrape(urls: Sequence[str]) -> Samples:
    """Every process's samples, summed by name and labels (aggregator replicas add up)."""
    merged: Samples = {}
    async with httpx.AsyncClient(timeout=10) as http:
        for url in urls:
            response = await http.get(url)
            response.raise_for_status()
            for key, value in parse_exposition(response.text).items():
                merged[key] = merged.get(key, 0.0) + value
    return merged


STREAMS_OPENED = "fedhub_event_streams_opened_total"
"""The notifier's counter of event streams opened, by what served them (`served_by`)."""


async def streams_open(server: Server, before: Samples, n: int, clients: Sequence[asyncio.Task[Any]]) -> None:
    """Until `n` more event streams are open than at `before` (the notifier's counter), polling; a
    client that ended meanwhile raises its error."""
    while total(await scrape(metrics_urls(server)), STREAMS_OPENED) - total(before, STREAMS_OPENED) < n:
        for task in clients:
            if task.done():
                task.result()
                raise RuntimeError(f"{task.get_name()} ended before the training started")
        await asyncio.sleep(0.05)


def _delta(before: Samples, after: Samples) -> Samples:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def bus_messages(before: Samples, after: Samples, client_rounds: int) -> dict[str, Any]:
    """Messages the services took off the bus between two scrapes (one per consumer that got it),
    per client and round (`messages_per_client_round`) and in all by type (`messages_by_type`)."""
    d = _delta(before, after)
    name = "fedhub_message_delivery_seconds"
    by_type = {kind: round(total(d, f"{name}_count", type=kind)) for kind in _label_values(d, name, "type")}
    by_type = {kind: n for kind, n in by_type.items() if n}
    return {
        "messages_per_client_round": round(sum(by_type.values()) / client_rounds, 2),
        "messages_by_type": by_type,
    }


def _phase(samples: Samples, name: str, rounds: int, **labels: str) -> dict[str, float]:
    """Count and seconds of histogram `name` (labels matching), per round and per observation."""
    count = total(samples, f"{name}_count", **labels)
    seconds = total(samples, f"{name}_sum", **labels)
    return {
        "count": round(count),
        "per_round_s": round(seconds / rounds, 4),
        "mean_s": round(seconds / count, 5) if count else 0.0,
    }


def _label_values(samples: Samples, name: str, label: str) -> list[str]:
    return sorted({v for (n, ls), _ in samples.items() if n == f"{name}_count" for k, v in ls if k == label})


def profile_split(before: Samples, after: Samples, rounds: int) -> dict[str, Any]:
    """A round split into its phases from two scrapes taken around `rounds` rounds.

    Each phase has `count` (observations in all), `per_round_s` (their seconds summed, per round:
    for per-request phases that is every client's request added up) and `mean_s` (per observation:
    per request, per stream, per job). Phases overlap in time: clients download and upload at
    once, so per-request sums exceed the round's wall time; `mean_s` is what one client waits.
    """
    d = _delta(before, after)
    out: dict[str, Any] = {
        "fan_out": {
            "issued_to_stored": _phase(d, "fedhub_notification_stored_seconds", rounds),
            "stored_to_stream": _phase(d, "fedhub_notification_fanout_seconds", rounds),
            "issued_to_stream": _phase(d, "fedhub_notification_delivered_seconds", rounds),
        }
    }
    for name, (method, route) in ROUTES.items():
        out[name] = _phase(d, HTTP, rounds, method=method, route=route)
    stages = {
        stage: _phase(d, "fedhub_aggregator_stage_seconds", rounds, stage=stage)
        for stage in _label_values(d, "fedhub_aggregator_stage_seconds", "stage")
    }
    out["aggregation"] = {
        "job": _phase(d, "fedhub_message_handle_seconds", rounds, consumer="aggregator"),
        "stages": stages,
        "rounds_by_engine": {
            dict(labels)["engine"]: round(n)
            for (name, labels), n in d.items()
            if name == "fedhub_aggregator_rounds_total" and n
        },
    }
    triggers: dict[str, Any] = {}
    for on in _label_values(d, "fedhub_orchestrator_trigger_seconds", "on"):
        for emits in _label_values(d, "fedhub_orchestrator_trigger_seconds", "emits"):
            phase = _phase(d, "fedhub_orchestrator_trigger_seconds", rounds, on=on, emits=emits)
            if phase["count"]:
                triggers[f"{on} -> {emits}"] = phase
    out["trigger"] = triggers
    known = {route for _, route in ROUTES.values()}
    other = {}
    for route in _label_values(d, HTTP, "route"):
        if route not in known and route != "/metrics":
            phase = _phase(d, HTTP, rounds, route=route)
            if phase["count"]:
                other[route] = phase
    out["other_requests"] = other
    messages = {}
    for consumer in _label_values(d, "fedhub_message_delivery_seconds", "consumer"):
        for kind in _label_values(d, "fedhub_message_delivery_seconds", "type"):
            delivery = _phase(d, "fedhub_message_delivery_seconds", rounds, consumer=consumer, type=kind)
            if delivery["count"]:
                handle = _phase(d, "fedhub_message_handle_seconds", rounds, consumer=consumer, type=kind)
                messages[f"{consumer} {kind}"] = {"delivery": delivery, "handle": handle}
    out["messages"] = messages
    return out


# ---------------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------------


def _mlp() -> nn.Module:
    # The same architecture as make_model, built without reseeding the global RNG from worker threads.
    return nn.Sequential(nn.Linear(NUM_FEATURES, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES))


def _load(weights: dict[str, torch.Tensor]) -> nn.Module:
    model = _mlp()
    model.load_state_dict(weights)
    return model


@dataclass(frozen=True, eq=False)
class DigitsRecipe:
    """Workload A's data: the digits split, 8 Dirichlet(0.5) client shares of the training part."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    shares: tuple[np.ndarray, ...]

    @classmethod
    def create(cls, num_clients: int = A_CLIENTS) -> DigitsRecipe:
        """`train_test_split(X / 16, y, test_size=0.2, random_state=0)`; Dirichlet(0.5) with seed 0."""
        x_train, x_test, y_train, y_test = load_digits_split()
        shares = dirichlet_split(y_train, num_clients, alpha=0.5, seed=0)
        return cls(x_train, y_train, x_test, y_test, tuple(shares))

    def fit_fn(self, client: int) -> Callable[..., tuple[dict[str, torch.Tensor], int, dict[str, float]]]:
        """One local epoch of SGD (lr 0.05, batch 32) on the client's whole share."""
        x, y = self.x_train[self.shares[client]], self.y_train[self.shares[client]]
        # The client's network, built once and loaded with each round's global weights, as a client
        # keeps its model (building one per round initialised weights only to overwrite them: ~10%
        # of the clients' CPU in a round). The SDK never runs one client's fits at the same time.
        model = _mlp()

        def fit(weights: dict[str, torch.Tensor], config: dict[str, Any]):
            model.load_state_dict(weights)
            metrics = train_one_round(
                model, x, y, round=int(config["round"]), client=client, epochs=1, lr=0.05, batch_size=32
            )
            return {k: v.detach().clone() for k, v in model.state_dict().items()}, len(y), metrics

        return fit

    def evaluate_fn(self, client: int) -> Callable[..., tuple[int, dict[str, float]]]:
        """The test round's evaluation, on the client's share."""
        x, y = self.x_train[self.shares[client]], self.y_train[self.shares[client]]
        model = _mlp()  # as in `fit_fn`: one network for the client's test rounds

        def evaluate(weights: dict[str, torch.Tensor], config: dict[str, Any]):
            model.load_state_dict(weights)
            return evaluate_model(model, x, y)

        return evaluate

    def test_accuracy(self, weights: dict[str, torch.Tensor]) -> float:
        """Accuracy of a global model on the held-out test split."""
        _, metrics = evaluate_model(_load(weights), self.x_test, self.y_test)
        return round(metrics["accuracy"], 4)


async def _echo(weights: dict[str, torch.Tensor], config: dict[str, Any]):
    """Workload B's fit: the global model back, with sample size 1. An `async def` fit, so the SDK
    awaits it on the clients' loop: an echo has no work to hand to a thread (1,000 hops a round
    were ~14% of the clients' process)."""
    return weights, 1, {}


def round_durations(rounds: Sequence[dict[str, Any]]) -> list[float]:
    """Seconds from each round's start to the next one's (the last: to its `finished_at`)."""
    out = []
    for i, r in enumerate(rounds):
        start = datetime.fromisoformat(str(r["started_at"]))
        end = rounds[i + 1]["started_at"] if i + 1 < len(rounds) else r.get("finished_at")
        if end:
            out.append(round((datetime.fromisoformat(str(end)) - start).total_seconds(), 4))
    return out


def until_aggregated(rounds: Sequence[dict[str, Any]]) -> list[float | None]:
    """Seconds from each round's start to its model's being recorded (collecting + aggregating)."""
    out: list[float | None] = []
    for r in rounds:
        done = r.get("aggregated_at")
        start = datetime.fromisoformat(str(r["started_at"]))
        out.append(round((datetime.fromisoformat(str(done)) - start).total_seconds(), 4) if done else None)
    return out


@dataclass
class _Participants:
    fit: Callable[[int], Any]
    evaluate: Callable[[int], Any] | None


async def _run_training(
    server: Server,
    pids: dict[str, int],
    *,
    initial: dict[str, torch.Tensor],
    num_clients: int,
    rounds: int,
    participants: _Participants,
    skip_model_tests: bool,
    config: BenchConfig,
) -> tuple[dict[str, Any], list[dict[str, Any]], ActorClient]:
    """Create principals and a training, run the clients to the end; the leaf (without accuracy),
    the rounds and the (open) actor client."""
    requests = 0

    async def count(session: object, context: object, params: aiohttp.TraceRequestStartParams) -> None:
        nonlocal requests
        requests += 1

    def session(limit: int = 100) -> aiohttp.ClientSession:
        trace = aiohttp.TraceConfig()
        trace.on_request_start.append(count)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=60.0, sock_read=300.0)
        return new_session(timeout=timeout, limit=limit, trace_configs=[trace])

    if config.shared_http:
        # One pool for every client: each holds an event stream open and makes a request or two at once.
        https = [session(limit=2 * num_clients + 20)] * num_clients
    else:
        https = [session() for _ in range(num_clients)]
    actor = ActorClient(server.base_url, server.admin_token, events_url=server.events_url)
    setup_started = time.perf_counter()
    semaphore = asyncio.Semaphore(50)

    async def principal(i: int) -> Any:
        async with semaphore:
            return await actor.create_principal(f"bench-client-{i}")

    principals = await asyncio.gather(*(principal(i) for i in range(num_clients)))
    model = await actor.upload_model(initial, name="bench")
    training = await actor.create_training(
        model.id,
        [p.id for p in principals],
        rounds=rounds,
        round_timeout_s=config.round_timeout_s,
        skip_model_tests=skip_model_tests,
    )
    training_id = UUID(str(training["id"]))
    retry = RetryPolicy(attempts=8)
    clients = [
        Client(
            server.base_url,
            p.token,
            fit=participants.fit(i),
            evaluate=participants.evaluate(i) if participants.evaluate is not None else None,
            training_id=training_id,
            http=https[i],
            retry=retry,
            name=p.name,
            events_url=server.events_url,
        )
        for i, p in enumerate(principals)
    ]
    try:
        with RssSampler(pids) as sampler:
            opened = await scrape(metrics_urls(server))
            connecting = time.perf_counter()
            tasks = [asyncio.create_task(c.run(), name=f"bench-client-{i}") for i, c in enumerate(clients)]
            # As Flower's server waits for its clients before round 1: the training starts once every
            # client listens, so round 1 is a round, not the clients connecting.
            await streams_open(server, opened, num_clients, tasks)
            connect_s = time.perf_counter() - connecting
            before = await scrape(metrics_urls(server))
            served_by = {
                kind: total(before, STREAMS_OPENED, served_by=kind)
                - total(opened, STREAMS_OPENED, served_by=kind)
                for kind in ("socket", "asgi")
            }
            setup_s = time.perf_counter() - setup_started
            requests = 0
            with clients_heap_frozen():
                cpu_before = sampler.cpu_now()
                started = time.perf_counter()
                await actor.start_training(training_id)
                try:
                    results = await asyncio.gather(*tasks)
                finally:
                    for task in tasks:
                        task.cancel()
                training_s = time.perf_counter() - started
                cpu_after = sampler.cpu_now()
            after = await scrape(metrics_urls(server))
    finally:
        for http in set(https):
            await http.close()
    final = await actor.get_training(training_id)
    rounds_json = await actor.get_rounds(training_id)
    round_s = round_durations(rounds_json)
    leaf: dict[str, Any] = {
        "clients": num_clients,
        "rounds": rounds,
        "state": str(final["state"]),
        "clients_finished": sum(r.state == "COMPLETED" for r in results),
        "num_updates": [r.get("num_updates") for r in rounds_json],
        "round_s": round_s,
        "round_s_median": round(statistics.median(round_s), 4) if round_s else None,
        "until_aggregated_s": until_aggregated(rounds_json),
        "training_s": round(training_s, 3),
        "setup_s": round(setup_s, 3),
        "connect_s": round(connect_s, 3),
        "streams_served_by": served_by,
        "requests_per_client_round": round(requests / (num_clients * rounds), 2),
        **bus_messages(before, after, num_clients * rounds),
        "rss_mib": sampler.result(),
        "cpu_s": sampler.cpu,
        "training_cpu_s": {
            name: round(cpu_after[name] - start, 2) for name, start in cpu_before.items() if name in cpu_after
        },
    }
    if config.profile:
        leaf["profile"] = profile_split(before, after, rounds)
    return leaf, rounds_json, actor


def warm_up_torch() -> None:
    """Build one optimizer before the clock starts: the first one imports torch._dynamo (~1 s), a
    one-off cost of the client process that would otherwise land in round 1."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def machine_reference_s(repeats: int = 5) -> float:
    """Seconds for a fixed piece of pure-Python work of the kind the services do (small objects,
    dicts, JSON), the median of `repeats`: this machine's speed at the moment of a run, measured
    in the same run. The same code has measured up to twice as slow on one day as on another, so a
    round time means little without it."""
    doc = {f"key-{i}": {"id": i, "name": str(i), "values": [i * 0.5, i * 0.25]} for i in range(100)}
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(60):
            rows = [
                ReferenceRow(k, v["id"], tuple(v["values"])) for k, v in json.loads(json.dumps(doc)).items()
            ]
            ordered = sorted(rows, key=lambda r: (r.values[1], r.name))
            assert len({r.name: r for r in ordered}) == len(doc)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 4)


def machine_memory_ns(objects: int = 60_000, accesses: int = 300_000, repeats: int = 3) -> float:
    """Nanoseconds per read of a small object at a random place in a heap of `objects` (~14 MiB,
    past the 1 MiB L2 cache of this machine's cores, within its 32 MiB L3 by size), the median of
    `repeats`. `machine_reference_s` is work that stays in a core's caches; a server's heap does
    not, and on this virtual machine a random read there costs from ~0.2 to ~0.6 us (the cache
    shared with other tenants, page walks under nested paging), so the same server code runs at a
    speed this figure tells and the other does not."""
    heap = [{"id": i} for i in range(objects)]
    places = np.random.default_rng(0).integers(0, objects, accesses).tolist()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        total = 0
        for place in places:
            total += heap[place]["id"]
        times.append(time.perf_counter() - started)
    assert total > 0
    return round(statistics.median(times) / accesses * 1e9, 1)


@dataclass(frozen=True)
class ReferenceRow:
    """One row of `machine_reference_s`'s work."""

    name: str
    id: int
    values: tuple[float, ...]


def local_round_s(recipe: DigitsRecipe, initial: dict[str, torch.Tensor], repeats: int = 3) -> float:
    """Workload A's clients' own work in one round, without any server: each of the 8 fits round 1
    and evaluates the result, one after the other in this process, the median of `repeats`. In the
    bench their fits run in worker threads of one process (torch may overlap some of them on the
    two cores), so this is about the clients' share of a round; the rest is fedhub's."""
    times = []
    for _ in range(repeats):
        clients = [(recipe.fit_fn(c), recipe.evaluate_fn(c)) for c in range(len(recipe.shares))]
        started = time.perf_counter()
        for fit, evaluate in clients:
            weights, _, _ = fit(initial, {"round": 1})
            evaluate(weights, {})
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 4)


async def run_workload_a(mode: str, rounds: int = 10, config: BenchConfig | None = None) -> dict[str, Any]:
    """Workload A in `mode`: 8 digits clients, `rounds` rounds with a test round after each."""
    config = config or BenchConfig()
    warm_up_torch()
    recipe = DigitsRecipe.create()
    initial = {k: v.detach().clone() for k, v in make_model(0).state_dict().items()}
    local = local_round_s(recipe, initial)
    async with serve(mode, config) as (server, pids):
        leaf, rounds_json, actor = await _run_training(
            server,
            pids,
            initial=initial,
            num_clients=A_CLIENTS,
            rounds=rounds,
            participants=_Participants(recipe.fit_fn, recipe.evaluate_fn),
            skip_model_tests=False,
            config=config,
        )
        try:
            # Scored after the run, so that the bench's own evaluation is not on the round timeline.
            accuracy = [recipe.test_accuracy(initial)]
            for r in rounds_json:
                if r.get("model_id"):
                    accuracy.append(recipe.test_accuracy(await actor.download_model(str(r["model_id"]))))
        finally:
            await actor.aclose()
    leaf["accuracy"] = accuracy
    leaf["local_round_s"] = local
    return leaf


async def run_workload_b(
    mode: str, clients: int, rounds: int = 5, config: BenchConfig | None = None
) -> dict[str, Any]:
    """Workload B in `mode`: `clients` clients echo one 10x10 tensor for `rounds` rounds, no tests."""
    config = config or BenchConfig()
    initial = {"w": torch.zeros(10, 10, dtype=torch.float32)}
    async with serve(mode, config) as (server, pids):
        leaf, _, actor = await _run_training(
            server,
            pids,
            initial=initial,
            num_clients=clients,
            rounds=rounds,
            participants=_Participants(lambda i: _echo, None),
            skip_model_tests=True,
            config=config,
        )
        await actor.aclose()
    return leaf


async def run_bench(
    workloads: Sequence[str] = WORKLOADS,
    modes: Sequence[str] = MODES,
    clients: Sequence[int] = (10, 100, 1000),
    rounds_a: int = 10,
    rounds_b: int = 5,
    config: BenchConfig | None = None,
    progress: Callable[[str], None] | None = None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every requested run; `{"A": {mode: leaf}, "B": {mode: {str(n): leaf}}}`. A failed run's leaf
    holds `{"error": ...}` so the others still report; `checkpoint` gets the results after each run."""
    config = config or BenchConfig()
    say = progress or (lambda _: None)
    out: dict[str, Any] = {}
    for workload in workloads:
        for mode in modes:
            runs: list[tuple[str | None, Callable[[], Awaitable[dict[str, Any]]]]]
            if workload == "A":
                runs = [(None, functools.partial(run_workload_a, mode, rounds_a, config))]
            elif workload == "B":
                runs = [
                    (str(n), functools.partial(run_workload_b, mode, n, rounds_b, config)) for n in clients
                ]
            else:
                raise ValueError(f"unknown workload {workload!r}; expected one of {WORKLOADS}")
            for key, run in runs:
                label = f"{workload} {mode}" + (f" {key} clients" if key else "")
                say(f"running {label} ...")
                reference = machine_reference_s()
                memory = machine_memory_ns()
                started = time.perf_counter()
                try:
                    leaf = await asyncio.wait_for(run(), config.run_timeout_s)
                except TimeoutError:
                    leaf = {"error": f"not finished after {config.run_timeout_s:.0f} s"}
                except Exception as exc:
                    leaf = {"error": f"{type(exc).__name__}: {exc}"}
                leaf["wall_s"] = round(time.perf_counter() - started, 2)
                leaf["machine_ref_s"] = reference
                leaf["machine_memory_ns"] = memory
                say(f"{label}: median {leaf.get('round_s_median')} s/round, {leaf['wall_s']} s in all")
                target = out.setdefault(workload, {})
                if key is None:
                    target[mode] = leaf
                else:
                    target.setdefault(mode, {})[key] = leaf
                if checkpoint is not None:
                    checkpoint(out)
    return out


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def _rows(results: dict[str, Any]) -> list[tuple[str, str, str, dict[str, Any]]]:
    rows = []
    for mode, leaf in results.get("A", {}).items():
        rows.append(("A (digits, 8 clients)", mode, "8", leaf))
    for mode, by_n in results.get("B", {}).items():
        for n, leaf in by_n.items():
            rows.append(("B (10x10 echo)", mode, n, leaf))
    return rows


def _round_goal(workload: str, mode: str, n: str) -> float | None:
    if workload.startswith("A"):
        return GOAL_A_S[mode]
    return GOAL_B_1000_S[mode] if n == "1000" else None


def _rss_goal(mode: str, name: str) -> float | None:
    if mode == "embedded":
        return GOAL_EMBEDDED_MIB if name == "embedded" else None
    return GOAL_SERVICE_MIB if name in GOAL_SERVICES else None


def _rss_text(mode: str, rss: dict[str, float]) -> str:
    parts = []
    for name, mib in rss.items():
        goal = _rss_goal(mode, name)
        parts.append(f"{name} {mib:.0f}" + (f" (≤ {goal:.0f})" if goal else ""))
    return ", ".join(parts)


def print_table(results: dict[str, Any]) -> None:
    """The medians and peaks beside the goals, as a rich table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fedhub end-to-end round time", header_style="bold")
    columns = ["workload", "mode", "clients", "median s/round", "goal", "rounds (s)", "req/msg"]
    columns += ["peak RSS MiB", "machine ms"]
    for column in columns:
        table.add_column(column)
    for workload, mode, n, leaf in _rows(results):
        if "error" in leaf:
            table.add_row(workload, mode, n, "failed", "", leaf["error"][:80], "", "", _machine_text(leaf))
            continue
        goal = _round_goal(workload, mode, n)
        median = leaf["round_s_median"]
        style = "" if goal is None or median is None else ("green" if median <= goal else "red")
        table.add_row(
            workload,
            mode,
            n,
            f"[{style}]{median:.3f}[/]" if style else f"{median}",
            f"≤ {goal}" if goal is not None else "",
            " ".join(f"{s:.3f}" for s in leaf["round_s"]),
            _per_client_round(leaf),
            _rss_text(mode, leaf["rss_mib"]),
            _machine_text(leaf),
        )
    console = Console()
    console.print(table)
    for mode, leaf in results.get("A", {}).items():
        if "accuracy" in leaf:
            console.print(f"A {mode} accuracy (initial first): {leaf['accuracy']}")
    console.print(
        "embedded is the `fedhub serve` process (with --embedded-in-process: the bench process, clients "
        "included); `bench (clients)` is the simulated clients' process. req/msg: HTTP requests and "
        "bus messages (deliveries to a consumer) per client and round. machine ms: this machine's "
        "speed just before the run (`machine_reference_s`, lower is faster), its memory's (`mem`: "
        "ns per random read in a 14 MiB heap, `machine_memory_ns`) and, for A, the clients' own work "
        "in a round without a server (`local_round_s`)."
    )


def _machine_text(leaf: dict[str, Any]) -> str:
    text = f"ref {leaf['machine_ref_s'] * 1000:.0f}" if "machine_ref_s" in leaf else ""
    if "machine_memory_ns" in leaf:
        text += f", mem {leaf['machine_memory_ns']:.0f}"
    if "local_round_s" in leaf:
        text += f", local {leaf['local_round_s'] * 1000:.0f}"
    return text


def _per_client_round(leaf: dict[str, Any]) -> str:
    return f"{leaf['requests_per_client_round']} / {leaf.get('messages_per_client_round', '-')}"


def _profile_rows(profile: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    rows: list[tuple[str, dict[str, float]]] = [
        (f"fan-out {name}", phase) for name, phase in profile["fan_out"].items()
    ]
    rows += [(phase, profile[phase]) for phase in ROUTES]
    rows.append(("aggregation job", profile["aggregation"]["job"]))
    rows += [(f"  stage {name}", phase) for name, phase in profile["aggregation"]["stages"].items()]
    rows += [(f"trigger {name}", phase) for name, phase in profile["trigger"].items()]
    rows += [(f"other {route}", phase) for route, phase in profile["other_requests"].items()]
    for name, both in profile["messages"].items():
        rows.append((f"bus {name} delivery", both["delivery"]))
        rows.append((f"bus {name} handle", both["handle"]))
    return rows


def profile_text(results: dict[str, Any]) -> str:
    """Per run with a profile, a markdown table: each phase's count per round, its mean per
    observation (per request, stream or job) and its seconds per round (summed over clients)."""
    blocks = []
    for workload, mode, n, leaf in _rows(results):
        profile = leaf.get("profile")
        if not profile:
            continue
        rounds = leaf["rounds"]
        lines = [
            f"{workload}, {mode}, {n} clients: median round {leaf['round_s_median']} s",
            "",
            "| phase | per round | mean ms | s per round (summed) |",
            "|---|---|---|---|",
        ]
        for name, phase in _profile_rows(profile):
            lines.append(
                f"| {name} | {phase['count'] / rounds:.1f} | {phase['mean_s'] * 1000:.2f} "
                f"| {phase['per_round_s']:.4f} |"
            )
        engines = profile["aggregation"].get("rounds_by_engine") or {}
        if engines:
            lines += [
                "",
                "rounds aggregated by engine: " + ", ".join(f"{k} {v}" for k, v in sorted(engines.items())),
            ]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def markdown_table(results: dict[str, Any]) -> str:
    """The same figures as a markdown table for the README."""
    lines = [
        "| workload | mode | clients | median s/round (goal) | rounds (s) | requests / bus messages "
        "per client and round | peak RSS MiB (goal) | machine ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for workload, mode, n, leaf in _rows(results):
        if "error" in leaf:
            lines.append(f"| {workload} | {mode} | {n} | failed: {leaf['error'][:60]} | | | | |")
            continue
        goal = _round_goal(workload, mode, n)
        median = f"{leaf['round_s_median']:.3f}" + (f" (≤ {goal})" if goal is not None else "")
        rounds = " ".join(f"{s:.3f}" for s in leaf["round_s"])
        lines.append(
            f"| {workload} | {mode} | {n} | {median} | {rounds} | {_per_client_round(leaf)} "
            f"| {_rss_text(mode, leaf['rss_mib'])} | {_machine_text(leaf)} |"
        )
    return "\n".join(lines)


def _settings(pairs: list[str]) -> dict[str, str]:
    """`--set` values as environment variables; each must be `FEDHUB_<NAME>=<value>`."""
    settings = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.startswith("FEDHUB_"):
            raise SystemExit(f"--set takes FEDHUB_<NAME>=<value>, got {pair!r}")
        settings[name] = value
    return settings


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """`python bench/e2e.py [--small] [--workloads A,B] [--modes ...] [--json PATH]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workloads", type=_csv, default=list(WORKLOADS))
    parser.add_argument("--modes", type=_csv, default=list(MODES))
    parser.add_argument("--clients", type=lambda v: [int(n) for n in _csv(v)], default=[10, 100, 1000])
    parser.add_argument("--rounds-a", type=int, default=10)
    parser.add_argument("--rounds-b", type=int, default=5)
    parser.add_argument("--run-timeout-s", type=float, default=900.0, help="give up on a run after this")
    parser.add_argument("--shared-http", action="store_true", help="one HTTP session for all clients")
    parser.add_argument(
        "--profile", action="store_true", help="split each round by phase from the services' /metrics"
    )
    parser.add_argument(
        "--embedded-in-process",
        action="store_true",
        help="run embedded mode inside the bench process (sharing it with the clients)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FEDHUB_NAME=VALUE",
        help="a setting for the server's processes (repeatable), e.g. FEDHUB_MAX_CONCURRENT_REQUESTS=64",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    parser.add_argument(
        "--small",
        action="store_true",
        help=f"the test size: A {SMALL_ROUNDS_A} rounds, B {SMALL_CLIENTS_B} clients",
    )
    args = parser.parse_args(argv)
    if args.small:
        args.rounds_a, args.clients = SMALL_ROUNDS_A, [SMALL_CLIENTS_B]
    from shared.logging import configure_logging

    config = BenchConfig(
        run_timeout_s=args.run_timeout_s,
        shared_http=args.shared_http,
        profile=args.profile,
        embedded_in_process=args.embedded_in_process,
        server_env=_settings(args.set),
    )
    configure_logging(config.log_level)
    # Simulated clients train in worker threads: one torch thread each avoids oversubscription.
    torch.set_num_threads(1)

    def write_json(results: dict[str, Any]) -> None:
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n")

    results = asyncio.run(
        run_bench(
            args.workloads,
            args.modes,
            args.clients,
            args.rounds_a,
            args.rounds_b,
            config,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
            checkpoint=write_json,
        )
    )
    print_table(results)
    if args.profile:
        print(profile_text(results))
    if args.markdown:
        print(markdown_table(results))
    failed = [label for label, _, _, leaf in _rows(results) if "error" in leaf]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
