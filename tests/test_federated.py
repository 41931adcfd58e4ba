"""Federated training and secure aggregation as real processes on loopback."""

import json
import os
import time
from pathlib import Path

import pytest
import torch
from medmpc_cli import medmpc

from medmpc.models import build_model
from medmpc.models.vector import to_vector
from medmpc.mpc.launch import PartyError
from medmpc.protocols.bench import Bench, run_bench
from medmpc.protocols.plan import Plan, load_plan
from medmpc.protocols.simulate import simulate
from medmpc.training.checkpoint import Checkpoint

pytestmark = pytest.mark.slow

HOOKS = Path(__file__).parent / "party_hooks"
TINY = dict(data="synthetic:240", image_size=32, hospitals=3, rounds=1, batch_size=32, timeout_s=60)


@pytest.mark.parametrize("aggregators", [2, 3])
def test_secure_aggregate_equals_plaintext_fedavg(tmp_path, aggregators):
    """Same seed, same local training: the revealed average differs from plain FedAvg only
    by fixed-point rounding (2^-16 per value, plus CrypTen's truncation).

    The normalisation statistics are aggregated securely too, so the two runs normalise with
    means that differ in the 8th digit. Adam moves a weight by about lr whatever its gradient's
    size, so that can flip a near-zero gradient's step: a small lr keeps such flips (at most
    2 lr per step) below the bound."""
    tiny = dict(TINY, lr=1e-4)
    secure = simulate(Plan(**tiny, aggregators=aggregators), tmp_path / "secure")
    plain = simulate(Plan(**tiny, secure=False), tmp_path / "plain")
    a = Checkpoint.load(tmp_path / "secure" / "model.pt").state_dict
    b = Checkpoint.load(tmp_path / "plain" / "model.pt").state_dict
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    moved = max(float((a[k].float() - 0).abs().max()) for k in a)
    assert 0 < worst < 1e-3 and moved > 0.01
    # normalisation statistics were aggregated too, and agree
    s, p = secure["aggregated_statistics"], plain["aggregated_statistics"]
    assert s["class_counts"] == p["class_counts"]
    assert s["n_images"] == p["n_images"] == sum(s["class_counts"].values()) > 150
    assert abs(s["pixel_mean"] - p["pixel_mean"]) < 1e-4


