"""Entry point of one federated role process: ``python -m medmpc.protocols.roles ROLE``.

Every role reads the same plan (JSON). To spread a run over machines, write one
plan with reachable addresses and ports, then start on each machine::

    python -m medmpc.protocols.roles coordinator --plan plan.json --out results/
    python -m medmpc.protocols.roles aggregator --index J --plan plan.json
    python -m medmpc.protocols.roles hospital --index I --plan plan.json
    python -m medmpc.protocols.roles dealer --plan plan.json   # with the update norm check
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from medmpc.imaging.images import DataError
from medmpc.mpc import crypten_compat
from medmpc.mpc.pki import IdentityError
from medmpc.mpc.transport import Listener, PeerError
from medmpc.protocols.plan import Plan
from medmpc.protocols.run_state import ResumeError
from medmpc.protocols.strategy import RoundAborted
from medmpc.training.accountant import BudgetError
from medmpc.training.dp import DPIncompatibleModel

# what ends a role with one line naming what went wrong (exit status 3), never a traceback
ROLE_ERRORS = (PeerError, RoundAborted, BudgetError, DPIncompatibleModel, DataError, IdentityError, ResumeError)


def role_parser(prog: str, description: str | None, roles: tuple[str, ...]) -> argparse.ArgumentParser:
    """The arguments every role process takes: its role, the plan, its index, the coordinator's --out."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("role", choices=roles)
    p.add_argument("--plan", type=Path, required=True)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--out", type=Path, help="coordinator: where results go")
    p.add_argument("--state", type=Path, help="hospital: the file that keeps its DP-SGD accountant between runs")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run: the coordinator from --out/state.pt, a hospital from --state",
    )
    return p


def party_of(args: argparse.Namespace) -> str:
    return args.role if args.role in ("coordinator", "dealer") else f"{args.role}{args.index}"


def run_role(party: str, play: Callable[[], None]) -> int:
    """Play one role to its end: exit status 0, or 3 with one line naming the party and what went wrong."""
    # several parties share this machine's cores in a simulation
    torch.set_num_threads(max(1, int(os.environ.get("MEDMPC_THREADS", "1"))))
    try:
        play()
    except ROLE_ERRORS as err:
        print(f"{party}: {err}", file=sys.stderr)
        return 3
    return 0


def coordinator_listener(plan: Plan) -> Listener:
    """Where the coordinator takes every other party's connection."""
    address = plan.listen_address("coordinator", plan.coordinator_address())
    return Listener(*address, identity=plan.identity("coordinator"))


def main(argv: list[str] | None = None) -> int:
    roles = ("coordinator", "hospital", "aggregator", "dealer")
    a = role_parser("python -m medmpc.protocols.roles", __doc__, roles).parse_args(argv)
    plan = Plan.from_json(a.plan.read_text())

    def play() -> None:
        if a.role == "coordinator":
            from medmpc.protocols.coordinator import Coordinator

            Coordinator(plan, a.out, resume=a.resume).run(coordinator_listener(plan))
        elif a.role == "hospital":
            from medmpc.protocols.hospital import Hospital

            Hospital(plan, a.index, state=a.state, resume=a.resume).run()
        elif a.role == "dealer":
            from medmpc.protocols import norm_check

            # between two checks lies a round (training, evaluation): the dealer waits as long as the run may
            norm_check.serve_dealer(plan.mpc_world("dealer"), timeout_s=plan.timeout_s * (plan.rounds + 2))
        else:
            from medmpc.protocols.aggregator import Aggregator

            crypten_compat.install()  # an aggregator holds its shares as CrypTen arithmetic shares
            Aggregator(plan, a.index).run()

    return run_role(party_of(a), play)


if __name__ == "__main__":
    sys.exit(main())
