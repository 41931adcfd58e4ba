"""Run a whole federated training locally: every role its own OS process on loopback."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from mpc import pki
from mpc.launch import PartyProcess, free_port, supervise
from protocols.plan import Plan


def with_free_ports(plan: Plan) -> Plan:
    """Fill in any port left at 0 with a free one on ``plan.host``."""
    values = json.loads(plan.to_json())
    values["coordinator_port"] = plan.coordinator_port or free_port(plan.host)
    if plan.bench_params:
        values["baseline_port"] = plan.baseline_port or free_port(plan.host)
    if plan.secure and len(plan.aggregator_ports) != plan.aggregators:
        values["aggregator_ports"] = [free_port(plan.host) for _ in range(plan.aggregators)]
    return Plan(**values)


def with_ephemeral_federation(plan: Plan, folder: Path) -> Plan:
    """A CA for this run only, certificates for every role, and the CA's key never written."""
    parties = ["coordinator", *plan.hospital_names, *plan.aggregator_names]
    pki.init_federation(folder, parties, days=7, keep_ca_key=False)
    values = json.loads(plan.to_json())
    values["tls_dir"] = str(folder)
    return Plan(**values)


def role_processes(plan_file: Path, plan: Plan, out: Path) -> list[PartyProcess]:
    def role(name: str, *args: str) -> PartyProcess:
        return PartyProcess(name, [sys.executable, "-m", "protocols.roles", *args, "--plan", str(plan_file)])

    procs = [role("coordinator", "coordinator", "--out", str(out))]
    procs[0].echo = True
    procs += [role(f"hospital{i}", "hospital", "--index", str(i)) for i in range(plan.hospitals)]
    if plan.secure:
        procs += [role(f"aggregator{j}", "aggregator", "--index", str(j)) for j in range(plan.aggregators)]
    return procs


def simulate(plan: Plan, out: Path, *, deadline_s: float | None = None) -> dict[str, Any]:
    """Run every role to completion; returns the coordinator's report (also in out/report.json).

    With ``plan.bench_params`` the coordinator runs the aggregation benchmark instead of training.
    """
    plan = with_free_ports(plan)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medmpc-sim-") as tmp:
        if not plan.plaintext_transport and not plan.tls_dir:
            plan = with_ephemeral_federation(plan, Path(tmp) / "pki")
        plan_file = Path(tmp) / "plan.json"
        plan_file.write_text(plan.to_json())
        supervise(
            role_processes(plan_file, plan, out),
            timeout_s=deadline_s or plan.timeout_s * (plan.rounds + 2),
            workdir=Path(tmp),
        )
    return json.loads((out / "report.json").read_text())
