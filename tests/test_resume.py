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
from medmpc.protocols.run_state import STATE_FILE, CoordinatorState, ResumeError, saved_plan
from medmpc.protocols.simulate import simulate
from medmpc.training.accountant import PrivacyAccountant
from medmpc.training.checkpoint import Checkpoint

pytestmark = pytest.mark.slow

HOOKS = Path(__file__).parent / "party_hooks"
FOUR = dict(data="synthetic:240", image_size=32, hospitals=3, rounds=4, batch_size=32, timeout_s=30)


def _weights(out: Path) -> torch.Tensor:
    """The global model after the run's last completed round (model.pt holds the best round's)."""
    return torch.load(out / STATE_FILE, weights_only=True)["global_vector"]


def _killed_after_round_2(plan: Plan, out: Path, drill: str = "kill:3") -> None:
    """The coordinator dies as round 3 begins, or (``kill_revealed:2``) just after round 2's
    average is revealed, before round 2 is evaluated and written to report.json."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")]))
        mp.setenv("MEDMPC_TEST_DRILLS", json.dumps({"coordinator": drill}))
        with pytest.raises(PartyError, match="coordinator"):
            simulate(plan, out, deadline_s=120)
    written = [1, 2] if drill == "kill:3" else [1]
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == written
    assert report["interrupted"]["after_round"] == len(written) and "coordinator" in report["interrupted"]["why"]


def test_a_resumed_plaintext_run_ends_with_the_uninterrupted_runs_weights(tmp_path):
    """Killed between round 2's reveal and its evaluation: the resumed run evaluates round 2 and
    goes on with round 3 (round 2 is never revealed again)."""
    plan = Plan(**FOUR, secure=False)
    whole = simulate(plan, tmp_path / "whole")
    _killed_after_round_2(plan, tmp_path / "resumed", "kill_revealed:2")
    at_round_2 = _weights(tmp_path / "resumed")
    # the CLI, as a user runs it: the plan comes from the saved state
    medmpc("simulate", "--resume", tmp_path / "resumed", timeout=300)
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    assert torch.equal(a, b)
    report = json.loads((tmp_path / "resumed" / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3, 4]
    assert report["resumed"] == [{"after_round": 2}] and "interrupted" not in report  # whole again
    assert report["validation"] == whole["validation"]
    assert report["rounds"][1]["validation"] == whole["rounds"][1]["validation"]  # evaluated on resumption
    # control: the comparison tells runs apart (round 2's weights are not round 4's)
    assert not torch.equal(a, at_round_2)
    selected = report["selected"]["round"]
    assert Checkpoint.load(tmp_path / "resumed").info["round"] == selected == whole["selected"]["round"]


def test_a_resumed_secure_run_with_dp_keeps_every_hospitals_budget(tmp_path):
    """Secure aggregation, DP-SGD and noisy statistics: the statistics are not released again
    (fresh noise would change them), and each hospital's accountant continues from what it spent:
    rounds 3 and 4 end at the epsilon of 3 and 4 rounds (a fresh accountant would give 1 and 2)."""
    plan = Plan(**FOUR, model="cnn_gn", dp_epsilon=50.0, stats_noise=2.0)
    out = tmp_path / "resumed"
    _killed_after_round_2(plan, out)
    before = json.loads((out / "report.json").read_text())["aggregated_statistics"]
    report = simulate(saved_plan(out), out, resume=True)
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3, 4]
    assert report["aggregated_statistics"] == before
    for r in (1, 2, 3, 4):
        for spent in report["rounds"][r - 1]["privacy"].values():
            per_round = report["rounds"][0]["privacy"]["hospital0"]["steps"] - statistics_steps(plan)
            accountant = PrivacyAccountant(plan.stats_release())
            accountant.step(spent["noise_multiplier"], spent["sample_rate"], r * per_round)
            assert spent["steps"] == accountant.steps
            assert spent["epsilon"] == pytest.approx(accountant.epsilon(plan.dp_delta))


def statistics_steps(plan: Plan) -> int:
    return sum(n for _, _, n in plan.stats_release())


def test_resume_refuses_another_plan_and_a_missing_state(tmp_path):
    plan = Plan(**{**FOUR, "rounds": 1}, secure=False)
    with pytest.raises(ResumeError, match="nothing to resume"):
        saved_plan(tmp_path / "none")
    simulate(plan, tmp_path / "done")
    assert (tmp_path / "done" / STATE_FILE).exists()
    done = medmpc("simulate", "--resume", tmp_path / "done", check=False)  # the coordinator refuses, named
    assert done.returncode == 2 and "coordinator: " in done.stderr and "already completed all 1 rounds" in done.stderr
    other = Plan(**{**FOUR, "rounds": 2, "lr": 0.5}, secure=False)
    with pytest.raises(ResumeError, match=r"another plan \(lr: saved 0.002, now 0.5; rounds: saved 1, now 2\)"):
        CoordinatorState.load(tmp_path / "done", other)
    flags = medmpc("simulate", "--resume", tmp_path / "done", "--rounds", "3", check=False)
    assert flags.returncode == 2 and "drop --rounds" in flags.stderr
