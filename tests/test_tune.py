"""``medmpc tune``: an Optuna study over the recipe, stored in SQLite, that resumes."""

import json

import optuna
import pytest
from medmpc_cli import medmpc

from medmpc.cli.tune import STUDY, _check_same_study, _fixed, tune
from medmpc.protocols.plan import Plan

TINY = ["--data", "synthetic:120", "--image-size", 32, "--rounds", 1, "--model", "cnn"]


def _study(out):
    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out / 'study.db'}")


@pytest.mark.slow
def test_a_centralised_study_runs_end_to_end_and_resumes_where_it_stopped(tmp_path):
    out = tmp_path / "study"
    medmpc("tune", *TINY, "--trials", 2, "--out", out, timeout=300)
    first = json.loads((out / "study.json").read_text())
    assert [t["state"] for t in first["trials"]] == ["COMPLETE", "COMPLETE"]
    assert first["best"]["mcc"] == max(t["mcc"] for t in first["trials"])
    assert first["fixed"]["image_size"] == 32 and set(first["best"]["params"]) == {
        "lr",
        "weight_decay",
        "augment",
        "batch_size",
        "mixup",
    }
    for t in first["trials"]:  # each trial's own run, its recipe in its report
        report = json.loads((out / t["folder"] / "report.json").read_text())
        assert report["validation"]["mcc"] == pytest.approx(t["mcc"])
        assert report["config"]["lr"] == pytest.approx(t["params"]["lr"])
    assert (out / "trials.png").read_bytes()[:4] == b"\x89PNG"

    # a process that died mid-trial leaves it running in the study: the next run fails it and
    # does not count it
    _study(out).ask()
    medmpc("tune", *TINY, "--trials", 3, "--out", out, timeout=300)
    again = json.loads((out / "study.json").read_text())
    assert [t["state"] for t in again["trials"]] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    assert again["interrupted"] == [2]
    assert again["trials"][:2] == first["trials"]  # resumed, not restarted
    assert again["trials"][3]["params"] != first["trials"][0]["params"]  # a resumed sampler draws afresh
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0000", "0001", "0003"]
    # trials of another set-up would not compare: refused, naming what changed
    refused = medmpc("tune", *TINY[:2], "--image-size", 48, *TINY[4:], "--trials", 4, "--out", out, check=False)
    assert refused.returncode != 0 and "image_size 32 -> 48" in refused.stderr
    assert len(_study(out).trials) == 4


@pytest.mark.slow
def test_a_federated_trial_is_a_secure_simulation_scored_by_its_best_round(tmp_path):
    plan = Plan(data="synthetic:150", image_size=32, hospitals=2, rounds=2, timeout_s=60)
    summary = tune(plan, tmp_path, mode="federated", trials=1, log=lambda line: None)
    trial = summary["trials"][0]
    report = json.loads((tmp_path / trial["folder"] / "report.json").read_text())
    assert report["mode"] == "secure" and len(report["rounds"]) == 2
    assert trial["mcc"] == max(r["validation"]["mcc"] for r in report["rounds"])
    assert report["plan"]["lr"] == pytest.approx(trial["params"]["lr"])


def test_a_study_refuses_a_bad_mode_or_size(tmp_path):
    with pytest.raises(ValueError, match="unknown tuning mode 'grid'; choose one of centralised, federated"):
        tune(Plan(), tmp_path, mode="grid", trials=1)
    with pytest.raises(ValueError, match="at least one trial"):
        tune(Plan(), tmp_path, mode="centralised", trials=0)
    assert not (tmp_path / "study.db").exists()


def test_a_study_begun_before_precision_was_held_fixed_resumes_as_the_fp32_it_ran(tmp_path):
    study = optuna.create_study(direction="maximize")
    older = _fixed(Plan(), "centralised")
    del older["precision"]
    study.set_user_attr("fixed", older)
    _check_same_study(study, _fixed(Plan(), "centralised"), tmp_path)  # resumes
    with pytest.raises(ValueError, match="other fixed settings \\(precision 'fp32' -> 'bf16'\\)"):
        _check_same_study(study, _fixed(Plan(precision="bf16"), "centralised"), tmp_path)
