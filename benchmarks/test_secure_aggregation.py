"""Secure aggregation against a plaintext float32 all-reduce among the same processes.

Each case runs ``medmpc bench secure-aggregation --json`` (every party its own
process); the protocol times it reports (medians of --repeat runs, measured
inside the processes) go into pytest-benchmark's extra_info and into
``benchmarks/results/secure_aggregation.json``, plotted in ``secure_aggregation.png``.
Set MEDMPC_BENCH_PARAMS to change the update size (default: ResNet-18, 11.2M values).

    .venv/bin/python -m pytest benchmarks/test_secure_aggregation.py --benchmark-only -s
"""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import RESULTS_DIR, record
from medmpc.training import plots

PARAMS = int(os.environ.get("MEDMPC_BENCH_PARAMS", 11_200_000))


def run(hospitals: int, aggregators: int, *extra: str) -> dict:
    """``medmpc bench secure-aggregation --json`` of PARAMS values, medians of 5 runs; ``extra``: more flags."""
    cmd = [
        sys.executable,
        "-m",
        "medmpc.cli.main",
        "bench",
        "secure-aggregation",
        "--params",
        str(PARAMS),
        "--hospitals",
        str(hospitals),
        "--aggregators",
        str(aggregators),
        "--repeat",
        "5",
        "--json",
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def plot(rows: dict[str, dict]) -> None:
    """Seconds and the secure / plaintext ratio against N, one line per K, from the recorded
    rows of this update size."""
    cases = sorted((r["hospitals"], r["aggregators"], r) for r in rows.values() if r["params"] == PARAMS)
    seconds: dict[str, tuple[list[float], list[float]]] = {}
    ratios: dict[str, tuple[list[float], list[float]]] = {}
    for k in sorted({k for _, k, _ in cases}):
        ns = [n for n, kk, _ in cases if kk == k]
        measured = [r for _, kk, r in cases if kk == k]
        seconds[f"secure, K={k}"] = (ns, [r["secure_s"] for r in measured])
        seconds[f"all-reduce (K={k} runs)"] = (ns, [r["plaintext_s"] for r in measured])
        ratios[f"K={k}"] = (ns, [r["ratio"] for r in measured])
    # online bytes: N masked updates in and one share out, against a ring all-reduce's
    # 2 (N - 1) / N float32 vectors sent by each of N processes: each value is 8 vs 4 bytes
    ns = sorted({n for n, _, _ in cases})
    ratios["bytes moved, (N + 1) / (N - 1)"] = (ns, [(n + 1) / (n - 1) for n in ns])
    plots.lines_png(
        {"seconds": seconds, "secure / plaintext": ratios},
        RESULTS_DIR / "secure_aggregation.png",
        xlabel="hospitals N",
        references={"secure / plaintext": {"target: 2x": 2.0}},
        title=f"one secure aggregation of {PARAMS / 1e6:.1f}M values vs a float32 all-reduce (medians of 5)",
    )


@pytest.mark.parametrize("aggregators", [2, 3])
@pytest.mark.parametrize("hospitals", [2, 3, 5, 10])
def test_secure_aggregation_vs_allreduce(benchmark, hospitals, aggregators):
    result = benchmark.pedantic(run, args=(hospitals, aggregators), rounds=1, iterations=1)
    # encoding rounds to half a unit of 2^-16; the division truncates by up to K-1 more units
    assert result["max_abs_err"] <= (aggregators + 1) * 2**-16
    benchmark.extra_info.update(
        {k: result[k] for k in ("secure_s", "plaintext_s", "ratio", "offline_s", "phases_s", "max_abs_err")}
    )
    benchmark.extra_info["bytes_per_party"] = result["bytes_per_party"]
    record("secure_aggregation", {f"N={hospitals},K={aggregators}": result})
    plot(json.loads((RESULTS_DIR / "secure_aggregation.json").read_text()))
