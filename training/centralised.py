"""Centralised training: the baseline every federated result is compared with."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from medmpc.imaging.dataset import ImageSet
from medmpc.imaging.transforms import Preprocessing
from medmpc.models import build_model
from medmpc.mpc import prg
from medmpc.training import plots
from medmpc.training.accountant import BudgetError, PrivacyAccountant
from medmpc.training.checkpoint import Checkpoint
from medmpc.training.dp import DPSGD, DPConfig, check_compatible, privacy_summary
from medmpc.training.evaluation import Selection, headline, shift_check
from medmpc.training.local import TrainConfig, check_private_recipe, class_weights, predict, train
from medmpc.training.metrics import classification_metrics
from medmpc.training.reports import dataset_summary, write_json
from medmpc.training.statistics import Statistics, local_statistics, release_history, release_privacy

_CURVE_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "mcc", "roc_auc", "pneumonia_roc_auc")


def train_centralised(
    data: ImageSet,
    *,
    model_name: str,
    cfg: TrainConfig,
    out: Path,
    val_fraction: float = 0.15,
    dp: DPConfig | None = None,
    stats_noise: float | None = None,
    shift: ImageSet | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Train on ``data`` minus a stratified validation split; write model.pt, report.json, PNGs.

    The model kept is the epoch's with the best validation MCC (the first of equals); ``shift``, a
    labelled set from another acquisition, is evaluated with it at the end (``shift_check``).

    With ``dp``, DP-SGD; training stops cleanly, keeping the model, once the budget is spent.
    The pixel mean/std (stored in the checkpoint) and the class counts (class weights, report) come
    from the training data too: exact unless ``stats_noise`` (DP only) releases them with Gaussian
    noise of that standard deviation on each sum (training.statistics), accounted in the same
    budget before training. The report's ``privacy`` says what its epsilon covers and what not.
    """
    if stats_noise is not None and (dp is None or not stats_noise > 0):
        raise ValueError(
            f"stats noise {stats_noise}: a noisy statistics release needs DP-SGD (--dp-epsilon, the "
            "budget that accounts for it) and a positive noise"
        )
    if dp is not None:
        check_private_recipe(mixup=cfg.mixup, precision=cfg.precision)
    out.mkdir(parents=True, exist_ok=True)
    train_set, val_set = data.held_out(val_fraction, seed=cfg.seed)
    release, noisy, class_weight = release_history(stats_noise), None, None
    if stats_noise is None:
        prep = Preprocessing.fit(train_set.images)
    else:
        sums = local_statistics(train_set)
        noisy = Statistics.from_sums(sums + prg.gaussian(sums.numel(), stats_noise))
        prep = Preprocessing(train_set.image_size, noisy.pixel_mean, noisy.pixel_std)
        class_weight = class_weights(noisy.class_counts)  # the sampling rates follow the noisy counts
    model = build_model(model_name, len(data.classes), seed=cfg.seed)
    tag = " [synthetic data]" if data.is_synthetic else ""
    counts = f"{noisy.to_dict(data.classes)['class_counts']} (noisy)" if noisy is not None else train_set.class_counts()
    log(f"data{tag}: {data.source}  train {counts}  validation {val_set.class_counts()}")

    history: list[dict[str, Any]] = []
    private = None
    if dp is not None:
        check_compatible(model, model_name)
        private = DPSGD(
            dp,
            n_samples=len(train_set),
            batch_size=cfg.batch_size,
            planned_epochs=cfg.epochs,
            who="centralised training",
            prior=PrivacyAccountant(release),
        )
        log(
            f"DP-SGD: noise multiplier {private.noise_multiplier:.3f}, clip {dp.clip}, "
            f"sample rate {private.sample_rate:.4f}"
        )
        private.reserve(1)  # refuses to start if a single epoch would exceed the budget

    best = Selection()

    def on_epoch(epoch: int, loss: float) -> None:
        m = classification_metrics(predict(model, val_set.images, prep), val_set.labels, data.classes)
        eps = {} if private is None else {"epsilon": private.epsilon}
        history.append({"epoch": epoch + 1, "train_loss": loss, **eps, **{k: m[k] for k in _CURVE_KEYS}})
        if best.offer(epoch + 1, m):
            best.state = copy.deepcopy(model.state_dict())
        log(
            f"epoch {epoch + 1}/{cfg.epochs}: loss {loss:.4f}  val accuracy {m['accuracy']:.3f}  MCC {m['mcc']:.3f}  "
            f"pneumonia AUC {m['pneumonia_roc_auc'] or float('nan'):.3f}"
            + (f"  epsilon {eps['epsilon']:.2f} (delta {dp.delta:g})" if eps and dp else "")
        )
        if private is not None and epoch + 1 < cfg.epochs:
            private.reserve(1)

    start = time.perf_counter()
    stopped = None
    try:
        train(
            model,
            train_set.images,
            train_set.labels,
            prep,
            cfg,
            num_classes=len(data.classes),
            class_weight=class_weight,
            private=private,
            on_epoch=on_epoch,
        )
    except BudgetError as err:
        stopped = str(err)
        log(f"stopped after epoch {len(history)}: {err}")
    seconds = time.perf_counter() - start
    if best.state is not None:
        model.load_state_dict(best.state)
    val_metrics = classification_metrics(predict(model, val_set.images, prep), val_set.labels, data.classes)
    report: dict[str, Any] = {
        "model": model_name,
        "dataset": dataset_summary(data),
        "split": {"val_fraction": val_fraction, "seed": cfg.seed, "train": len(train_set), "val": len(val_set)},
        "config": asdict(cfg),
        "preprocessing": prep.to_dict(),
        "train_seconds": seconds,
        "history": history,
        "selected": best.summary("epoch"),
        "validation": val_metrics,
    }
    if shift is not None:
        report["shift_check"] = shift_check(model, prep, shift)
    if noisy is not None:  # the exact size and class counts of the training data stay unwritten
        for key in ("n_images", "class_counts"):
            del report["dataset"][key]
        report["dataset"]["statistics"] = noisy.to_dict(data.classes)
        del report["split"]["train"]
    if private is not None:
        report["privacy"] = privacy_summary(private) | {
            "stopped": stopped,
            **_coverage(stats_noise),
            "statistics": release_privacy(release, noise_std=stats_noise, delta=private.cfg.delta),
        }
    Checkpoint(
        model_name,
        data.classes,
        prep,
        model.state_dict(),
        info={
            "dataset": report["dataset"],
            "validation": val_metrics,
            "selected": report["selected"],
            "shift_check": headline(report.get("shift_check")),
            "config": report["config"],
            "privacy": report.get("privacy"),
        },
    ).save(out / "model.pt")
    write_json(report, out / "report.json")
    title = f"{model_name} on {'synthetic data' if data.is_synthetic else data.source}"
    plots.curves_png(
        {k: [h[k] for h in history] for k in ("train_loss", "accuracy", "mcc", "pneumonia_roc_auc")},
        out / "learning_curves.png",
        xlabel="epoch",
        title=title,
    )
    plots.confusion_matrix_png(val_metrics, out / "confusion_matrix.png", f"validation: {title}")
    return report


def _coverage(stats_noise: float | None) -> dict[str, list[str]]:
    """What a DP run's epsilon covers, and what else it writes about the training data."""
    covers = ["the model: every training step (DP-SGD)"]
    not_covered = [
        "the training loss of each epoch (history.train_loss), computed on the training batches without noise",
        "the validation split, held out and never trained on: its metrics and per-class sizes (a stratified "
        "split, so they follow the training data's)",
    ]
    if stats_noise is None:
        not_covered.append(
            "the normalisation statistics (pixel mean/std, in the checkpoint's preprocessing) and class counts "
            "(dataset and split sizes; the class weights that set the sampling rates): exact, from the training "
            "data; --stats-noise releases them privately"
        )
    else:
        covers.append(
            f"the normalisation statistics (pixel mean/std) and class counts: Gaussian noise of std {stats_noise} "
            "on each sum, accounted before training (privacy.statistics)"
        )
    return {"covers": covers, "not_covered": not_covered}
