"""What a run needs to continue after its coordinator (or the whole machine) died.

The coordinator keeps ``OUT/state.pt``: the last revealed round's global model, the revealed
statistics sums, the central-DP accountant and the report; a hospital keeps its own DP-SGD
accountant in a file of its own. The coordinator saves as soon as an average is revealed, before
anything else can fail, so a resumed run never reveals a round again (the same round over other
hospitals would give a left-out hospital's update away by subtraction); a round revealed but not
yet evaluated is evaluated on resumption. Both are written after every step that changes them, atomically
(a temporary file, fsync, rename), so a crash at any moment leaves the previous state or the new
one, never half of one. A resumed run starts at the round after the saved one: the statistics
are not aggregated (or noised, or accounted) again, and a hospital's accountant keeps every epoch
it reserved, including those of a round that was interrupted before its average was revealed
(counted although nothing was released: the safe side).

Each file holds the plan without where the parties run (addresses, ports, certificates), and a
resumed run must train exactly that plan.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from medmpc.protocols.plan import Plan

STATE_FILE = "state.pt"
# where each party runs and how it proves who it is: free to change between a run and its resumption
PLACEMENT = (
    "host",
    "coordinator_host",
    "aggregator_hosts",
    "bind",
    "coordinator_port",
    "aggregator_ports",
    "listen_ports",
    "tls_dir",
)


class ResumeError(ValueError):
    """A saved state that cannot continue this run (missing, unreadable, or from another plan)."""


def what_runs(plan: Plan) -> dict[str, Any]:
    """The plan without its placement: what is trained, by whom, how."""
    return {k: v for k, v in asdict(plan).items() if k not in PLACEMENT}


def _check_plan(saved: dict[str, Any], plan: Plan, path: Path) -> None:
    ours = what_runs(plan)
    differ = sorted(k for k in saved.keys() | ours.keys() if saved.get(k) != ours.get(k))
    if differ:
        detail = "; ".join(f"{k}: saved {saved.get(k)!r}, now {ours.get(k)!r}" for k in differ)
        raise ResumeError(f"{path} is from another plan ({detail})")


def _save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _load(path: Path) -> dict[str, Any]:
    try:
        obj = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise ResumeError(f"nothing to resume: {path} does not exist (no round of that run completed)") from None
    except Exception as err:  # a torn or foreign file: whatever torch.load raises, name the file
        raise ResumeError(f"cannot read {path}: {err}") from None
    if not isinstance(obj, dict) or "plan" not in obj:
        raise ResumeError(f"{path} is not a medmpc run state")
    return obj


@dataclass(frozen=True, kw_only=True)
class CoordinatorState:
    """The coordinator's state after ``round`` completed rounds (0: after the statistics).

    ``central_dp``: the central-DP accountant's history (PrivacyAccountant.to_dict), if any."""

    round: int
    global_vector: torch.Tensor
    stat_sums: torch.Tensor
    central_dp: dict[str, list[list[float]]] | None
    report: dict[str, Any]

    def save(self, out: Path, plan: Plan) -> None:
        # the report goes as JSON text: a plain string, whatever values it holds
        _save(
            {
                "plan": what_runs(plan),
                "round": self.round,
                "global_vector": self.global_vector,
                "stat_sums": self.stat_sums,
                "central_dp": self.central_dp,
                "report": json.dumps(self.report),
            },
            out / STATE_FILE,
        )

    @classmethod
    def load(cls, out: Path, plan: Plan) -> CoordinatorState:
        path = out / STATE_FILE
        saved = _load(path)
        _check_plan(saved["plan"], plan, path)
        report = json.loads(saved["report"])
        evaluated = all("validation" in r for r in report.get("rounds", []))
        if saved["round"] >= plan.rounds and evaluated:
            raise ResumeError(f"{path}: the run already completed all {plan.rounds} rounds")
        return cls(
            round=saved["round"],
            global_vector=saved["global_vector"],
            stat_sums=saved["stat_sums"],
            central_dp=saved["central_dp"],
            report=report,
        )


def saved_plan(out: Path) -> Plan:
    """The plan of the run whose coordinator saved its state in ``out`` (placed where a fresh
    plan is: the caller places it)."""
    return Plan(**_load(out / STATE_FILE)["plan"])


def save_accountant(path: Path, plan: Plan, history: dict[str, list[list[float]]]) -> None:
    """A hospital's DP-SGD accountant (PrivacyAccountant.to_dict), as it stands now."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _save({"plan": what_runs(plan), "accountant": history}, path)


def load_accountant(path: Path, plan: Plan) -> dict[str, list[list[float]]]:
    saved = _load(path)
    _check_plan(saved["plan"], plan, path)
    return saved["accountant"]  # type: ignore[no-any-return]
