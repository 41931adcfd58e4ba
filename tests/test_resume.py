"""A run whose coordinator died continues with `medmpc simulate --resume OUT` from its last
completed round, to the same final model as a run that was never interrupted."""

import json
import os
from pathlib import Path

import pytest
import torch
from medmpc_cli import medmpc

from medmpc.mpc.launch import PartyError
from medmpc.protocols.plan import Plan
from medmpc.protocols.run_state import STATE_FILE, ResumeError, saved_plan
from medmpc.protocols.simulate import simulate
from medmpc.training.checkpoint import Checkpoint

pytestmark = pytest.mark.slow

HOOKS = Path(__file__).parent / "party_hooks"
FOUR = dict(data="synthetic:240", image_size=32, hospitals=3, rounds=4, batch_size=32, timeout_s=30)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return Checkpoint.load(out / "model.pt").state_dict


def _killed_after_round_2(plan: Plan, out: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")]))
        mp.setenv("MEDMPC_TEST_DRILLS", json.dumps({"coordinator": "kill:3"}))
        with pytest.raises(PartyError, match="coordinator"):
            simulate(plan, out, deadline_s=120)
    assert [r["round"] for r in json.loads((out / "report.json").read_text())["rounds"]] == [1, 2]


def test_a_resumed_plaintext_run_ends_with_the_uninterrupted_runs_weights(tmp_path):
    plan = Plan(**FOUR, secure=False)
    whole = simulate(plan, tmp_path / "whole")
    _killed_after_round_2(plan, tmp_path / "resumed")
    at_round_2 = _weights(tmp_path / "resumed")
    # the CLI, as a user runs it: the plan comes from the saved state
    medmpc("simulate", "--resume", tmp_path / "resumed", timeout=300)
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((tmp_path / "resumed" / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3, 4]
    assert report["resumed"] == [{"after_round": 2}]
    assert report["validation"] == whole["validation"]
    # control: the comparison tells runs apart (round 2's weights are not round 4's)
    assert not all(torch.equal(a[k], at_round_2[k]) for k in a)


def test_a_resumed_secure_run_with_dp_keeps_every_hospitals_budget(tmp_path):
    """Secure aggregation and DP-SGD: the statistics are not released again, and each hospital's
    accountant continues from what it spent (a fresh one would end rounds 3 and 4 at the
    epsilons of rounds 1 and 2)."""
    plan = Plan(**FOUR, model="cnn_gn", dp_epsilon=50.0)
    whole = simulate(plan, tmp_path / "whole")
    out = tmp_path / "resumed"
    _killed_after_round_2(plan, out)
    report = simulate(saved_plan(out), out, resume=True)
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3, 4]
    released, again = ({k: v for k, v in r["aggregated_statistics"].items() if k != "traffic"} for r in (whole, report))
    assert released == again
    for r in (2, 3):  # rounds 3 and 4: the resumed run's
        spent, planned = report["rounds"][r]["privacy"], whole["rounds"][r]["privacy"]
        assert {h: p["steps"] for h, p in spent.items()} == {h: p["steps"] for h, p in planned.items()}
        assert {h: p["epsilon"] for h, p in spent.items()} == pytest.approx(
            {h: p["epsilon"] for h, p in planned.items()}
        )
    assert (
        report["rounds"][2]["privacy"]["hospital0"]["epsilon"] > report["rounds"][1]["privacy"]["hospital0"]["epsilon"]
    )


def test_resume_refuses_another_plan_and_a_missing_state(tmp_path):
    plan = Plan(**{**FOUR, "rounds": 1}, secure=False)
    with pytest.raises(ResumeError, match="nothing to resume"):
        saved_plan(tmp_path / "none")
    simulate(plan, tmp_path / "done")
    assert (tmp_path / "done" / STATE_FILE).exists()
    with pytest.raises(PartyError, match="already completed all 1 rounds"):
        simulate(plan, tmp_path / "done", resume=True)
    other = Plan(**{**FOUR, "rounds": 2, "lr": 0.5}, secure=False)
    with pytest.raises(PartyError, match=r"another plan \(lr: saved 0.002, now 0.5; rounds: saved 1, now 2\)"):
        simulate(other, tmp_path / "done", resume=True)
    flags = medmpc("simulate", "--resume", tmp_path / "done", "--rounds", "3", check=False)
    assert flags.returncode == 2 and "drop --rounds" in flags.stderr
