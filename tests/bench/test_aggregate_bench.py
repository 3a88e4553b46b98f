"""The aggregation bench at its quick size: every figure is there and the results agree with numpy.

Figures are never asserted (this machine's timing is not a test); what the bench computes is.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from bench.aggregate import (
    QUICK_CASES,
    QUICK_PODS,
    CaseSpec,
    main,
    model_shapes,
    pods_lines,
    run_bench,
    run_pods,
    table_lines,
)

pytestmark = pytest.mark.timeout(300)

FIGURES = (
    "numpy_gbs",
    "fedavg_gbs",
    "fedavg_pct_numpy",
    "fedavg_decode_gbs",
    "median_gbs",
    "median_decode_gbs",
    "torch_median_gbs",
    "median_vs_torch",
    "trimmed_gbs",
)


def test_model_shapes_hold_exactly_the_parameters() -> None:
    """The synthetic model has exactly the asked number of parameters, in weights and biases."""
    for params in (1_000, 40_000, 1_000_000, 25_000_001):
        shapes = model_shapes(params)
        assert sum(int(torch.Size(s).numel()) for s in shapes.values()) == params
        assert len(shapes) == 8


def test_quick_bench_rows_and_checks() -> None:
    """One repeat of the quick cases: positive figures, fedhub's results within float32 of numpy."""
    doc = run_bench(QUICK_CASES[:2], repeats=1, device=torch.device("cpu"), use_flower=False)
    assert [row["case"] for row in doc["cases"]] == ["12 x 40K float32", "5 x 120K float32"]
    assert doc["notes"] == ["Flower left out (--no-flower)"]
    for row, spec in zip(doc["cases"], QUICK_CASES, strict=False):
        assert row["bytes"] == spec.clients * spec.params * 4
        for key in FIGURES:
            assert isinstance(row[key], float) and row[key] > 0, key
        assert "flower_aggregate_gbs" not in row
        for check, err in row["checks"].items():
            assert err < 1e-5, check
    lines = table_lines(doc)
    assert lines[0].startswith("| case | numpy GB/s | FedAvg GB/s")
    assert len(lines) >= 2 + len(doc["cases"])


def test_bfloat16_case_runs() -> None:
    """The bfloat16 case: numpy reads the same bytes as float32; results within bfloat16 of numpy."""
    doc = run_bench([CaseSpec(3, 4_000, torch.bfloat16)], repeats=1, device=torch.device("cpu"))
    (row,) = doc["cases"]
    assert row["dtype"] == "bfloat16"
    assert row["bytes"] == 3 * 4_000 * 2
    assert "flower_aggregate_gbs" not in row
    for check in ("fedavg_max_abs", "median_max_abs", "trimmed_max_abs"):
        assert row["checks"][check] < 0.05, check


def test_main_writes_json(tmp_path, capsys) -> None:
    """`--quick --json` prints the table and writes a document with every case."""
    path = tmp_path / "agg.json"
    assert main(["--quick", "--no-flower", "--markdown", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert [row["case"] for row in doc["cases"]] == [spec.label for spec in QUICK_CASES]
    assert doc["repeats"] == 1
    assert doc["fold_window"] == 4
    assert doc["machine"]["torch_threads"] == torch.get_num_threads()
    assert "pods" not in doc
    out = capsys.readouterr().out
    assert "| 5 x 60K bfloat16 |" in out
    assert "FedAvg fold window 4" in out


def test_fedavg_one_add_per_update_agrees_with_windows() -> None:
    """--window 1 (one add per update) gives the same checks as the pipeline's windows."""
    windowed = run_bench(QUICK_CASES[:1], repeats=1, device=torch.device("cpu"), use_flower=False)
    single = run_bench(QUICK_CASES[:1], repeats=1, device=torch.device("cpu"), use_flower=False, window=1)
    assert single["fold_window"] == 1
    assert windowed["cases"][0]["checks"]["fedavg_max_abs"] == single["cases"][0]["checks"]["fedavg_max_abs"]


@pytest.mark.integration
def test_across_pods_figure_on_one_process() -> None:
    """One aggregator process on RabbitMQ and PostgreSQL: a positive figure, or a note saying why not."""
    pods = run_pods([1], QUICK_PODS, repeats=1)
    assert pods["bytes"] == QUICK_PODS.updates * QUICK_PODS.params * 4
    if not pods["rows"]:
        assert pods["note"].startswith("across pods left out:")
        if os.environ.get("CI", "").lower() in {"true", "1"}:
            pytest.fail(f"RabbitMQ and PostgreSQL are part of the build under CI=true: {pods['note']}")
        pytest.skip(pods["note"])
    (row,) = pods["rows"]
    assert row["processes"] == 1
    assert row["seconds"] > 0 and row["gbs"] > 0
    assert row["updates_per_s"] == pytest.approx(QUICK_PODS.updates / row["seconds"])
    assert "| 1 |" in "\n".join(pods_lines(pods))
