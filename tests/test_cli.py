"""The medmpc command end to end, as a user runs it (real processes, real files)."""

import json
import socket
import time
from pathlib import Path

import pytest
import torch
from medmpc_cli import medmpc, medmpc_each

from medmpc.training.checkpoint import Checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train")
    medmpc("train", "--data", "synthetic:240", "--model", "cnn", "--image-size", "32", "--epochs", "2", "--out", out)
    return out


def test_train_writes_checkpoint_report_and_plots(trained):
    report = json.loads((trained / "report.json").read_text())
    assert report["dataset"]["synthetic"] is True and report["dataset"]["source"] == "synthetic"
    assert len(report["history"]) == 2 and 0 <= report["validation"]["accuracy"] <= 1
    assert report["split"]["train"] + report["split"]["val"] == 240
    for png in ("learning_curves.png", "confusion_matrix.png"):
        assert (trained / png).read_bytes()[:4] == b"\x89PNG"
    ckpt = Checkpoint.load(trained / "model.pt")
    assert ckpt.model_name == "cnn" and ckpt.classes == ("normal", "bacterial", "viral")
    assert ckpt.preprocessing.image_size == 32 and 0 < ckpt.preprocessing.std < 1
    assert ckpt.build()(torch.zeros(1, 1, 32, 32)).shape == (1, 3)
    assert not list(trained.glob("*.tmp"))


def test_evaluate_json_on_real_full_resolution_val(trained, chest_xray, tmp_path):
    proc = medmpc(
        "evaluate", "--model", trained / "model.pt", "--data", chest_xray / "val", "--json", "--out", tmp_path
    )
    m = json.loads(proc.stdout)  # stdout holds exactly one JSON object
    for key in (
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "mcc",
        "roc_auc",
        "pneumonia_sensitivity",
        "pneumonia_specificity",
        "pneumonia_roc_auc",
        "confusion_matrix",
        "n_images",
    ):
        assert key in m, key
    assert m["n_images"] == 16 and sum(map(sum, m["confusion_matrix"])) == 16
    assert (tmp_path / "confusion_matrix.png").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["n_images"] == 16


def test_evaluate_text_on_any_folder_in_the_layout(trained, small_xray_folder):
    proc = medmpc("evaluate", "--model", trained / "model.pt", "--data", small_xray_folder)
    assert "accuracy" in proc.stdout and "pneumonia vs normal" in proc.stdout


def test_evaluate_on_synthetic_is_labelled(trained):
    proc = medmpc("evaluate", "--model", trained / "model.pt", "--data", "synthetic:60")
    assert "[synthetic data]" in proc.stdout


def test_errors_are_one_clear_line(trained, tmp_path, small_xray_folder):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"junk")
    proc = medmpc("evaluate", "--model", bad, "--data", "synthetic:10", check=False)
    assert proc.returncode == 2 and "is not a medmpc checkpoint: PyTorch cannot read it" in proc.stderr
    (small_xray_folder / "NORMAL" / "scan.jpeg").write_bytes(b"\xff\xd8 truncated")
    proc = medmpc("evaluate", "--model", trained / "model.pt", "--data", small_xray_folder, check=False)
    assert proc.returncode == 2 and "scan.jpeg" in proc.stderr and "Traceback" not in proc.stderr
    proc = medmpc("evaluate", "--model", trained / "model.pt", "--data", small_xray_folder, "--skip-unreadable")
    assert "skipped 1 unreadable file" in proc.stdout


def test_a_used_out_folder_is_refused_unless_overwritten(trained, tmp_path):
    """Reusing --out mixed two runs' files (an old plot beside a new report; `evaluate --out` into a
    training folder replaced its confusion matrix)."""
    before = {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()}
    stranger = tmp_path / "home"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("not medmpc's")
    evaluate = ("evaluate", "--model", trained / "model.pt", "--data", "synthetic:30", "--out")
    used, own_input, foreign = medmpc_each(
        (*evaluate, trained), (*evaluate, trained, "--overwrite"), (*evaluate, stranger, "--overwrite")
    )
    assert used.returncode == 2 and "is not empty" in used.stderr and "--overwrite" in used.stderr
    assert own_input.returncode == 2 and "would delete" in own_input.stderr and "model.pt" in own_input.stderr
    assert {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()} == before  # untouched
    assert foreign.returncode == 2 and "no medmpc run wrote" in foreign.stderr
    assert (stranger / "notes.txt").exists()

    # an earlier evaluation's folder is replaced whole: nothing of it stays beside the new files
    earlier = tmp_path / "earlier"
    medmpc("evaluate", "--model", trained / "model.pt", "--data", "synthetic:30", "--out", earlier)
    (earlier / "old_plot.png").write_bytes(b"from another run")
    medmpc("evaluate", "--model", trained / "model.pt", "--data", "synthetic:30", "--out", earlier, "--overwrite")
    assert sorted(p.name for p in earlier.iterdir()) == ["confusion_matrix.png", "metrics.json"]


def test_partition_prints_per_hospital_counts():
    proc = medmpc("partition", "--data", "synthetic:300", "--hospitals", "3", "--partition", "dirichlet:0.5")
    lines = proc.stdout.strip().splitlines()
    assert "[synthetic data]" in lines[0]
    assert lines[1].split() == ["hospital", "normal", "bacterial", "viral", "total"]
    assert sum(int(line.split()[-1]) for line in lines[2:5]) == 300


