"""Server processes the benches start and measure: run from a source tree, terminated at the end."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
"""The repository this bench belongs to."""


@contextlib.contextmanager
def server_process(
    argv: list[str], env: dict[str, str], log: Path, root: Path = ROOT
) -> Iterator[subprocess.Popen[bytes]]:
    """`argv` run from `root` (importable from there) with `env` added, its output in `log`;
    terminated at the end (killed if it takes longer than 20 s)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root), **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
