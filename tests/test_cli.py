"""The medmpc command end to end, as a user runs it (real processes, real files)."""

import json
from pathlib import Path

import pytest
import torch
from medmpc_cli import medmpc

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
    assert proc.returncode == 2 and "not a readable medmpc checkpoint" in proc.stderr
    (small_xray_folder / "NORMAL" / "scan.jpeg").write_bytes(b"\xff\xd8 truncated")
    proc = medmpc("evaluate", "--model", trained / "model.pt", "--data", small_xray_folder, check=False)
    assert proc.returncode == 2 and "scan.jpeg" in proc.stderr and "Traceback" not in proc.stderr
    proc = medmpc("evaluate", "--model", trained / "model.pt", "--data", small_xray_folder, "--skip-unreadable")
    assert "skipped 1 unreadable file" in proc.stdout


def test_a_used_out_folder_is_refused_unless_overwritten(trained, tmp_path):
    """Reusing --out mixed two runs' files (an old plot beside a new report; `evaluate --out` into a
    training folder replaced its confusion matrix)."""
    before = {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()}
    proc = medmpc("evaluate", "--model", trained / "model.pt", "--data", "synthetic:30", "--out", trained, check=False)
    assert proc.returncode == 2 and "is not empty" in proc.stderr and "--overwrite" in proc.stderr
    proc = medmpc(
        "evaluate",
        "--model",
        trained / "model.pt",
        "--data",
        "synthetic:30",
        "--out",
        trained,
        "--overwrite",
        check=False,
    )
    assert proc.returncode == 2 and "would delete" in proc.stderr and "model.pt" in proc.stderr
    assert {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()} == before  # untouched

    stranger = tmp_path / "home"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("not medmpc's")
    args = ("evaluate", "--model", trained / "model.pt", "--data", "synthetic:30", "--out", stranger, "--overwrite")
    proc = medmpc(*args, check=False)
    assert proc.returncode == 2 and "no medmpc run wrote" in proc.stderr
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
