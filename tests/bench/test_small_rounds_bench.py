"""The small-round bench at a small size: both engines run every case (a model that differs raises),
and each engine's import is probed in a fresh interpreter. Figures are never asserted."""

from __future__ import annotations

import json
from pathlib import Path

from bench.small_rounds import CASES, ENGINES, main


def test_small_rounds_bench_runs_both_engines_on_every_case(tmp_path: Path) -> None:
    out = tmp_path / "small_rounds.json"
    assert main(["--repeats", "1", "--scale", "0.01", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["case"], r["engine"]) for r in result["rows"]] == [(c, e) for c in CASES for e in ENGINES]
    assert all(r["us_per_update"] > 0 for r in result["rows"])
    assert result["imports"]["numpy engine"]["imports_torch"] is False
    assert result["imports"]["torch engine"]["imports_torch"] is True
