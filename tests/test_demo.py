"""`make demo`'s command, small: secure federated training, the encrypted service, the clinic client."""

import json

from medmpc_cli import medmpc

from medmpc.training.checkpoint import Checkpoint


def test_demo_trains_securely_serves_and_predicts_like_the_plaintext_model(tmp_path):
    out = tmp_path / "demo"
    small = ("--rounds", 2, "--local-epochs", 1, "--images", 3, "--synthetic", 240, "--image-size", 32)
    text = medmpc("demo", "--out", out, *small, timeout=600).stdout
    summary = json.loads((out / "summary.json").read_text())

    report = json.loads((out / "federated" / "report.json").read_text())
    assert report["mode"] == "secure" and "TLS" in report["transport"]
    assert [r["contributors"] for r in report["rounds"]] == [["hospital0", "hospital1", "hospital2"]] * 2
    assert Checkpoint.load(summary["files"]["checkpoint"]).preprocessing.image_size == 32
    assert summary["files"]["plots"] and all(p.endswith(".png") for p in summary["files"]["plots"])

    preds = summary["encrypted_predictions"]
    assert len(preds) == 3 and summary["same_predictions_as_plaintext"]
    assert all(p["prediction"] == p["plaintext_prediction"] for p in preds)
    assert summary["largest_logit_difference_from_plaintext"] < 0.05
    for p in preds:  # the held-out images are files a person can open, named by their true class
        assert p["truth"] in p["image"] and abs(sum(p["probabilities"].values()) - 1) < 1e-4

    # what a person reads: what happened, on what data, and where the files are
    assert "synthetic" in text and "random-looking share" in text and str(out / "summary.json") in text
    assert all(p["prediction"] in text for p in preds)
    assert "HTTP Request" not in text  # the HTTP client's per-request lines are not for a person

    again = medmpc("demo", "--out", out, *small, check=False)
    assert again.returncode == 2 and "is not empty" in again.stderr
