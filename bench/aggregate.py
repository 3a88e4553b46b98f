"""Aggregation throughput: fedhub's kernels against numpy's memory bandwidth, Flower and plain torch.

For each case (clients x parameters, dtype), on the same in-memory updates:

- ``numpy``: ``np.add.reduce`` over every update's bytes, the machine's memory-read bandwidth as one
  core streams it (bfloat16, which numpy lacks, is read as float32: the same bytes);
- ``fedavg``: fedhub's streaming FedAvg (`FedAvg`, one ``add`` per update, then ``result``), and
  Flower's ``flwr.server.strategy.aggregate.aggregate`` on the same arrays (zero-copy numpy views);
- ``median`` / ``trimmed``: fedhub's `Median` and `TrimmedMean` (beta 0.1) against Flower's
  ``aggregate_median`` / ``aggregate_trimmed_avg`` and against ``torch.median`` over the stacked
  updates (the stacking timed too, as Flower's ``np.asarray`` is);
- ``+decode``: the same fedhub methods fed from msgpack (each update encoded once with
  `shared.codec.encode_tensors`; timed: `decode_tensors` plus zero-copy tensor views plus the method).

Throughput is the bytes of all updates over the time taken (best of ``--repeats``). torch runs
with its default threads unless ``--threads`` says otherwise: on a machine whose cores other
processes keep busy, multi-threaded torch kernels wait on descheduled threads and lose up to 10x,
while ``--threads 1`` stays stable (numpy and Flower are single-threaded either way). Flower's
figures need flwr (``make bench`` installs it in .venv-bench); without it they are left out with a
note. With a CUDA device (``--device cuda``) fedhub's methods run there, updates moved by
`DeviceTransfer`, beside the pinned host-to-device copy bandwidth.

    python bench/aggregate.py --json bench-aggregate.json
    python bench/aggregate.py --quick
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.aggregator.methods import FedAvg, Median, Method, RoundContext, TrimmedMean
from services.aggregator.methods.coordinate import trim_count
from services.aggregator.transfer import DeviceTransfer
from shared.aggregation import FedAvgParams, MedianParams, MethodParams, TrimmedMeanParams
from shared.codec import decode_tensors, encode_tensors
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


def fedhub_run(
    cls: type[Method],
    params: MethodParams,
    base: Mapping[str, torch.Tensor],
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    device: torch.device,
) -> Callable[[], dict[str, torch.Tensor]]:
    """A fedhub method over the updates: build, add each (moved by `DeviceTransfer`), result."""

    def run() -> dict[str, torch.Tensor]:
        transfer = DeviceTransfer(device)
        method = cls(RoundContext(base=base, device=device), params)
        for update, weight in zip(updates, weights, strict=True):
            method.add(transfer.to_device(update), weight)
        model = method.result().model
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return model

    return run


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
) -> Callable[[], dict[str, torch.Tensor]]:
    """As `fedhub_run`, each update decoded from its msgpack bytes first."""

    def run() -> dict[str, torch.Tensor]:
        transfer = DeviceTransfer(device)
        method = cls(RoundContext(base=base, device=device), params)
        for data, weight in zip(encoded, weights, strict=True):
            method.add(transfer.to_device(decode_views(data)), weight)
        model = method.result().model
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return model

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


def bench_case(spec: CaseSpec, *, repeats: int, device: torch.device, flower: Any) -> dict[str, Any]:
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

    fedavg = fedhub_run(FedAvg, FedAvgParams(), base, updates, weights, device)
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
        run = fedhub_decode_run(cls, params, base, encoded, weights, device)
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
    cases: Sequence[CaseSpec], *, repeats: int, device: torch.device, use_flower: bool = True
) -> dict[str, Any]:
    """Every case's row, the machine and the notes, as one JSON-able document."""
    flower, flower_info = load_flower() if use_flower else (None, "Flower left out (--no-flower)")
    notes = [] if flower is not None else [flower_info]
    rows = []
    for spec in cases:
        rows.append(bench_case(spec, repeats=repeats, device=device, flower=flower))
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
        },
        "flower": flower_info if flower is not None else None,
        "repeats": repeats,
        "goals": GOALS,
        "notes": notes,
        "cases": rows,
    }


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
    lines.append(
        f"{machine['cpus']} CPUs, torch {machine['torch']} ({machine['torch_threads']} threads), "
        f"numpy {machine['numpy']}, Flower {doc['flower'] or '-'}, device {machine['device']}, "
        f"best of {doc['repeats']}"
    )
    lines.extend(doc["notes"])
    lines.extend(f"{row['case']}: {row['note']}" for row in doc["cases"] if "note" in row)
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
        help="torch threads (default: torch's own); 1 compares like for like with single-threaded "
        "numpy and Flower, and stays stable on a machine other work keeps busy",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    cases = QUICK_CASES if args.quick else FULL_CASES
    doc = run_bench(cases, repeats=repeats, device=device, use_flower=not args.no_flower)
    if args.markdown:
        print("\n".join(table_lines(doc)))
    else:
        print_table(doc)
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
