"""Benchmarks (pytest-benchmark suites and scripts); results go to benchmarks/results/."""

import json
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"


def record(name: str, rows: dict[str, dict]) -> None:
    """Merge ``rows`` into ``results/NAME.json``, keeping the rows other runs wrote."""
    path = RESULTS_DIR / f"{name}.json"
    RESULTS_DIR.mkdir(exist_ok=True)
    table = json.loads(path.read_text()) if path.exists() else {}
    table.update(rows)
    path.write_text(json.dumps(table, indent=2))
