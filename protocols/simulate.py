"""Run a whole federated training: every role its own OS process, all on this machine's
loopback or each on a host of its own (``mpc.launch.Hosts``), with the production role commands."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from medmpc.mpc import pki
from medmpc.mpc.launch import Hosts, PartyProcess, ThisMachine, supervise
from medmpc.protocols.plan import Plan
from medmpc.training.reports import write_json

COORDINATOR_PORT, AGGREGATOR_PORT, DEALER_PORT = 7000, 7100, 7200  # where each host's ports are its own
HOSPITAL_STATE = "hospital_state"  # in a simulation's out folder: each hospital's DP accountant


def placed(plan: Plan, hosts: Hosts) -> Plan:
    """The plan with every listener's address and port: those the plan leaves out come from ``hosts``."""
    values = json.loads(plan.to_json())
    values["coordinator_host"] = plan.coordinator_host or hosts.address("coordinator")
    values["coordinator_port"] = plan.coordinator_port or hosts.port("coordinator", COORDINATOR_PORT)
    if plan.secure:
        values["aggregator_hosts"] = plan.aggregator_hosts or [hosts.address(a) for a in plan.aggregator_names]
        if len(plan.aggregator_ports) != plan.aggregators:
            values["aggregator_ports"] = [hosts.port(a, AGGREGATOR_PORT) for a in plan.aggregator_names]
    if plan.norm_checked:
        values["dealer_host"] = plan.dealer_host or hosts.address("dealer")
        values["dealer_port"] = plan.dealer_port or hosts.port("dealer", DEALER_PORT)
        if len(plan.aggregator_mpc_ports) != plan.aggregators:
            values["aggregator_mpc_ports"] = [hosts.port(a, DEALER_PORT + 1) for a in plan.aggregator_names]
    return Plan(**values)


def with_ephemeral_federation(plan: Plan, folder: Path) -> Plan:
    """A CA for this run only, certificates for every role, and the CA's key never written."""
    pki.init_federation(folder, plan.party_names, days=7, keep_ca_key=False)
    values = json.loads(plan.to_json())
    values["tls_dir"] = str(folder)
    return Plan(**values)


ROLES = [sys.executable, "-m", "medmpc.protocols.roles"]


def role_processes(
    plan_file: Path,
    plan: Plan,
    out: Path,
    *,
    hosts: Hosts,
    coordinator: list[str] = ROLES,
    hospital: list[str] = ROLES,
    resume: bool = False,
) -> list[PartyProcess]:
    """One process per role, each on its host; ``coordinator`` and ``hospital``: the command
    lines their roles are appended to (the production roles unless a benchmark brings its own).
    Hospitals keep their DP accountants in ``out/HOSPITAL_STATE``; ``resume`` continues the
    run saved in ``out``."""

    def role(name: str, command: list[str], *args: str) -> PartyProcess:
        again = ["--resume"] if resume else []
        return PartyProcess(name, hosts.command(name, [*command, *args, "--plan", str(plan_file), *again]))

    procs = [role("coordinator", coordinator, "coordinator", "--out", str(out))]
    procs[0].echo = True
    procs += [
        role(
            f"hospital{i}",
            hospital,
            "hospital",
            "--index",
            str(i),
            "--state",
            str(out / HOSPITAL_STATE / f"hospital{i}.pt"),
        )
        for i in range(plan.hospitals)
    ]
    if plan.secure:
        procs += [role(f"aggregator{j}", ROLES, "aggregator", "--index", str(j)) for j in range(plan.aggregators)]
    if plan.norm_checked:
        procs.append(role("dealer", ROLES, "dealer"))
    return procs


def launch_roles(
    plan: Plan,
    out: Path,
    *,
    deadline_s: float,
    hosts: Hosts | None = None,
    coordinator: list[str] = ROLES,
    hospital: list[str] = ROLES,
    resume: bool = False,
) -> dict[str, Any]:
    """Run every role to completion, each on its host (default: all on this machine at
    ``plan.host``); returns the coordinator's report (also in out/report.json). Addresses and
    ports the plan leaves out come from ``hosts``, and without ``plan.tls_dir`` (and not on the
    plaintext transport) an ephemeral federation CA is made for this run."""
    hosts = hosts or ThisMachine(plan.host)
    plan = placed(plan, hosts)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medmpc-sim-") as tmp:
        if not plan.plaintext_transport and not plan.tls_dir:
            plan = with_ephemeral_federation(plan, Path(tmp) / "pki")
        plan_file = Path(tmp) / "plan.json"
        plan_file.write_text(plan.to_json())
        processes = role_processes(
            plan_file, plan, out, hosts=hosts, coordinator=coordinator, hospital=hospital, resume=resume
        )
        # where a round may go on without a hospital, so may the run (the coordinator decides)
        expendable = frozenset(plan.hospital_names if plan.exclusions_possible else [])
        try:
            supervise(processes, timeout_s=deadline_s, workdir=Path(tmp), expendable=expendable)
        except BaseException as err:  # Ctrl-C and signals too: the report on disk must not pass for whole
            mark_interrupted(out / "report.json", why=f"{type(err).__name__}: {err}".rstrip(": "))
            raise
    return json.loads((out / "report.json").read_text())  # type: ignore[no-any-return]


def mark_interrupted(report_file: Path, *, why: str) -> None:
    """Say in a run's report (if it has one yet) that the run ended early, after which round, and why;
    ``--resume`` continues it and writes a whole report again."""
    if not report_file.exists():
        return
    report = json.loads(report_file.read_text())
    report["interrupted"] = {"after_round": len(report.get("rounds", [])), "why": why}
    write_json(report, report_file)


def simulate(
    plan: Plan, out: Path, *, hosts: Hosts | None = None, deadline_s: float | None = None, resume: bool = False
) -> dict[str, Any]:
    """Run a whole federated training, every role to completion; returns the coordinator's report.

    ``resume``: continue the run that saved its state in ``out`` (protocols.run_state) after its
    last completed round; ``plan`` must be that run's (run_state.saved_plan), placed anywhere."""
    deadline_s = deadline_s or plan.timeout_s * (plan.rounds + 2)
    return launch_roles(plan, out, hosts=hosts, deadline_s=deadline_s, resume=resume)
