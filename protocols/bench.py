"""``medmpc bench secure-aggregation``: one secure aggregation against a plaintext all-reduce.

Both run among the same hospital processes on the same random updates: the
baseline is a float32 ``all_reduce`` (gloo) among the hospitals; the secure path
is the full protocol (encode, share, send, sum, divide in MPC, reveal).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from protocols.coordinator import Coordinator
from protocols.plan import Plan
from protocols.strategy import Aggregation


def bench_update(plan: Plan, index: int) -> torch.Tensor:
    """Hospital ``index``'s random update; the coordinator regenerates it to measure the error."""
    g = torch.Generator().manual_seed(plan.seed * 100 + index)
    return torch.randn(plan.bench_params, generator=g)


def baseline_allreduce(update: torch.Tensor) -> float:
    """Seconds for one float32 all-reduce among the hospitals (process group already up)."""
    import torch.distributed as dist

    buf = update.clone()
    dist.barrier()
    start = time.perf_counter()
    dist.all_reduce(buf)
    return time.perf_counter() - start


def run_bench(coord: Coordinator, strategy: Any, repeat: int) -> dict[str, Any]:
    p = coord.plan
    names = p.hospital_names
    expected = torch.stack([bench_update(p, i) for i in range(p.hospitals)]).double().mean(0).float()
    coord.traffic_since_last()
    secure, plain, offline, errors = [], [], [], []
    phases: dict[str, list[float]] = {"sharing": [], "reveal": []}
    traffic: dict[str, dict[str, int]] = {}
    for rep in range(repeat):
        for h in names:
            coord.channels[h].send("baseline")
        plain.append(max(coord.channels[h].expect("baseline_done").meta["seconds"] for h in names))
        coord.traffic_since_last()  # the secure traffic below is counted on its own
        noise_std, divisor = p.aggregation(f"bench{rep}")
        job = Aggregation(f"bench{rep}", p.bench_params, round=0, divisor=divisor, noise_std=noise_std)
        # offline: masks, seeds and the shares made of them do not depend on the updates
        offline_start = time.perf_counter()
        strategy.begin(job)
        for h in names:
            coord.channels[h].send("prepare", {"tag": job.tag, "numel": p.bench_params})
        for h in names:
            coord.channels[h].expect("prepared")
        strategy.wait_offline()
        offline.append(time.perf_counter() - offline_start)
        start = time.perf_counter()
        avg, info = coord.aggregate(strategy, job, request="bench", meta={}, begun=True)
        secure.append(time.perf_counter() - start)
        phases["sharing"].append(info["sharing_s"])
        phases["reveal"].append(info["reveal_s"])
        errors.append(float((avg - expected).abs().max()))
        traffic = coord.traffic_since_last()
    secure_s, plaintext_s = statistics.median(secure), statistics.median(plain)
    return {
        "params": p.bench_params, "hospitals": p.hospitals, "aggregators": p.aggregators,
        "fractional_bits": p.fractional_bits, "repeat": repeat,
        "secure_s": secure_s, "plaintext_s": plaintext_s, "ratio": secure_s / plaintext_s,
        "secure_runs_s": secure, "plaintext_runs_s": plain, "offline_s": statistics.median(offline),
        "phases_s": {name: statistics.median(v) for name, v in phases.items()},
        "bytes_per_party": {party: t["bytes_sent"] for party, t in traffic.items()},
        "max_abs_err": max(errors),
    }  # fmt: skip

