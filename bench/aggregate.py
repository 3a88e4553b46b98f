"""Aggregation throughput: fedhub's kernels against numpy's memory bandwidth, Flower and plain torch.

For each case (clients x parameters, dtype), on the same in-memory updates:

- ``numpy``: ``np.add.reduce`` over every update's bytes, the machine's memory-read bandwidth as one
  core streams it (bfloat16, which numpy lacks, is read as float32: the same bytes);
- ``fedavg``: fedhub's streaming FedAvg as the round pipeline drives it (`FedAvg`, each update
  checked as it comes, windows of ``--window`` updates, default the pipeline's
  `DEFAULT_FOLD_WINDOW`, folded with ``add_many``, then ``result``), and Flower's
  ``flwr.server.strategy.aggregate.aggregate`` on the same arrays (zero-copy numpy views);
- ``median`` / ``trimmed``: fedhub's `Median` and `TrimmedMean` (beta 0.1) against Flower's
  ``aggregate_median`` / ``aggregate_trimmed_avg`` and against ``torch.median`` over the stacked
  updates (the stacking timed too, as Flower's ``np.asarray`` is);
- ``+decode``: the same fedhub methods fed from msgpack (each update encoded once with
  `shared.codec.encode_tensors`; timed: `decode_tensors` plus zero-copy tensor views plus the method).

Across pods (``--pods 1,2,4``): one FedAvg round of ``40 x 1M float32`` updates through the real
split path, with 1, 2 and 4 ``fedhub aggregator`` processes on RabbitMQ and PostgreSQL (a fresh
database, local blob folder shared by the processes, ``FEDHUB_AGGREGATOR_BATCH_SIZE=10``: four
batch parts and the combine job): the time from publishing the round's job to its model row,
as updates/s and GB/s of update bytes per process count (best of ``--repeats`` rounds after one
warm-up round). Each process gets ``--pod-threads`` torch threads (default 1). Left out with a
note when RabbitMQ or PostgreSQL is unreachable (``FEDHUB_AMQP_URL``, ``FEDHUB_DATABASE_URL``).

Throughput is the bytes of all updates over the time taken (best of ``--repeats``). torch uses
every core (``torch.get_num_threads()``, printed with the table) unless ``--threads`` says
otherwise: on a machine whose cores other processes keep busy, multi-threaded torch kernels wait
on descheduled threads and can lose several times over, while ``--threads 1`` stays stable
(numpy and Flower are single-threaded either way). Flower's
figures need flwr (``make bench`` installs it in .venv-bench); without it they are left out with a
note. With a CUDA device (``--device cuda``) fedhub's methods run there, updates moved by
`DeviceTransfer`, beside the pinned host-to-device copy bandwidth.

    python bench/aggregate.py --json bench-aggregate.json --pods 1,2,4
    python bench/aggregate.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import os
import platform
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]
import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.engine import make_url

from fedhub.distributed import (
    DEFAULT_AMQP_URL,
    DEFAULT_DATABASE_URL,
    ClusterSettings,
    LocalCluster,
)
from services.aggregator.methods import FedAvg, LinearMethod, Median, Method, RoundContext, TrimmedMean
from services.aggregator.methods.buffers import BufferLease, BufferPool
from services.aggregator.methods.coordinate import trim_count
from services.aggregator.pipeline import DEFAULT_FOLD_WINDOW
from services.aggregator.settings import AggregatorSettings
from services.aggregator.transfer import DeviceTransfer
from shared.aggregation import FedAvgParams, MedianParams, MethodParams, TrimmedMeanParams
from shared.bus.base import envelope_for
from shared.codec import decode_tensors, encode_tensors
from shared.db.models import Model
from shared.events import AggregateRound, UpdateRef
from shared.logging import configure_logging
from shared.runtime import Runtime
from shared.settings import CommonSettings
from shared.tensors import state_dict_to_records

TRIM_BETA = 0.1
GOALS = {"fedavg_pct_numpy": 80.0, "fedavg_vs_flower": 5.0, "median_vs_flower": 3.0}
"""The issue's goals: FedAvg at >= 80% of numpy's bandwidth and >= 5x Flower; median >= 3x Flower."""


@dataclass(frozen=True, slots=True)
class CaseSpec:
    """One workload: how many clients send how many parameters of which dtype."""

    clients: int
    params: int
    dtype: torch.dtype

    @property
    def label(self) -> str:
        """E.g. ``100 x 1M float32``."""
        return f"{self.clients} x {_count(self.params)} {str(self.dtype).removeprefix('torch.')}"


FULL_CASES = (
    CaseSpec(100, 1_000_000, torch.float32),
    CaseSpec(10, 25_000_000, torch.float32),
    CaseSpec(10, 25_000_000, torch.bfloat16),
)
QUICK_CASES = (
    CaseSpec(12, 40_000, torch.float32),
    CaseSpec(5, 120_000, torch.float32),
    CaseSpec(5, 60_000, torch.bfloat16),
)


def _count(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}K" if n % 1000 == 0 else str(n)


def model_shapes(params: int) -> dict[str, tuple[int, ...]]:
    """A layered model of exactly `params` parameters: four weight matrices and their biases."""
    widths = [params // 2, params // 4, params // 8]
    biases = [min(1024, max(1, params // 1000)) for _ in range(4)]
    last = params - sum(widths) - sum(biases)
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (w, b) in enumerate(zip([*widths, last], biases, strict=True)):
        shapes[f"layer{i}.weight"] = (b, w // b) if w % b == 0 else (w,)
        shapes[f"layer{i}.bias"] = (b,)
    assert sum(int(np.prod(s)) for s in shapes.values()) == params
    return shapes


def make_updates(
    spec: CaseSpec, seed: int = 0
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The base model and `spec.clients` random updates (base plus noise), in `spec.dtype`."""
    gen = torch.Generator().manual_seed(seed)
    shapes = model_shapes(spec.params)
    base = {name: torch.randn(shape, generator=gen).to(spec.dtype) for name, shape in shapes.items()}
    updates = []
    for _ in range(spec.clients):
        update = {}
        for name, t in base.items():
            noise = torch.randn(t.shape, generator=gen).mul_(0.01)
            update[name] = noise.add_(t.float()).to(spec.dtype)
        updates.append(update)
    return base, updates


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` timed calls, in seconds (garbage collected before each)."""
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _numpy_view(t: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view (bfloat16 bytes read as float32 / uint16: numpy has no bfloat16)."""
    if t.dtype == torch.bfloat16:
        flat = t.reshape(-1)
        return (flat.view(torch.float32) if flat.numel() % 2 == 0 else flat.view(torch.int16)).numpy()
    return t.numpy()


def numpy_read(updates: Sequence[Mapping[str, torch.Tensor]]) -> Callable[[], object]:
    """np.add.reduce over every byte of every update."""
    arrays = [_numpy_view(t).reshape(-1) for u in updates for t in u.values()]

    def run() -> object:
        return [np.add.reduce(a) for a in arrays]

    return run


class Feeder:
    """Hands updates to a method as the round pipeline does: a linear method that folds windows
    gets each update checked as it comes and `window` at a time through ``add_many``; any other
    method one ``add`` per update."""

    def __init__(self, method: Method, window: int) -> None:
        self.method = method
        self.linear = method if isinstance(method, LinearMethod) and method.folds_windows else None
        self.window = window
        self.held: list[tuple[Mapping[str, torch.Tensor], float]] = []

    def add(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        """Add one update (held until the window is full)."""
        if self.linear is None or self.window <= 1:
            self.method.add(update, weight)
            return
        self.linear.check(update, weight)
        self.held.append((update, weight))
        if len(self.held) >= self.window:
            self.flush()

    def flush(self) -> None:
        """Fold what is held."""
        if self.linear is not None and self.held:
            self.linear.add_many([u for u, _ in self.held], [w for _, w in self.held])
            self.held.clear()


def fedhub_run(
    cls: type[Method],
    params: MethodParams,
    base: Mapping[str, torch.Tensor],
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    device: torch.device,
    window: int = DEFAULT_FOLD_WINDOW,
) -> Callable[[], dict[str, torch.Tensor]]:
    """A fedhub method over the updates: build, feed each (moved by `DeviceTransfer`), result.

    Each call is a round of an aggregator process: its accumulators come from a `BufferPool` that
    the previous call's model went back to (the service gives a round's buffers back once the model
    is stored; here when the next call starts), so the model a call returns is valid until the next.
    """
    rounds = _PooledRounds()

    def run() -> dict[str, torch.Tensor]:
        lease = rounds.next_lease()
        transfer = DeviceTransfer(device)
        ctx = RoundContext(base=base, device=device, buffers=lease)
        feeder = Feeder(cls(ctx, params), window)
        for update, weight in zip(updates, weights, strict=True):
            feeder.add(transfer.to_device(update), weight)
        feeder.flush()
        model = feeder.method.result().model
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return rounds.lent(model)

    return run


class _PooledRounds:
    """Successive rounds sharing one `BufferPool` as an aggregator's do (see `fedhub_run`)."""

    def __init__(self) -> None:
        self.pool = BufferPool(AggregatorSettings.model_fields["buffer_pool_mib"].default * 1024 * 1024)
        self._lease: BufferLease | None = None
        self._model: dict[str, torch.Tensor] = {}

    def next_lease(self) -> BufferLease:
        """Give the previous round's model back, then a lease for the next round."""
        if self._lease is not None:
            self._lease.give_back(self._model.values())
            self._lease.close()
        self._lease, self._model = self.pool.lease(), {}
        return self._lease

    def lent(self, model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Note the round's model (given back when the next round starts) and return it."""
        self._model = model
        return model


def decode_views(data: bytes) -> dict[str, torch.Tensor]:
    """Decode a msgpack tensor document into tensors that are views of msgpack's bytes (no copy).

    The views are read-only memory; the aggregation methods never write to an update's tensors.
    """
    out: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        for record in decode_tensors(data):
            dtype = getattr(torch, record.dtype)
            out[record.name] = torch.frombuffer(record.data, dtype=dtype).reshape(record.shape)
    return out


def fedhub_decode_run(
    cls: type[Method],
    params: MethodParams,
    base: Mapping[str, torch.Tensor],
    encoded: Sequence[bytes],
    weights: Sequence[float],
    device: torch.device,
    window: int = DEFAULT_FOLD_WINDOW,
) -> Callable[[], dict[str, torch.Tensor]]:
    """As `fedhub_run`, each update decoded from its msgpack bytes first."""

    rounds = _PooledRounds()

    def run() -> dict[str, torch.Tensor]:
        lease = rounds.next_lease()
        transfer = DeviceTransfer(device)
        feeder = Feeder(cls(RoundContext(base=base, device=device, buffers=lease), params), window)
        for data, weight in zip(encoded, weights, strict=True):
            feeder.add(transfer.to_device(decode_views(data)), weight)
        feeder.flush()
        model = feeder.method.result().model
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return rounds.lent(model)

    return run


def torch_median_run(updates: Sequence[Mapping[str, torch.Tensor]]) -> Callable[[], object]:
    """Plain ``torch.median`` over the stacked updates, tensor by tensor (lower middle for even K)."""
    names = list(updates[0])

    def run() -> object:
        return {name: torch.median(torch.stack([u[name] for u in updates]), dim=0).values for name in names}

    return run


def load_flower() -> tuple[Any, str | None]:
    """Flower's aggregate module and version, or (None, why not)."""
    try:
        # Imported by name: flwr lives only in the bench venv, so mypy in .venv must not need it.
        flwr = importlib.import_module("flwr")
        flower = importlib.import_module("flwr.server.strategy.aggregate")
    except ImportError as exc:
        return None, f"flwr is not importable ({exc}); Flower columns left out (make bench installs it)"
    return flower, str(getattr(flwr, "__version__", "?"))


def gbs(nbytes: int, seconds: float) -> float:
    """GB/s (10^9 bytes)."""
    return nbytes / seconds / 1e9


def h2d_bandwidth(nbytes: int, device: torch.device, repeats: int) -> float:
    """Pinned host-to-device copy bandwidth, GB/s."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def run() -> None:
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)

    run()
    return gbs(nbytes, best_of(run, repeats))


def bench_case(
    spec: CaseSpec, *, repeats: int, device: torch.device, flower: Any, window: int = DEFAULT_FOLD_WINDOW
) -> dict[str, Any]:
    """Every figure of one case (see the module doc), plus checks that the results agree."""
    base, updates = make_updates(spec)
    gen = torch.Generator().manual_seed(1)
    weights = [float(w) for w in torch.randint(10, 1000, (spec.clients,), generator=gen)]
    nbytes = sum(t.numel() * t.element_size() for u in updates for t in u.values())
    row: dict[str, Any] = {
        "case": spec.label,
        "clients": spec.clients,
        "params": spec.params,
        "dtype": str(spec.dtype).removeprefix("torch."),
        "bytes": nbytes,
        "device": str(device),
    }
    row["numpy_gbs"] = gbs(nbytes, best_of(numpy_read(updates), repeats))

    fedavg = fedhub_run(FedAvg, FedAvgParams(), base, updates, weights, device, window)
    median = fedhub_run(Median, MedianParams(), base, updates, weights, device)
    trimmed = fedhub_run(TrimmedMean, TrimmedMeanParams(beta=TRIM_BETA), base, updates, weights, device)
    row["fedavg_gbs"] = gbs(nbytes, best_of(fedavg, repeats))
    row["fedavg_pct_numpy"] = 100 * row["fedavg_gbs"] / row["numpy_gbs"]
    row["median_gbs"] = gbs(nbytes, best_of(median, repeats))
    row["trimmed_gbs"] = gbs(nbytes, best_of(trimmed, repeats))
    row["torch_median_gbs"] = gbs(nbytes, best_of(torch_median_run(updates), repeats))
    row["median_vs_torch"] = row["median_gbs"] / row["torch_median_gbs"]

    ours = {"fedavg": fedavg(), "median": median(), "trimmed": trimmed()}
    row["checks"] = _check_against_numpy(ours, updates, weights)

    if flower is not None and spec.dtype != torch.bfloat16:
        results = [([t.numpy() for t in u.values()], int(w)) for u, w in zip(updates, weights, strict=True)]
        row["flower_aggregate_gbs"] = gbs(nbytes, best_of(lambda: flower.aggregate(results), repeats))
        row["flower_median_gbs"] = gbs(nbytes, best_of(lambda: flower.aggregate_median(results), repeats))
        row["fedavg_vs_flower"] = row["fedavg_gbs"] / row["flower_aggregate_gbs"]
        row["median_vs_flower"] = row["median_gbs"] / row["flower_median_gbs"]
        if hasattr(flower, "aggregate_trimmed_avg"):

            def trim() -> object:
                return flower.aggregate_trimmed_avg(results, TRIM_BETA)

            row["flower_trimmed_gbs"] = gbs(nbytes, best_of(trim, repeats))
            row["trimmed_vs_flower"] = row["trimmed_gbs"] / row["flower_trimmed_gbs"]
        row["checks"]["flower_fedavg_max_abs"] = _max_abs(ours["fedavg"], flower.aggregate(results))
        row["checks"]["flower_median_max_abs"] = _max_abs(ours["median"], flower.aggregate_median(results))
        del results
    elif flower is not None:
        row["note"] = "Flower left out: numpy has no bfloat16"

    encoded = [encode_tensors(state_dict_to_records(u)) for u in updates]
    del ours
    gc.collect()
    for name, cls, params in (
        ("fedavg", FedAvg, FedAvgParams()),
        ("median", Median, MedianParams()),
    ):
        run = fedhub_decode_run(cls, params, base, encoded, weights, device, window)
        row[f"{name}_decode_gbs"] = gbs(nbytes, best_of(run, repeats))
    if device.type == "cuda":
        row["h2d_pinned_gbs"] = h2d_bandwidth(min(nbytes, 1 << 30), device, repeats)
    return row


def _max_abs(ours: Mapping[str, torch.Tensor], theirs: Sequence[np.ndarray]) -> float:
    return max(
        float(
            np.max(np.abs(ours[name].double().cpu().numpy() - np.asarray(arr, dtype=np.float64)), initial=0)
        )
        for name, arr in zip(ours, theirs, strict=True)
    )


def _check_against_numpy(
    ours: Mapping[str, Mapping[str, torch.Tensor]],
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
) -> dict[str, float]:
    """Max absolute difference to a float64 numpy reference, on the smallest weight tensor."""
    name = "layer2.weight"
    values = np.stack([u[name].double().numpy() for u in updates])
    w = np.asarray(weights, dtype=np.float64)
    k = len(updates)
    cut = trim_count(TRIM_BETA, k)
    refs = {
        "fedavg": np.tensordot(w, values, axes=1) / w.sum(),
        "median": np.median(values, axis=0),
        "trimmed": np.sort(values, axis=0)[cut : k - cut].mean(axis=0),
    }
    return {
        f"{key}_max_abs": float(np.max(np.abs(ours[key][name].double().cpu().numpy() - ref)))
        for key, ref in refs.items()
    }


def run_bench(
    cases: Sequence[CaseSpec],
    *,
    repeats: int,
    device: torch.device,
    use_flower: bool = True,
    window: int = DEFAULT_FOLD_WINDOW,
) -> dict[str, Any]:
    """Every case's row, the machine and the notes, as one JSON-able document."""
    flower, flower_info = load_flower() if use_flower else (None, "Flower left out (--no-flower)")
    notes = [] if flower is not None else [flower_info]
    rows = []
    for spec in cases:
        rows.append(bench_case(spec, repeats=repeats, device=device, flower=flower, window=window))
        gc.collect()
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "load_average": _load_average(),
        },
        "fold_window": window,
        "flower": flower_info if flower is not None else None,
        "repeats": repeats,
        "goals": GOALS,
        "notes": notes,
        "cases": rows,
    }


def _load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# Across pods -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PodsSpec:
    """The round the across-pods figure runs: updates x params float32, split in batches."""

    updates: int
    params: int
    batch_size: int

    @property
    def label(self) -> str:
        """E.g. ``40 x 1M float32, batches of 10``."""
        return f"{self.updates} x {_count(self.params)} float32, batches of {self.batch_size}"


FULL_PODS = PodsSpec(40, 1_000_000, 10)
QUICK_PODS = PodsSpec(6, 20_000, 2)


async def _reachable(database_url: str, amqp_url: str) -> str | None:
    """None when RabbitMQ and PostgreSQL answer, else why not."""
    amqp = urlsplit(amqp_url)
    host, port = amqp.hostname or "127.0.0.1", amqp.port or 5672
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=3)
        writer.close()
        await writer.wait_closed()
    except (OSError, TimeoutError) as exc:
        return f"RabbitMQ is unreachable at {host}:{port} ({type(exc).__name__}: {exc})"
    try:
        conn = await asyncpg.connect(_dsn(database_url), timeout=3)
        await conn.close()
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        safe = make_url(database_url).render_as_string(hide_password=True)
        return f"PostgreSQL is unreachable at {safe} ({type(exc).__name__}: {exc})"
    return None


def _dsn(database_url: str, database: str | None = None, *, driver: str = "postgresql") -> str:
    """`database_url` with another driver (asyncpg's plain DSN by default) and database."""
    url = make_url(database_url).set(drivername=driver)
    if database is not None:
        url = url.set(database=database)
    return url.render_as_string(hide_password=False)


async def _pods_round(runtime: Runtime, base_key: str, update_keys: Sequence[str]) -> float:
    """Publish one FedAvg round's job and wait for its model row; the seconds it took."""
    training_id = uuid.uuid4()
    refs = tuple(
        UpdateRef(update_id=uuid.uuid4(), client_id=uuid.uuid4(), blob_key=key, num_examples=10 + i)
        for i, key in enumerate(update_keys)
    )
    job = AggregateRound(
        job_id=uuid.uuid4(),
        training_id=training_id,
        round=1,
        method="fedavg",
        base_model_id=uuid.uuid4(),
        base_blob_key=base_key,
        updates=refs,
        delete_updates_after=False,
    )
    query = select(Model.id).where(Model.training_id == training_id, Model.round == 1)
    started = time.perf_counter()
    await runtime.bus.publish([envelope_for(job)])
    async with runtime.engine.connect() as conn:
        while (await conn.scalar(query)) is None:
            if time.perf_counter() - started > 300:
                raise TimeoutError(f"round of {len(update_keys)} updates not aggregated after 300 s")
            await asyncio.sleep(0.005)
    return time.perf_counter() - started


async def _pods_count(
    database_url: str, amqp_url: str, root: Path, count: int, spec: PodsSpec, repeats: int, threads: int
) -> float:
    """Best round time with `count` aggregator processes (after a warm-up round)."""
    namespace = f"fedhub-bench-{uuid.uuid4().hex[:8]}"
    settings = ClusterSettings(
        database_url=database_url,
        amqp_url=amqp_url,
        blob_backend="local",
        aggregators=count,
        log_dir=root / f"logs-{count}",
        log_level="WARNING",
        bus_namespace=namespace,
        roles=frozenset({"aggregator"}),
        delete_bus_namespace=True,
        extra_env={
            "FEDHUB_AGGREGATOR_BATCH_SIZE": str(spec.batch_size),
            "FEDHUB_AGGREGATOR_TORCH_THREADS": str(threads),
            "FEDHUB_AGGREGATOR_DEVICE": "cpu",
        },
    )
    common = CommonSettings(
        database_url=database_url,
        amqp_url=amqp_url,
        blob_backend="local",
        blob_path=root / "blobs",  # where LocalCluster points its processes (log_dir's parent)
        bus_namespace=namespace,
        log_level="WARNING",
    )
    base, updates = make_updates(CaseSpec(spec.updates, spec.params, torch.float32), seed=2)
    async with LocalCluster(settings):
        runtime = await Runtime.open(common)
        try:
            base_key = f"model/bench-base-{count}"
            await runtime.blobs.put(base_key, encode_tensors(state_dict_to_records(base)))
            keys = [f"update/bench-{count}-{i}" for i in range(spec.updates)]
            for key, update in zip(keys, updates, strict=True):
                await runtime.blobs.put(key, encode_tensors(state_dict_to_records(update)))
            del base, updates
            await _pods_round(runtime, base_key, keys)  # warm-up: imports, connections, first kernels
            return min([await _pods_round(runtime, base_key, keys) for _ in range(repeats)])
        finally:
            await runtime.close()


async def _pods_bench(counts: Sequence[int], spec: PodsSpec, *, repeats: int, threads: int) -> dict[str, Any]:
    """The across-pods figure (see the module doc); `rows` empty and `note` set when it cannot run."""
    database_url = os.environ.get("FEDHUB_DATABASE_URL", DEFAULT_DATABASE_URL)
    amqp_url = os.environ.get("FEDHUB_AMQP_URL", DEFAULT_AMQP_URL)
    nbytes = spec.updates * spec.params * 4
    out: dict[str, Any] = {
        "case": spec.label,
        "updates": spec.updates,
        "params": spec.params,
        "batch_size": spec.batch_size,
        "pod_threads": threads,
        "bytes": nbytes,
        "blobs": "local folder shared by the processes",
        "rows": [],
    }
    why = await _reachable(database_url, amqp_url)
    if why is not None:
        out["note"] = f"across pods left out: {why}"
        return out
    configure_logging("WARNING")  # this process's bus and relay: their info lines would break the table
    database = f"fedhub_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(_dsn(database_url), timeout=5)
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    url = _dsn(database_url, database, driver="postgresql+asyncpg")
    try:
        with tempfile.TemporaryDirectory(prefix="fedhub-bench-pods-") as tmp:
            for count in counts:
                best = await _pods_count(url, amqp_url, Path(tmp), count, spec, repeats, threads)
                out["rows"].append(
                    {
                        "processes": count,
                        "seconds": best,
                        "updates_per_s": spec.updates / best,
                        "gbs": gbs(nbytes, best),
                    }
                )
    finally:
        admin = await asyncpg.connect(_dsn(database_url), timeout=5)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await admin.close()
    return out


def run_pods(counts: Sequence[int], spec: PodsSpec, *, repeats: int, threads: int = 1) -> dict[str, Any]:
    """The across-pods figure for each process count in `counts` (see the module doc)."""
    return asyncio.run(_pods_bench(counts, spec, repeats=repeats, threads=threads))


def pods_lines(pods: Mapping[str, Any]) -> list[str]:
    """The across-pods figure as a markdown table (or its note)."""
    lines = [
        f"Across pods: one FedAvg round of {pods['case']}, {pods['pod_threads']} torch thread(s) per process"
    ]
    if not pods["rows"]:
        lines.append(pods.get("note", "across pods: nothing ran"))
        return lines
    lines += ["", "| aggregator processes | seconds | updates/s | GB/s |", "|---|---|---|---|"]
    for row in pods["rows"]:
        lines.append(
            f"| {row['processes']} | {row['seconds']:.2f} | {row['updates_per_s']:.1f} | {row['gbs']:.2f} |"
        )
    return lines


COLUMNS: tuple[tuple[str, str], ...] = (
    ("case", "case"),
    ("numpy_gbs", "numpy GB/s"),
    ("fedavg_gbs", "FedAvg GB/s"),
    ("fedavg_pct_numpy", "% numpy"),
    ("flower_aggregate_gbs", "Flower avg GB/s"),
    ("fedavg_vs_flower", "x Flower"),
    ("fedavg_decode_gbs", "FedAvg+decode"),
    ("median_gbs", "median GB/s"),
    ("flower_median_gbs", "Flower med GB/s"),
    ("median_vs_flower", "x Flower"),
    ("torch_median_gbs", "torch.median GB/s"),
    ("median_vs_torch", "x torch"),
    ("median_decode_gbs", "median+decode"),
    ("trimmed_gbs", "trimmed GB/s"),
    ("flower_trimmed_gbs", "Flower trim GB/s"),
    ("trimmed_vs_flower", "x Flower"),
    ("h2d_pinned_gbs", "H2D pinned GB/s"),
)


def _cell(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if key.endswith("pct_numpy") else f"{value:.2f}"
    return str(value)


def table_lines(doc: Mapping[str, Any]) -> list[str]:
    """The results as a markdown table (the README's form), notes below it."""
    columns = [(k, h) for k, h in COLUMNS if any(k in row for row in doc["cases"])]
    lines = [
        "| " + " | ".join(h for _, h in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in doc["cases"]:
        lines.append("| " + " | ".join(_cell(row, k) for k, _ in columns) + " |")
    machine = doc["machine"]
    lines.append("")
    load = machine.get("load_average")
    lines.append(
        f"{machine['cpus']} CPUs, torch {machine['torch']} ({machine['torch_threads']} threads), "
        f"numpy {machine['numpy']}, Flower {doc['flower'] or '-'}, device {machine['device']}, "
        f"best of {doc['repeats']}, FedAvg fold window {doc.get('fold_window', '-')}"
        + (f", load average {' '.join(f'{x:.2f}' for x in load)}" if load else "")
    )
    lines.extend(doc["notes"])
    lines.extend(f"{row['case']}: {row['note']}" for row in doc["cases"] if "note" in row)
    if "pods" in doc:
        lines.append("")
        lines.extend(pods_lines(doc["pods"]))
    return lines


def print_table(doc: Mapping[str, Any]) -> None:
    """The results as a rich table (plain markdown when rich is missing or --markdown)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print("\n".join(table_lines(doc)))
        return
    columns = [(k, h) for k, h in COLUMNS if any(k in row for row in doc["cases"])]
    table = Table(title="Aggregation throughput (bytes of all updates / time)")
    for i, (_, header) in enumerate(columns):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in doc["cases"]:
        table.add_row(*(_cell(row, k) for k, _ in columns))
    console = Console(width=max(200, Console().width))
    console.print(table)
    for line in table_lines(doc)[len(doc["cases"]) + 3 :]:
        console.print(line)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the cases and print the table; `--json PATH` also writes every figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (the smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (default 3)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--device", default="cpu", help="where fedhub's methods run: cpu or cuda")
    parser.add_argument("--no-flower", action="store_true", help="leave Flower out even when installed")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table instead of rich")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"torch threads (default: every core, {torch.get_num_threads()} here); 1 compares like "
        "for like with single-threaded numpy and Flower, and stays stable on a machine other work "
        "keeps busy",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=DEFAULT_FOLD_WINDOW,
        help=f"FedAvg's fold window (default {DEFAULT_FOLD_WINDOW}, the pipeline's; 1: one add per update)",
    )
    parser.add_argument(
        "--pods",
        default=None,
        help="aggregator process counts for the across-pods figure, e.g. 1,2,4 (needs RabbitMQ and "
        "PostgreSQL; default: left out)",
    )
    parser.add_argument(
        "--pod-threads", type=int, default=1, help="torch threads of each aggregator process (default 1)"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pods = [int(n) for n in args.pods.split(",")] if args.pods else []
    if any(n < 1 for n in pods):
        parser.error("--pods: process counts must be at least 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    cases = QUICK_CASES if args.quick else FULL_CASES
    doc = run_bench(cases, repeats=repeats, device=device, use_flower=not args.no_flower, window=args.window)
    if pods:
        spec = QUICK_PODS if args.quick else FULL_PODS
        doc["pods"] = run_pods(pods, spec, repeats=repeats, threads=args.pod_threads)
    if args.markdown:
        print("\n".join(table_lines(doc)))
    else:
        print_table(doc)
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
