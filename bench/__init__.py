"""fedhub benchmarks: `python bench/e2e.py` measures end-to-end round times."""
