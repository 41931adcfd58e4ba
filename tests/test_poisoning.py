"""A poisoning hospital, before any norm check exists (issue 20): a 100x update passes the
encoding guard, is aggregated, and its average breaks the global model. The coordinator must
stop with a clear error naming the round, keep the previous round's model, and reveal nothing
further; before, it died with a traceback inside the evaluation."""

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


def test_a_boosted_update_stops_the_run_with_the_last_good_model(tmp_path):
    plan = Plan(data="synthetic:240", image_size=32, hospitals=3, rounds=3, batch_size=32, timeout_s=30)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")]))
        mp.setenv("MEDMPC_TEST_DRILLS", json.dumps({"hospital1": "boost:2"}))
        with pytest.raises(PartyError, match="coordinator.*round2: the revealed average makes the global model's"):
            simulate(plan, tmp_path, deadline_s=120)
    report = json.loads((tmp_path / "report.json").read_text())
    # round 2 was revealed (its record says by whom) but never evaluated or kept
    assert [r["round"] for r in report["rounds"]] == [1, 2] and "round2" in report["error"]
    assert "validation" not in report["rounds"][1] and len(report["rounds"][1]["contributors"]) == 3
    assert Checkpoint.load(tmp_path / "model.pt").info["round"] == 1
