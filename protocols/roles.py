"""Entry point of one federated role process: ``python -m medmpc.protocols.roles ROLE``.

Every role reads the same plan (JSON). To spread a run over machines, write one
plan with reachable addresses and ports, then start on each machine::

    python -m medmpc.protocols.roles coordinator --plan plan.json --out results/
    python -m medmpc.protocols.roles aggregator --index J --plan plan.json
    python -m medmpc.protocols.roles hospital --index I --plan plan.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from medmpc.imaging.images import DataError
from medmpc.mpc import crypten_compat
from medmpc.mpc.pki import IdentityError
from medmpc.mpc.transport import Listener, PeerError
from medmpc.protocols.plan import Plan
from medmpc.protocols.strategy import RoundAborted
from medmpc.training.accountant import BudgetError
from medmpc.training.dp import DPIncompatibleModel

# what ends a role with one line naming what went wrong (exit status 3), never a traceback
ROLE_ERRORS = (PeerError, RoundAborted, BudgetError, DPIncompatibleModel, DataError, IdentityError)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m medmpc.protocols.roles", description=__doc__)
    p.add_argument("role", choices=("coordinator", "hospital", "aggregator"))
    p.add_argument("--plan", type=Path, required=True)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--out", type=Path, help="coordinator: where results go")
    a = p.parse_args(argv)
    plan = Plan.from_json(a.plan.read_text())
    # several parties share this machine's cores in a simulation
    torch.set_num_threads(max(1, int(os.environ.get("MEDMPC_THREADS", "1"))))
    if a.role == "aggregator":
        crypten_compat.install()  # an aggregator holds its shares as CrypTen arithmetic shares
    try:
        if a.role == "coordinator":
            from medmpc.protocols.coordinator import Coordinator

            address = plan.listen_address("coordinator", plan.coordinator_address())
            Coordinator(plan, a.out).run(Listener(*address, identity=plan.identity("coordinator")))
        elif a.role == "hospital":
            from medmpc.protocols.hospital import Hospital

            Hospital(plan, a.index).run()
        else:
            from medmpc.protocols.aggregator import Aggregator

            Aggregator(plan, a.index).run()
    except ROLE_ERRORS as err:
        print(f"{a.role}{a.index if a.role in ('hospital', 'aggregator') else ''}: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
