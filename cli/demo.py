"""``medmpc demo``: the whole mission on built-in synthetic data, in a few minutes on a laptop.

1. Federated training: each hospital trains on its own images; its update is secret-shared
   between two aggregators over mutually authenticated TLS, and only the average of all
   hospitals' updates is revealed (``protocols.simulate``: the role processes ``simulate`` runs).
2. The trained model is served by the encrypted prediction service: model owner, compute party
   and dealer, one process each (``serving.launch``), as ``medmpc serve`` starts them.
3. A clinic client secret-shares a few held-out images, the two compute parties evaluate the
   secret-shared model on the shares, and only the client reconstructs the logits. The same
   images through the plaintext model show that encryption did not change a prediction.

Everything is written under one folder, and ``summary.json`` says where.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from PIL import Image

from medmpc.imaging.dataset import load_dataset
from medmpc.protocols.plan import Plan
from medmpc.protocols.simulate import simulate
from medmpc.serving.client import PredictionClient
from medmpc.serving.launch import LocalService
from medmpc.training.checkpoint import Checkpoint
from medmpc.training.predictions import plaintext_logits, predictions

# how far the encrypted logits may be from the plaintext model's (fixed-point rounding)
LOGIT_TOLERANCE = 0.05


def held_out_images(folder: Path, *, count: int, image_size: int, seed: int) -> tuple[list[Path], list[str]]:
    """``count`` synthetic images the hospitals never saw, as PNG files named by their class."""
    data = load_dataset(f"synthetic:{count}", image_size=image_size, split="test", seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths, truths = [], []
    for i, (image, label) in enumerate(zip(data.images, data.labels)):
        truth = data.classes[int(label)]
        path = folder / f"xray{i}_{truth}.png"
        Image.fromarray(image[0].numpy()).save(path)
        paths.append(path)
        truths.append(truth)
    return paths, truths


def run_demo(
    out: Path,
    *,
    hospitals: int = 3,
    rounds: int = 12,
    local_epochs: int = 2,
    images: int = 4,
    synthetic: int = 1200,
    image_size: int = 64,
    seed: int = 0,
    log: Any = print,
) -> dict[str, Any]:
    """Train, serve and predict; returns the summary (also written to ``out/summary.json``).

    Args:
        out: an empty or new folder for everything the demo writes.
        hospitals: hospitals in the federation (each its own process, its own third of the data).
        rounds: federated rounds; local_epochs: epochs each hospital trains per round.
        images: held-out images the clinic predicts through the encrypted service.
        synthetic: synthetic training images shared out among the hospitals.
        image_size: the model's input size in pixels.
        seed: seeds the data, the split and the model (not the cryptography, which uses the OS CSPRNG).
        log: where the progress lines go.
    """
    started = time.monotonic()
    plan = Plan(
        hospitals=hospitals,
        aggregators=2,
        rounds=rounds,
        local_epochs=local_epochs,
        data=f"synthetic:{synthetic}",
        image_size=image_size,
        seed=seed,
        min_hospitals=hospitals,
    )
    log(
        f"1/3 federated training: {hospitals} hospitals, 2 aggregators, {rounds} rounds of secure aggregation "
        f"on synthetic data (every role its own process, mutually authenticated TLS between them)"
    )
    federated = out / "federated"
    report = simulate(plan, federated)
    checkpoint = federated / "model.pt"
    trained_s = time.monotonic() - started

    paths, truths = held_out_images(out / "images", count=images, image_size=image_size, seed=seed)
    token = secrets.token_urlsafe(32)
    token_file = out / "client.token"
    token_file.touch(mode=0o600)
    token_file.write_text(token + "\n")
    log("2/3 encrypted prediction service: model owner, compute party and dealer (one process each)")
    with LocalService(checkpoint, token_file, log_dir=out / "service-logs") as service:
        served_s = time.monotonic() - started
        log(f"3/3 clinic: {images} held-out images secret-shared to {' and '.join(service.urls)}")
        with PredictionClient(service.urls, token) as client:
            encrypted_logits = client.logits(client.preprocess(paths))
    ckpt = Checkpoint.load(checkpoint)
    plain_logits = plaintext_logits(ckpt, paths)
    encrypted = predictions(paths, encrypted_logits, ckpt.classes)
    plain = predictions(paths, plain_logits, ckpt.classes)
    gap = float((encrypted_logits - plain_logits).abs().max())
    summary = {
        "data": "synthetic (built-in generator; not real X-rays)",
        "federated_training": {
            "hospitals": hospitals,
            "aggregators": 2,
            "rounds": rounds,
            "channels": report["transport"],
            "validation": {k: report["validation"][k] for k in ("n_images", "accuracy", "mcc", "pneumonia_roc_auc")},
            "seconds": round(trained_s, 1),
        },
        "encrypted_predictions": [
            {
                "image": str(e.image),
                "truth": truth,
                "prediction": e.prediction,
                "probabilities": e.probabilities,
                "plaintext_prediction": p.prediction,
            }
            for e, p, truth in zip(encrypted, plain, truths)
        ],
        "largest_logit_difference_from_plaintext": gap,
        "same_predictions_as_plaintext": all(e.prediction == p.prediction for e, p in zip(encrypted, plain)),
        "service_start_seconds": round(served_s - trained_s, 1),
        "seconds": round(time.monotonic() - started, 1),
        "files": {
            "report": str(federated / "report.json"),
            "plots": [str(p) for p in sorted(federated.glob("*.png"))],
            "checkpoint": str(checkpoint),
            "images": str(out / "images"),
            "service_logs": str(out / "service-logs"),
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if gap > LOGIT_TOLERANCE:
        raise RuntimeError(f"encrypted logits differ from the plaintext model's by {gap:.3g} (> {LOGIT_TOLERANCE})")
    return summary


def describe(summary: dict[str, Any]) -> str:
    """The summary as a person reads it."""
    fed = summary["federated_training"]
    val = fed["validation"]
    lines = [
        f"Federated training ({summary['data']}): {fed['hospitals']} hospitals, {fed['rounds']} rounds in "
        f"{fed['seconds']:.0f} s over {fed['channels']}.",
        "  Each hospital's update was split into random-looking shares; neither aggregator saw an update, "
        "only the average of all of them was revealed.",
        f"  Validation ({val['n_images']} images): accuracy {val['accuracy']:.2f}, MCC {val['mcc']:.2f}, "
        f"pneumonia ROC-AUC {val['pneumonia_roc_auc']:.2f}.",
        "Encrypted predictions (each server saw only a random-looking share of each image, and learnt nothing):",
    ]
    for p in summary["encrypted_predictions"]:
        probs = "  ".join(f"{c} {v:.2f}" for c, v in p["probabilities"].items())
        lines.append(f"  {os.path.basename(p['image'])}: {p['prediction']}  ({probs})")
    agree = "the same classes as" if summary["same_predictions_as_plaintext"] else "DIFFERENT classes from"
    lines.append(
        f"  {agree} the plaintext model; logits within {summary['largest_logit_difference_from_plaintext']:.4f}."
    )
    files = summary["files"]
    lines += [
        f"Done in {summary['seconds']:.0f} s. Report {files['report']}, plots {', '.join(files['plots'])}, "
        f"checkpoint {files['checkpoint']}; this summary in {Path(files['report']).parent.parent / 'summary.json'}.",
        f"Next: medmpc evaluate --model {files['checkpoint']} --data YOUR_FOLDER; medmpc predict --model "
        f"{files['checkpoint']} IMAGE; or serve it encrypted (README: 'Deployment walk-through').",
    ]
    return "\n".join(lines)
