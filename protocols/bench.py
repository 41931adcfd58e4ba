"""``medmpc bench secure-aggregation``: one secure aggregation against plaintext FedAvg.

All run among the same hospital processes on the same random updates: the secure path is
the full protocol (encode, share, send, sum, divide in MPC, reveal); plaintext FedAvg sends
each float32 update to the coordinator over the same channels (TLS or not), which averages
it; and, where all hospitals share one machine, a float32 ``all_reduce`` (gloo, no TLS)
among the hospitals.

The benchmark has roles of its own (``python -m medmpc.protocols.bench``): a
coordinator that times aggregations in place of training, and hospitals that
contribute random updates in place of trained ones. The aggregators are the
production ones, unchanged: aggregation ``roundR`` of the benchmark is an
ordinary aggregation (no noise, the mean over the hospitals).
"""

from __future__ import annotations

import datetime
import json
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from medmpc.mpc.launch import Hosts, free_port
from medmpc.mpc.transport import Listener
from medmpc.protocols import messages
from medmpc.protocols.commands import next_command
from medmpc.protocols.coordinator import Coordinator
from medmpc.protocols.hospital import Hospital
from medmpc.protocols.messages import Baseline, BaselineDone, Contribute, Prepare, Prepared
from medmpc.protocols.plan import Plan
from medmpc.protocols.roles import coordinator_listener, party_of, role_parser, run_role
from medmpc.protocols.simulate import launch_roles
from medmpc.protocols.strategy import Aggregation, PlainFedAvg, RoundAborted
from medmpc.protocols.submit import PlainSubmitter
from medmpc.training.reports import write_json

R = TypeVar("R")


@dataclass(frozen=True, kw_only=True)
class Bench:
    """What to measure: ``repeat`` aggregations of ``params`` float32 values each; the
    hospitals' plaintext all-reduce meets at ``allreduce_at`` ("host:port"; empty: no all-reduce)."""

    params: int
    repeat: int = 3
    allreduce_at: str = ""

    def __post_init__(self) -> None:
        if self.params < 1 or self.repeat < 1:
            raise ValueError(f"bench needs params >= 1 and repeat >= 1, got {self.params} and {self.repeat}")

    def args(self) -> list[str]:
        return ["--params", str(self.params), "--repeat", str(self.repeat), "--allreduce-at", self.allreduce_at]


def bench_update(plan: Plan, bench: Bench, index: int) -> torch.Tensor:
    """Hospital ``index``'s random update; the coordinator regenerates it to measure the error."""
    # torch's generator on purpose: public random updates that the coordinator regenerates to
    # measure the error; no secret depends on them (the masks and seeds come from mpc.prg)
    g = torch.Generator().manual_seed(plan.seed * 100 + index)
    update = torch.randn(bench.params, generator=g)
    if plan.update_norm_bound is not None:  # well inside the bound: every hospital is accepted
        update *= plan.update_norm_bound / 2 / update.norm()
    return update


class BenchHospital(Hospital):
    """A hospital with a random update and no data."""

    def __init__(self, plan: Plan, index: int, bench: Bench) -> None:
        super().__init__(plan, index)
        self.bench = bench
        self.update = bench_update(plan, bench, index)

    def _baseline(self) -> float:
        """Seconds for one float32 all-reduce of the update among the hospitals."""
        p = self.plan
        if not dist.is_initialized():
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://{self.bench.allreduce_at}",
                rank=self.index,
                world_size=p.hospitals,
                timeout=datetime.timedelta(seconds=p.timeout_s),
            )
            dist.all_reduce(torch.zeros(1))  # connect before timing
        buf = self.update.clone()
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buf)
        return time.perf_counter() - start

    def run(self) -> None:
        coord, submitter = self._connect()
        in_the_clear = PlainSubmitter(self.name, coord)  # plaintext FedAvg, the baseline
        while (received := next_command(coord, self.traffic, Baseline, Prepare, Contribute)) is not None:
            command, _ = received
            if isinstance(command, Baseline):
                messages.send(coord, BaselineDone(self._baseline()))
            elif isinstance(command, Prepare):
                submitter.prepare(command.tag, command.numel)
                messages.send(coord, Prepared())
            else:
                via = in_the_clear if command.in_the_clear else submitter
                self.contribute(coord, via, command.tag, self.update, train_s=0.0)