@pytest.mark.slow
def test_selfcheck_runs_real_parties():
    proc = medmpc("selfcheck", "--parties", "3")
    assert "match plaintext" in proc.stdout


def test_bad_arguments_fail_at_once_in_one_line(tmp_path):
    """Each of these failed late (inside the party processes, after ~25 s, with tracebacks) or
    with a misleading message."""
    out = tmp_path / "out"
    config = tmp_path / "run.toml"
    config.write_text('rounds = "five"\n')
    start = time.monotonic()
    vgg, typed, alpha, size, params = medmpc_each(
        ("simulate", "--model", "vgg", "--out", out),
        ("simulate", "--config", config, "--out", out),
        ("simulate", "--partition", "dirichlet:-1", "--out", out),
        ("train", "--image-size", "0", "--out", out),
        ("bench", "secure-aggregation", "--params", "0"),
    )
    assert time.monotonic() - start < 60  # all of them: no party was started
    assert vgg.returncode == 2 and "unknown model 'vgg'" in vgg.stderr and "Traceback" not in vgg.stderr
    assert not out.exists()  # nothing half-made is left
    assert typed.returncode == 2 and "rounds must be a whole number" in typed.stderr and str(config) in typed.stderr
    assert alpha.returncode == 2 and "positive alpha" in alpha.stderr
    assert size.returncode == 2 and "--image-size: must be at least 16, got 0" in size.stderr
    assert params.returncode == 2 and "--params: must be at least 1" in params.stderr


def test_a_taken_service_port_fails_at_once_naming_it(trained, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("t0k3n\n")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        start = time.monotonic()
        proc = medmpc(
            "serve", "--model", trained / "model.pt", "--tokens-file", tokens, "--ports", f"{port},0,0", check=False
        )
        assert proc.returncode == 2 and f"model-owner's HTTP address 127.0.0.1:{port} is taken" in proc.stderr
        proc = medmpc(
            "serve", "--model", trained / "model.pt", "--tokens-file", tokens, "--parties",
            f"127.0.0.1:{port},127.0.0.1:0,127.0.0.1:0", "--ports", "0,0,0", check=False,
        )  # fmt: skip
        assert proc.returncode == 2 and f"MPC channel address 127.0.0.1:{port} is taken" in proc.stderr
        assert time.monotonic() - start < 30


def test_checkpoint_errors_say_what_to_do(trained, tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    run_folder, empty_folder, module, no_data = medmpc_each(
        ("evaluate", "--model", trained, "--data", "synthetic:30", "--json"),
        ("evaluate", "--model", tmp_path, "--data", "synthetic:30"),
        ("evaluate", "--model", tmp_path / "module.pt", "--data", "synthetic:30"),
        ("evaluate", "--model", trained),
    )
    # a run's folder is taken for its model.pt (it said "not found" for a folder that exists)
    assert json.loads(run_folder.stdout)["n_images"] == 30
    assert empty_folder.returncode == 2 and "folder without a model.pt" in empty_folder.stderr
    # a pickled module: no advice to load it unsafely
    assert module.returncode == 2 and "holds Python objects" in module.stderr and "weights_only" not in module.stderr
    # no silent evaluation on synthetic images
    assert no_data.returncode == 2 and "--data is needed" in no_data.stderr


def test_help_shows_defaults_and_train_defaults_to_simulates_training():
    from medmpc.cli.main import build_parser
    from medmpc.protocols.plan import Plan

    train_help, simulate_help, version = medmpc_each(("train", "--help"), ("simulate", "--help"), ("--version",))
    assert "(default: 64)" in train_help.stdout
    assert "(default: 5)" in simulate_help.stdout  # the plan's rounds
    assert version.stdout.startswith("medmpc ")
    train = build_parser().parse_args(["train", "--out", "x"])
    plan = Plan()
    assert (train.image_size, train.model, train.batch_size, train.lr, train.val_fraction, train.seed) == (
        plan.image_size, plan.model, plan.batch_size, plan.lr, plan.val_fraction, plan.seed
    )  # fmt: skip
    assert train.epochs == plan.rounds * plan.local_epochs and train.data == plan.data


def test_the_example_config_is_a_valid_plan_of_the_defaults():
    from medmpc.protocols.plan import Plan, load_plan

    example = Path(__file__).parent.parent / "examples" / "run.toml"
    assert load_plan(example, {}) == Plan(min_hospitals=3)  # it shows the defaults, spelled out
    assert load_plan(example, {"rounds": 7}).rounds == 7  # flags override it


def test_predict_runs_locally_without_the_service(trained, small_xray_folder):
    images = sorted(small_xray_folder.rglob("*.jpeg"))[:3]
    proc = medmpc("predict", *images, "--model", trained, "--json")
    answer = json.loads(proc.stdout)
    ckpt = Checkpoint.load(trained / "model.pt")
    with torch.no_grad():
        expected = ckpt.build()(ckpt.preprocessing.read(images)).argmax(1)
    assert [p["prediction"] for p in answer["predictions"]] == [ckpt.classes[int(i)] for i in expected]
    assert answer["model_trained_on_synthetic_data"] is True
    assert "synthetic images only" in medmpc("predict", images[0], "--model", trained).stdout
    proc = medmpc("predict", images[0], "--model", trained, "--servers", "http://127.0.0.1:1,x", check=False)
    assert proc.returncode == 2 and "not both" in proc.stderr
