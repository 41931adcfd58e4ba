"""Secure aggregation against a plaintext float32 all-reduce among the same processes.

Each case runs ``medmpc bench secure-aggregation --json`` (every party its own
process); the protocol times it reports (medians of --repeat runs, measured
inside the processes) go into pytest-benchmark's extra_info and into
``benchmarks/results/secure_aggregation.json``. Set MEDMPC_BENCH_PARAMS to
change the update size (default: ResNet-18, 11.2M values).

    .venv/bin/python -m pytest benchmarks/test_secure_aggregation.py --benchmark-only -s
"""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import record

PARAMS = int(os.environ.get("MEDMPC_BENCH_PARAMS", 11_200_000))


def _bench(hospitals: int, aggregators: int) -> dict:
    cmd = [sys.executable, "-m", "cli.main", "bench", "secure-aggregation", "--params", str(PARAMS),
           "--hospitals", str(hospitals), "--aggregators", str(aggregators), "--repeat", "5", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("aggregators", [2, 3])
@pytest.mark.parametrize("hospitals", [2, 3, 5, 10])
def test_secure_aggregation_vs_allreduce(benchmark, hospitals, aggregators):
    result = benchmark.pedantic(_bench, args=(hospitals, aggregators), rounds=1, iterations=1)
    # encoding rounds to half a unit of 2^-16; the division truncates by up to K-1 more units
    assert result["max_abs_err"] <= (aggregators + 1) * 2**-16
    benchmark.extra_info.update({k: result[k] for k in ("secure_s", "plaintext_s", "ratio", "offline_s", "phases_s", "max_abs_err")})
    benchmark.extra_info["bytes_per_party"] = result["bytes_per_party"]
    record("secure_aggregation", {f"N={hospitals},K={aggregators}": result})
