"""A small FedAvg round's CPU per update: the numpy engine against the torch pipeline, and what each
process pays to load its engine.

The same encoded updates go through `services.aggregator.small.SmallRound` and
`services.aggregator.pipeline.RoundPipeline` (FedAvg, CPU, in this process): decode, checks and
the running mean, then `finish`. The figure is the best of `--repeats` rounds, in microseconds per
update, for workload B's 10x10 float32 tensor (1,000 updates) and workload A's MLP (64-64-10, 8
updates); both engines' models are compared byte for byte. Each engine's import is measured in a
fresh interpreter: wall time and the resident memory it adds (`VmRSS` before and after).

    .venv/bin/python bench/small_rounds.py
    .venv/bin/python bench/small_rounds.py --repeats 3 --json /tmp/small_rounds.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np

from shared.aggregation import AggregationSpec
from shared.codec import TensorRecord, encode_tensors
from shared.events import UpdateRef
from shared.tensors import from_numpy

ROOT = Path(__file__).resolve().parents[1]

CASES: dict[str, tuple[dict[str, tuple[int, ...]], int]] = {
    "B: 10x10, 1,000 updates": ({"w": (10, 10)}, 1000),
    "A: MLP 64-64-10, 8 updates": (
        {"0.weight": (64, 64), "0.bias": (64,), "2.weight": (10, 64), "2.bias": (10,)},
        8,
    ),
}
"""Case name -> (tensor shapes, number of updates)."""

IMPORTS = {
    "numpy engine": "services.aggregator.small",
    "torch engine": "services.aggregator.engine",
}

_IMPORT_PROBE = """
import sys, time
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) / 1024
import services.aggregator.rounds  # what both share, not counted
before, started = rss(), time.perf_counter()
__import__(sys.argv[1])
print(time.perf_counter() - started, rss() - before, 'torch' in sys.modules)
"""


def records(tensors: dict[str, np.ndarray]) -> list[TensorRecord]:
    return [from_numpy(k, v) for k, v in tensors.items()]


def make_case(
    shapes: dict[str, tuple[int, ...]], n: int
) -> tuple[list[TensorRecord], list[bytes], list[UpdateRef]]:
    rng = np.random.default_rng(0)

    def model() -> dict[str, np.ndarray]:
        return {k: rng.standard_normal(shape).astype(np.float32) for k, shape in shapes.items()}

    base = records(model())
    updates = [encode_tensors(records(model())) for _ in range(n)]
    refs = [
        UpdateRef(
            update_id=uuid4(), client_id=uuid4(), blob_key="update/x", num_examples=int(rng.integers(1, 50))
        )
        for _ in range(n)
    ]
    return base, updates, refs


def run_numpy(base: list[TensorRecord], updates: list[bytes], refs: list[UpdateRef]) -> bytes:
    from services.aggregator.small import SmallRound

    round_ = SmallRound(AggregationSpec(), base)
    for ref, data in zip(refs, updates, strict=True):
        if round_.offer(ref, data) is not None:
            raise RuntimeError("an update was rejected")
    return encode_tensors(round_.finish())


def run_torch(base: list[TensorRecord], updates: list[bytes], refs: list[UpdateRef]) -> bytes:
    import torch

    from services.aggregator.pipeline import RoundPipeline
    from shared.tensors import records_to_state_dict, state_dict_to_records

    pipeline = RoundPipeline(
        AggregationSpec(), records_to_state_dict(base), device=torch.device("cpu"), seed=0
    )
    for ref, data in zip(refs, updates, strict=True):
        if pipeline.offer(ref, data) is not None:
            raise RuntimeError("an update was rejected")
    return encode_tensors(state_dict_to_records(pipeline.finish().aggregate.model))


ENGINES: dict[str, Callable[[list[TensorRecord], list[bytes], list[UpdateRef]], bytes]] = {
    "numpy engine": run_numpy,
    "torch engine": run_torch,
}


def measure_import(module: str) -> dict[str, Any]:
    """Import `module` in a fresh interpreter: seconds, MiB of RSS added, whether torch came with it."""
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE, module],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    ).stdout.split()
    return {"import_s": float(out[0]), "rss_mib": float(out[1]), "imports_torch": out[2] == "True"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds per engine and case; the best counts")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of each case's updates (tests)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    rows: list[dict[str, Any]] = []
    for case, (shapes, n) in CASES.items():
        base, updates, refs = make_case(shapes, max(1, int(n * args.scale)))
        models: dict[str, bytes] = {}
        for engine, run in ENGINES.items():
            best = float("inf")
            for _ in range(args.repeats):
                started = time.perf_counter()
                models[engine] = run(base, updates, refs)
                best = min(best, time.perf_counter() - started)
            rows.append(
                {
                    "case": case,
                    "engine": engine,
                    "updates": len(updates),
                    "us_per_update": best / len(updates) * 1e6,
                }
            )
        if len(set(models.values())) != 1:
            raise RuntimeError(f"{case}: the engines' models differ")
    imports = {engine: measure_import(module) for engine, module in IMPORTS.items()}

    print(f"{'case':<28} {'engine':<14} {'µs per update':>14} {'x torch':>8}")
    for row in rows:
        torch_row = next(r for r in rows if r["case"] == row["case"] and r["engine"] == "torch engine")
        ratio = row["us_per_update"] / torch_row["us_per_update"]
        print(f"{row['case']:<28} {row['engine']:<14} {row['us_per_update']:>14.1f} {ratio:>8.2f}")
    print("the engines' models are the same bytes in every case")
    for engine, figures in imports.items():
        print(
            f"import {engine}: {figures['import_s']:.2f} s, +{figures['rss_mib']:.0f} MiB RSS"
            f"{' (torch)' if figures['imports_torch'] else ' (no torch)'}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "imports": imports}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
