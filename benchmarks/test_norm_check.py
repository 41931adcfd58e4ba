"""The update norm check's cost: one secure aggregation of PARAMS values with the check, against
the same without it, in the same job and the same mode (a hospital may be left out, so the
aggregators' mask sums wait for the reveal in both). Online time, the check's own online time,
bytes and rounds per aggregator, and the offline time go into
``benchmarks/results/norm_check.json``.

    .venv/bin/python -m pytest benchmarks/test_norm_check.py --benchmark-only -s
"""

import pytest

from benchmarks import record
from benchmarks.test_secure_aggregation import PARAMS, run

BOUND = 10.0  # every random update has norm BOUND / 2: all are accepted
TARGET = 1.5  # the ceiling: the check adds at most 50 % to the online time


@pytest.mark.parametrize("hospitals", [3, 10])
def test_norm_check_overhead(benchmark, hospitals):
    quorum = ("--min-hospitals", str(hospitals - 1))

    def both() -> tuple[dict, dict]:
        return run(hospitals, 2, *quorum), run(hospitals, 2, *quorum, "--update-norm-bound", str(BOUND))

    without, checked = benchmark.pedantic(both, rounds=1, iterations=1)
    assert checked["max_abs_err"] <= 3 * 2**-16 and without["max_abs_err"] <= 3 * 2**-16
    row = {
        "params": PARAMS,
        "hospitals": hospitals,
        "aggregators": 2,
        "online_s": checked["secure_s"],
        "online_without_s": without["secure_s"],
        "ratio": checked["secure_s"] / without["secure_s"],
        "check_online_s": checked["norm_check_s"],
        "check_bytes_per_aggregator": checked["norm_check_bytes"],
        "check_rounds": checked["norm_check_rounds"],
        "offline_s": checked["offline_s"],
        "offline_without_s": without["offline_s"],
        "bytes_per_party": checked["bytes_per_party"],
        "bytes_per_party_without": without["bytes_per_party"],
        "online_runs_s": checked["secure_runs_s"],
        "online_without_runs_s": without["secure_runs_s"],
        "transport": checked["transport"],
    }
    benchmark.extra_info.update(row)
    record("norm_check", {f"N={hospitals},K=2": row})
    assert row["ratio"] <= TARGET, row