class BenchCoordinator(Coordinator):
    """Times ``bench.repeat`` secure aggregations, each beside plaintext FedAvg (and an all-reduce)."""

    def __init__(self, plan: Plan, out: Path, bench: Bench) -> None:
        super().__init__(plan, out)
        self.bench = bench

    def _ask(self, message: Any, reply: type[R]) -> list[R]:
        for h in self.plan.hospital_names:
            messages.send(self.channels[h], message)
        return [messages.receive(self.channels[h], reply)[0] for h in self.plan.hospital_names]

    def run(self, listener: Listener) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        strategy = self.connect_all(listener)
        try:
            report = self._measure(strategy) | {"transport": self.plan.transport}
        finally:
            self.stop_all()
        write_json(report, self.out / "report.json")
        return report

    def _measure(self, strategy: Any) -> dict[str, Any]:
        p, b = self.plan, self.bench
        expected = torch.stack([bench_update(p, b, i) for i in range(p.hospitals)]).double().mean(0).float()
        self.traffic_since_last()
        secure, fedavg, allreduce, offline, errors = [], [], [], [], []
        phases: dict[str, list[float]] = {"sharing": [], "reveal": []}
        check: dict[str, list[float]] = {"norm_check_s": [], "norm_check_bytes": [], "norm_check_rounds": []}
        traffic: dict[str, dict[str, int]] = {}
        fedavg_traffic: dict[str, dict[str, int]] = {}
        for r in range(1, b.repeat + 1):
            noise_std, divisor = p.aggregation(f"round{r}", n_samples=p.hospitals, n_hospitals=p.hospitals)
            job = Aggregation(
                tag=f"round{r}",
                numel=b.params,
                round=r,
                divisor=divisor,
                noise_std=noise_std,
                norm_bound=p.norm_bound(r, None),
            )
            start = time.perf_counter()
            _, plain = self.aggregate(PlainFedAvg(), job, Contribute(job.tag, in_the_clear=True))
            if "excluded" in plain:
                raise RoundAborted(f"benchmark {job.tag} (plaintext FedAvg): left out {plain['excluded']}")
            fedavg.append(time.perf_counter() - start)
            fedavg_traffic = self.traffic_since_last()
            if b.allreduce_at:
                allreduce.append(max(done.seconds for done in self._ask(Baseline(), BaselineDone)))
            self.traffic_since_last()  # the secure traffic below is counted on its own
            # offline: masks, seeds and the shares made of them do not depend on the updates
            offline_start = time.perf_counter()
            strategy.begin(job, p.hospital_names)
            self._ask(Prepare(job.tag, numel=b.params), Prepared)
            strategy.wait_offline()
            offline.append(time.perf_counter() - offline_start)
            start = time.perf_counter()
            avg, info = self.aggregate(strategy, job, Contribute(job.tag), begun=True)
            if "excluded" in info:  # a benchmark measures every hospital or nothing
                raise RoundAborted(f"benchmark {job.tag}: left out {info['excluded']}")
            secure.append(time.perf_counter() - start)
            phases["sharing"].append(info["sharing_s"])
            phases["reveal"].append(info["reveal_s"])
            for key, values in check.items():
                if key in info:
                    values.append(info[key])
            errors.append(float((avg - expected).abs().max()))
            traffic = self.traffic_since_last()
        secure_s, fedavg_s = statistics.median(secure), statistics.median(fedavg)
        baseline = {}
        if allreduce:
            baseline = {
                "plaintext_s": statistics.median(allreduce),
                "ratio": secure_s / statistics.median(allreduce),
                "plaintext_runs_s": allreduce,
            }
        return {
            "params": b.params,
            "hospitals": p.hospitals,
            "aggregators": p.aggregators,
            "fractional_bits": p.fractional_bits,
            "repeat": b.repeat,
            "secure_s": secure_s,
            "fedavg_s": fedavg_s,
            "ratio_fedavg": secure_s / fedavg_s,
            **baseline,
            "secure_runs_s": secure,
            "fedavg_runs_s": fedavg,
            "offline_s": statistics.median(offline),
            "phases_s": {name: statistics.median(v) for name, v in phases.items()},
            "bytes_per_party": {party: t["bytes_sent"] for party, t in traffic.items()},
            "fedavg_bytes_per_party": {party: t["bytes_sent"] for party, t in fedavg_traffic.items()},
            "max_abs_err": max(errors),
            **{key: statistics.median(values) for key, values in check.items() if values},
        }


def run_bench(
    plan: Plan, bench: Bench, out: Path, *, hosts: Hosts | None = None, deadline_s: float | None = None
) -> dict[str, Any]:
    """Run the benchmark's coordinator and hospitals and the production aggregators, each its own
    process on its host (default: all on this machine, with the all-reduce too); returns the
    report (also in out/report.json). The plan's ``rounds`` become ``bench.repeat``."""
    # an aggregation of the mean, no noise: what the benchmark compares with plaintext FedAvg
    plain_mean = {"rounds": bench.repeat, "secure": True, "central_dp_noise": None, "stats_noise": None}
    plan = Plan(**(json.loads(plan.to_json()) | plain_mean))
    if hosts is None and not bench.allreduce_at:
        bench = replace(bench, allreduce_at=f"{plan.host}:{free_port(plan.host)}")
    me = [sys.executable, "-m", "medmpc.protocols.bench", *bench.args()]
    return launch_roles(
        plan,
        out,
        hosts=hosts,
        coordinator=me,
        hospital=me,
        deadline_s=deadline_s or plan.timeout_s * (bench.repeat + 2),
    )


def main(argv: list[str] | None = None) -> int:
    p = role_parser("python -m medmpc.protocols.bench", __doc__, ("coordinator", "hospital"))
    p.add_argument("--params", type=int, required=True)
    p.add_argument("--repeat", type=int, required=True)
    p.add_argument("--allreduce-at", default="", help="HOST:PORT of the all-reduce's rendezvous; empty: none")
    a = p.parse_args(argv)
    plan = Plan.from_json(a.plan.read_text())
    bench = Bench(params=a.params, repeat=a.repeat, allreduce_at=a.allreduce_at)

    def play() -> None:
        if a.role == "coordinator":
            BenchCoordinator(plan, a.out, bench).run(coordinator_listener(plan))
        else:
            BenchHospital(plan, a.index, bench).run()

    return run_role(f"bench {party_of(a)}", play)


if __name__ == "__main__":
    sys.exit(main())
