"""What each ``medmpc`` sub-command does; argument parsing lives in cli.main."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from imaging.dataset import load_dataset


def _log(msg: str) -> None:
    print(msg, file=sys.stderr if _log.quiet else sys.stdout, flush=True)


_log.quiet = False  # type: ignore[attr-defined]


def _load(args: argparse.Namespace, *, image_size: int, num_classes: int, split: str):
    data = load_dataset(
        args.data, image_size=image_size, num_classes=num_classes, split=split,
        skip_unreadable=args.skip_unreadable, seed=getattr(args, "seed", 0),
    )  # fmt: skip
    if data.skipped:
        _log(f"skipped {len(data.skipped)} unreadable file(s): " + ", ".join(map(str, data.skipped[:5])))
    return data


def train(args: argparse.Namespace) -> None:
    from training.centralised import train_centralised
    from training.local import TrainConfig

    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, augment=not args.no_augment,
        class_weighting=not args.no_class_weights, seed=args.seed,
    )  # fmt: skip
    data = _load(args, image_size=args.image_size, num_classes=args.classes, split="train")
    report = train_centralised(data, model_name=args.model, cfg=cfg, out=args.out, val_fraction=args.val_fraction, log=_log)
    from training.metrics import format_metrics

    _log("validation split:\n" + format_metrics(report["validation"]))
    _log(f"wrote {args.out / 'model.pt'}, {args.out / 'report.json'} and plots")


def evaluate(args: argparse.Namespace) -> dict[str, Any] | None:
    from training.centralised import evaluate_checkpoint, write_json
    from training.checkpoint import Checkpoint
    from training.metrics import format_metrics

    _log.quiet = args.json  # stdout carries only the JSON object
    ckpt = Checkpoint.load(args.model)
    data = _load(args, image_size=ckpt.preprocessing.image_size, num_classes=len(ckpt.classes), split="val")
    metrics = evaluate_checkpoint(ckpt, data)
    if args.out is not None:
        from training.plots import confusion_matrix_png

        args.out.mkdir(parents=True, exist_ok=True)
        write_json(metrics, args.out / "metrics.json")
        confusion_matrix_png(metrics, args.out / "confusion_matrix.png", f"{ckpt.model_name} on {data.source}")
    if args.json:
        return metrics
    tag = " [synthetic data]" if data.is_synthetic else ""
    _log(f"{ckpt.model_name} on {data.source}{tag}\n" + format_metrics(metrics))
    return None


def partition(args: argparse.Namespace) -> None:
    from imaging.splits import partition as split_hospitals
    from imaging.splits import partition_table

    data = _load(args, image_size=args.image_size, num_classes=args.classes, split="train")
    parts = split_hospitals(data.labels, args.hospitals, args.partition, seed=args.seed)
    tag = " [synthetic data]" if data.is_synthetic else ""
    _log(f"{data.source}{tag}: {len(data)} images, partition {args.partition}")
    _log(partition_table(parts, data.labels, data.classes))


def selfcheck(args: argparse.Namespace) -> None:
    from mpc import selfcheck as check
    from mpc.launch import run_crypten_job

    results = run_crypten_job(
        "mpc.selfcheck:arithmetic", world_size=args.parties, args={"size": 16, "seed": 0}, timeout_s=args.timeout
    )
    want = check.expected(args.parties, 16, 0)
    worst = max(float((r[k] - want[k]).abs().max()) for r in results for k in want)
    if worst > 1e-3:
        raise RuntimeError(f"secret-shared results differ from plaintext by {worst:.2e}")
    _log(f"{args.parties} parties + dealer: sum, product and ReLU match plaintext (max error {worst:.1e})")
