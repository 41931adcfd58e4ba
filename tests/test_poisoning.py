"""Poisoning hospitals (tests/party_hooks/drills.py: 100 times its update, or -100 times), in
real processes: without the norm check a boosted update is aggregated and breaks the global model,
and the coordinator stops with a clear error and the last good model; with it, the aggregators
reject the attackers inside MPC and the run ends as it would have without them."""

import json
import os
from pathlib import Path

import pytest

from medmpc.mpc.launch import PartyError
from medmpc.protocols.plan import Plan
from medmpc.protocols.simulate import simulate
from medmpc.training.checkpoint import Checkpoint

pytestmark = pytest.mark.slow

HOOKS = Path(__file__).parent / "party_hooks"
ATTACKS = {"hospital1": "boost:2", "hospital3": "flip:3"}
ABSENT = {"hospital1": "nan:2", "hospital3": "nan:3"}  # the same hospitals send no update instead


def _drilled(plan: Plan, out: Path, drills: dict[str, str], *, deadline_s: float = 240) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")]))
        mp.setenv("MEDMPC_TEST_DRILLS", json.dumps(drills))
        return simulate(plan, out, deadline_s=deadline_s)


def test_a_boosted_update_stops_the_run_with_the_last_good_model(tmp_path):
    plan = Plan(data="synthetic:240", image_size=32, hospitals=3, rounds=3, batch_size=32, timeout_s=30)
    with pytest.raises(PartyError, match="coordinator.*round2: the revealed average makes the global model's"):
        _drilled(plan, tmp_path, {"hospital1": "boost:2"}, deadline_s=120)
    report = json.loads((tmp_path / "report.json").read_text())
    # round 2 was revealed (its record says by whom) but never evaluated or kept
    assert [r["round"] for r in report["rounds"]] == [1, 2] and "round2" in report["error"]
    assert "validation" not in report["rounds"][1] and len(report["rounds"][1]["contributors"]) == 3
    assert Checkpoint.load(tmp_path / "model.pt").info["round"] == 1


@pytest.fixture(scope="module")
def real_plan(chest_xray: Path) -> dict:
    """Five hospitals on the real training folder at 32 px; rounds 2 and 3 are attacked."""
    return dict(
        data=str(chest_xray / "train"), image_size=32, hospitals=5, rounds=3, batch_size=32, lr=1e-3, timeout_s=60
    )


def test_the_norm_check_rejects_boosted_and_flipped_updates_and_keeps_the_model(tmp_path, real_plan):
    """Round 1 under the plan's bound, each later round under 3 times the previous average update's
    norm: the attackers (100x in round 2, -100x in round 3) are left out of their rounds and the
    honest hospitals never, and the final accuracy is within 2 points of the run without the
    attackers: the one where the same hospitals send no update in those rounds (this small model's
    accuracy moves by 2 to 3 points from round to round, so a run whose rounds average other
    hospitals is no yardstick for 2 points). The control: the same attacks without the check
    break the model (NaN outputs stop the run) or move accuracy by more."""
    checked = dict(real_plan, update_norm_bound=50.0, update_norm_factor=3.0)
    clean = _drilled(Plan(**checked), tmp_path / "clean", ABSENT)
    attacked = _drilled(Plan(**checked), tmp_path / "attacked", ATTACKS)
    assert [r["contributors"] for r in clean["rounds"]] == [r["contributors"] for r in attacked["rounds"]]
    r1, r2, r3 = attacked["rounds"]
    assert r1["norm_bound"] == 50.0 and "excluded" not in r1
    for before, r in ((r1, r2), (r2, r3)):
        assert r["norm_bound"] == pytest.approx(3 * before["average_norm"])
    for r, attacker in ((r2, "hospital1"), (r3, "hospital3")):
        assert list(r["excluded"]) == [attacker] and attacker not in r["contributors"]
        assert "rejected: update norm above the bound" in r["excluded"][attacker]
        assert attacked["hospitals"][attacker]["excluded"] == {str(r["round"]): r["excluded"][attacker]}
    gap = abs(attacked["validation"]["accuracy"] - clean["validation"]["accuracy"])
    assert gap <= 0.02, (attacked["validation"]["accuracy"], clean["validation"]["accuracy"])

    unchecked = Plan(**real_plan)  # control
    try:
        report = _drilled(unchecked, tmp_path / "unchecked", ATTACKS)
    except PartyError as err:
        assert "revealed average makes the global model's outputs NaN/Inf" in str(err)
    else:
        assert abs(report["validation"]["accuracy"] - clean["validation"]["accuracy"]) > 0.02