def _drilled(plan: Plan, out, drills: dict[str, str], **kw) -> dict:
    """``simulate`` with failure drills injected into the role processes (tests/party_hooks/drills.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")]))
        mp.setenv("MEDMPC_TEST_DRILLS", json.dumps(drills))
        return simulate(plan, out, **kw)


def test_random_updates_average_within_fixed_point_error(tmp_path):
    report = run_bench(Plan(hospitals=4, aggregators=3, timeout_s=60), Bench(params=5000, repeat=1), tmp_path)
    assert 0 < report["max_abs_err"] < 4 * 2**-16
    # one full share each plus seeds; the heavy traffic is spread over the aggregators
    sent = report["bytes_per_party"]
    assert all(sent[f"hospital{i}"] >= 8 * 5000 for i in range(4))
    assert sent["coordinator"] < 2000


@pytest.mark.parametrize("victim", ["aggregator0", "aggregator1"])  # the collector, a seed holder
def test_killed_aggregator_ends_the_round_with_a_clear_error(tmp_path, victim):
    plan = Plan(**TINY, aggregators=2)
    start = time.monotonic()
    with pytest.raises(PartyError, match=victim):
        _drilled(plan, tmp_path, {victim: "kill:1"}, deadline_s=120)
    assert time.monotonic() - start < plan.timeout_s + 30
    assert not (tmp_path / "model.pt").exists()


def test_a_hospital_dying_halfway_through_its_upload_ends_the_round_naming_it(tmp_path):
    """The collector has added part of the hospital's masked update when the stream breaks:
    the round fails naming the hospital, and no model comes out of it."""
    plan = Plan(**TINY, aggregators=2)
    start = time.monotonic()
    with pytest.raises(PartyError, match="hospital1"):
        _drilled(plan, tmp_path, {"hospital1": "crash_sending:1"}, deadline_s=120)
    assert time.monotonic() - start < plan.timeout_s + 30
    assert not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize("drill,why", [("nan", "NaN/Inf"), ("overflow", "overflow")])
def test_bad_update_aborts_the_round_naming_the_hospital(tmp_path, drill, why):
    with pytest.raises(PartyError, match=f"hospital1.*{why}"):
        _drilled(Plan(**TINY, aggregators=2), tmp_path, {"hospital1": f"{drill}:1"})
    report = json.loads((tmp_path / "report.json").read_text())
    assert "hospital1" in report["error"] and "nothing revealed" in report["error"]
    assert report["rounds"] == [] and not (tmp_path / "model.pt").exists()


def test_config_file_with_cli_overrides(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('hospitals = 4\nrounds = 7\npartition = "dirichlet:0.5"\n')
    plan = load_plan(cfg, {"rounds": 2, "model": None})
    assert (plan.hospitals, plan.rounds, plan.partition, plan.model) == (4, 2, "dirichlet:0.5", "cnn")
    cfg.write_text("hospitalz = 4\n")
    with pytest.raises(ValueError, match="hospitalz"):
        load_plan(cfg, {})
    with pytest.raises(ValueError, match="at least 2 aggregation parties"):
        Plan(aggregators=1)


def test_simulate_cli_writes_report_model_and_plots(tmp_path):
    out = tmp_path / "run"
    proc = medmpc(
        "simulate",
        "--data",
        "synthetic:240",
        "--image-size",
        32,
        "--hospitals",
        2,
        "--aggregators",
        2,
        "--rounds",
        2,
        "--augment",
        "shift",
        "--mixup",
        0.2,
        "--lr-decay",
        "cosine",
        "--precision",
        "bf16",
        "--shift-data",
        "synthetic:30",
        "--out",
        out,
        "--timeout",
        60,
    )
    # the first line says what the 10-40 s of start-up are
    assert proc.stdout.splitlines()[1].startswith("starting 5 processes (coordinator, hospital0, hospital1, aggr")
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "secure" and len(report["rounds"]) == 2
    r = report["rounds"][1]
    for key in ("local_training_s", "sharing_s", "aggregation_s", "reveal_s"):
        assert r[key] >= 0
    n = to_vector(build_model("cnn", 3)).numel()
    # a hospital sends one int64 share of its update (plus small headers); the coordinator
    # sends the float32 global model to both hospitals and never receives an update
    assert 8 * n <= r["traffic"]["hospital0"]["bytes_sent"] < 8 * n + 10_000
    assert 2 * 4 * n <= r["traffic"]["coordinator"]["bytes_sent"] < 2 * 4 * n + 10_000
    assert r["traffic"]["coordinator"]["bytes_received"] >= 2 * 8 * n  # the aggregators' shares of the average
    assert set(r["traffic"]) == {"coordinator", "hospital0", "hospital1", "aggregator0", "aggregator1"}
    # the recipe travels in the plan; model.pt is the round with the best validation MCC
    assert (report["plan"]["augment"], report["plan"]["mixup"], report["plan"]["lr_decay"]) == ("shift", 0.2, "cosine")
    mccs = [r["validation"]["mcc"] for r in report["rounds"]]
    chosen = report["selected"]["round"]
    assert chosen == 1 + mccs.index(max(mccs)) and report["validation"] == report["rounds"][chosen - 1]["validation"]
    info = Checkpoint.load(out).info
    assert info["round"] == chosen and (info["recipe"]["augment"], info["recipe"]["lr_decay"]) == ("shift", "cosine")
    assert info["recipe"]["precision"] == "bf16"
    assert report["shift_check"]["n_images"] == 30
    for png in ("learning_curves.png", "communication.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    ev = medmpc("evaluate", "--model", out / "model.pt", "--data", "synthetic:60", "--json", timeout=120)
    assert json.loads(ev.stdout)["n_images"] == 60


def test_bench_cli_json(tmp_path):
    proc = medmpc(
        "bench", "secure-aggregation", "--params", 20000, "--hospitals", 2, "--aggregators", 2, "--repeat", 1, "--json"
    )
    result = json.loads(proc.stdout)
    for key in ("secure_s", "plaintext_s", "ratio", "bytes_per_party", "max_abs_err"):
        assert key in result
    assert result["ratio"] == pytest.approx(result["secure_s"] / result["plaintext_s"])
    assert result["max_abs_err"] < 2**-15 and torch.isfinite(torch.tensor(result["secure_s"]))
