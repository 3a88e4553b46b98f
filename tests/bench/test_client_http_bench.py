"""The client HTTP bench at a small size: every client kind posts and reads each answer (a failed
request raises), and each gets a CPU figure per round. Figures are never asserted."""

from __future__ import annotations

import json
from pathlib import Path

from bench.client_http import CLIENTS, main


def test_client_http_bench_measures_every_client(tmp_path: Path) -> None:
    out = tmp_path / "client_http.json"
    assert main(["--clients", "4", "--rounds", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["client"] for row in result["rows"]] == list(CLIENTS)
    for row in result["rows"]:
        assert len(row["cpu_us"]) == 2
        assert all(us > 0 for us in row["cpu_us"])
