"""The ``medmpc`` command."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import MISSING, fields
from importlib.metadata import version
from pathlib import Path
from types import FrameType
from typing import Any

from medmpc.cli import commands
from medmpc.imaging.transforms import AUGMENTATIONS, MIN_IMAGE_SIZE
from medmpc.protocols.plan import LR_DECAYS, Plan
from medmpc.serving.options import add_service_options
from medmpc.training.local import PRECISIONS

Subcommands = argparse._SubParsersAction  # what add_subparsers returns
# the plan's defaults, read off its fields; `train` defaults to what a default `simulate`
# trains, so the two default runs compare
DEFAULTS = {f.name: f.default for f in fields(Plan) if f.default is not MISSING}


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``, refused at parse time."""

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return whole_number


IMAGE_SIZE = _at_least(MIN_IMAGE_SIZE)
POSITIVE = _at_least(1)


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default, where it has one worth showing."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and _shows_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" not in text and "(default" not in text and _shows_default(action):
            text += " (default: %(default)s)"
        return text


def _shows_default(action: argparse.Action) -> bool:
    default = action.default
    return bool(action.option_strings) and default is not None and default is not False and default != argparse.SUPPRESS


class _Parser(argparse.ArgumentParser):
    """The command's parsers, sub-commands' included: help with defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)


def _add_data_args(p: argparse.ArgumentParser, *, default_size: int | None) -> None:
    """The data flags; without ``default_size`` (evaluation: the checkpoint's), ``--data`` has no default."""
    if default_size is None:
        p.add_argument("--data", help="labelled data folder (Kaggle layout), or 'synthetic[:N]'")
    else:
        p.add_argument("--data", default=DEFAULTS["data"], help="data folder (Kaggle layout) or 'synthetic[:N]'")
    p.add_argument(
        "--skip-unreadable", action="store_true", help="skip (and count) unreadable files instead of failing"
    )
    if default_size is not None:
        p.add_argument("--image-size", type=IMAGE_SIZE, default=default_size, help="square input size in pixels")
        p.add_argument(
            "--classes", type=int, choices=(2, 3), default=3, help="3: normal/bacterial/viral; 2: normal/pneumonia"
        )


def _add_recipe_args(p: argparse.ArgumentParser, *, defaults: dict[str, Any] | None) -> None:
    """The training recipe's flags; ``defaults`` None leaves them unset (a config file's, else the plan's)."""
    given = defaults or {}
    p.add_argument("--weight-decay", type=float, default=given.get("weight_decay"), help="AdamW's weight decay")
    p.add_argument(
        "--augment",
        choices=AUGMENTATIONS,
        default=given.get("augment"),
        help="training-time augmentation: affine jitter; shift adds contrast, brightness, gamma, blur and noise "
        "against acquisition shift",
    )
    p.add_argument(
        "--mixup",
        type=float,
        default=given.get("mixup"),
        help="MixUp's Beta(a, a) parameter a, 0 for none (not with DP)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=given.get("precision"),
        help="floating point of the training passes: bf16 runs convolutions in bfloat16, several times faster "
        "on CPUs with AMX (weights, evaluation and the checkpoint stay float32; not with DP)",
    )
    p.add_argument(
        "--shift-data",
        default=given.get("shift_data") or None,
        help="labelled folder from another acquisition (e.g. the data's val/), evaluated with the selected model "
        "at the end, never trained on: the report's shift_check",
    )


def _add_transport_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tls-dir", type=Path, help="federation folder from `medmpc pki init` (default: an ephemeral CA for this run)"
    )
    _add_plaintext_transport(p)


def _add_plaintext_transport(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--plaintext-transport",
        action="store_true",
        help="no TLS between the parties, to measure "
        "the protocol's own cost; NOT secure: every share crosses the network in the clear",
    )


def _add_network(p: argparse.ArgumentParser) -> None:
    from medmpc.netlab.profiles import PROFILES

    p.add_argument(
        "--network",
        choices=sorted(PROFILES),
        help="every party on a host of its own (a network namespace; needs root), linked by this profile: "
        + "; ".join(f"{name}: {prof.about}" for name, prof in sorted(PROFILES.items())),
    )


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what an earlier run wrote in --out (a non-empty --out is refused otherwise)",
    )


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (progress goes to stderr)")


def _add_inference_run_args(p: argparse.ArgumentParser) -> None:
    """How an encrypted inference runs: its deadline, its device, its output and channels."""
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--device", default="cpu", help="cpu or cuda: where every party keeps and computes its shares")
    _add_nonlinear(p)
    _add_json(p)
    _add_plaintext_transport(p)


def _add_nonlinear(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nonlinear",
        choices=("fss", "bit-sliced"),
        default="fss",
        help="ReLU and the input clamp: 'fss', one round each from the dealer's keys (which grow with the "
        "image: gigabytes per party for a 224-px ResNet-18), or 'bit-sliced', several times the rounds and "
        "bytes online but little dealer material (for large images on fast links)",
    )


def _add_dp_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("differential privacy (DP-SGD)")
    g.add_argument("--dp-epsilon", type=float, help="privacy budget; turns on DP-SGD (needs a GroupNorm model)")
    g.add_argument("--dp-delta", type=float, help="delta of (epsilon, delta)-DP (default 1e-5)")
    g.add_argument("--dp-clip", type=float, help="per-sample gradient clipping norm C (default 1.0)")
    g.add_argument(
        "--dp-noise",
        type=float,
        help="fixed noise multiplier instead of planning it from the budget; "
        "training then stops cleanly when the budget is spent",
    )
    g.add_argument(
        "--dp-physical-batch",
        type=_at_least(1),
        help="images per forward and backward pass (default 64): a larger batch runs in pieces and takes "
        "one noisy step, so memory stays bounded whatever --batch-size",
    )


def _demo(sub: Subcommands) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole mission in a few minutes: secure federated training, then encrypted predictions",
        description="3 hospitals train with secure aggregation on built-in synthetic data, the model is served "
        "by the encrypted prediction service, and a few held-out images are predicted through its client.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for everything the demo writes")
    _add_overwrite(p)
    p.add_argument("--hospitals", type=int, default=3)
    p.add_argument("--rounds", type=POSITIVE, default=12)
    p.add_argument("--local-epochs", type=POSITIVE, default=2)
    p.add_argument("--images", type=POSITIVE, default=4, help="held-out images predicted through the encrypted service")
    p.add_argument("--synthetic", type=POSITIVE, default=1200, help="synthetic training images")
    p.add_argument("--image-size", type=IMAGE_SIZE, default=64)
    p.add_argument("--seed", type=int, default=0)
    _add_json(p)
    p.set_defaults(func=commands.demo)


def _train(sub: Subcommands) -> None:
    p = sub.add_parser("train", help="centralised training (the baseline for federated runs)")
    _add_data_args(p, default_size=DEFAULTS["image_size"])
    p.add_argument("--model", default=DEFAULTS["model"], help="cnn, cnn_gn, resnet18, resnet18_gn")
    p.add_argument(
        "--epochs",
        type=POSITIVE,
        default=DEFAULTS["rounds"] * DEFAULTS["local_epochs"],
        help="as many as a default simulate's rounds of local epochs",
    )
    p.add_argument("--batch-size", type=POSITIVE, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULTS["val_fraction"],
        help="stratified validation split held out of the training data",
    )
    _add_recipe_args(p, defaults=DEFAULTS)
    p.add_argument("--no-class-weights", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="folder for model.pt, report.json and plots")
    _add_overwrite(p)
    _add_dp_args(p)
    p.add_argument(
        "--stats-noise",
        type=float,
        help="with --dp-epsilon: std of the Gaussian noise on the training "
        "data's normalisation sums and class counts, accounted in the budget (without it they are "
        "exact and not covered by epsilon)",
    )
    p.set_defaults(func=commands.train)


def _evaluate(sub: Subcommands) -> None:
    p = sub.add_parser("evaluate", help="metrics of a checkpoint on a folder of labelled images")
    _add_data_args(p, default_size=None)
    p.add_argument("--model", type=Path, required=True, help="checkpoint (model.pt, or the run folder holding it)")
    _add_json(p)
    p.add_argument("--out", type=Path, help="folder for metrics.json and confusion_matrix.png")
    _add_overwrite(p)
    p.set_defaults(func=commands.evaluate)


def _partition(sub: Subcommands) -> None:
    p = sub.add_parser("partition", help="show how a dataset would be split across hospitals")
    _add_data_args(p, default_size=64)
    p.add_argument("--hospitals", type=int, default=3)
    p.add_argument("--partition", default="iid", help="iid, dirichlet:ALPHA or sizes:W1,...,WN")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=commands.partition)


def _simulate(sub: Subcommands) -> None:
    p = sub.add_parser("simulate", help="federated training with every role its own process")
    p.add_argument("--config", type=Path, help="TOML file with any of the options below (flags override it)")
    p.add_argument("--hospitals", type=int)
    p.add_argument("--aggregators", type=int)
    p.add_argument("--rounds", type=POSITIVE)
    p.add_argument("--local-epochs", type=int)
    p.add_argument("--partition", help="iid, dirichlet:ALPHA or sizes:W1,...,WN")
    p.add_argument("--data", help="data folder (Kaggle layout) or 'synthetic[:N]'")
    p.add_argument("--model", help="cnn, cnn_gn, resnet18, resnet18_gn")
    p.add_argument("--image-size", type=IMAGE_SIZE)
    p.add_argument("--classes", dest="num_classes", type=int, choices=(2, 3))
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    _add_recipe_args(p, defaults=None)
    p.add_argument("--lr-decay", choices=LR_DECAYS, help="the peak learning rate across rounds: cosine ends at a tenth")
    p.add_argument("--fractional-bits", type=int, help="fixed-point precision (default 16)")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--timeout", dest="timeout_s", type=float, help="seconds a party waits for a peer (covers local training)"
    )
    p.add_argument(
        "--min-hospitals",
        type=int,
        help="fewest hospitals whose updates make a round (default 3, or all where fewer); with fewer than all, "
        "a hospital that fails is left out of its round and the run goes on",
    )
    p.add_argument("--host", help="address every role listens on (default 127.0.0.1)")
    p.add_argument("--plaintext", action="store_true", help="plain FedAvg in the clear, for comparison")
    _add_transport_args(p)
    _add_network(p)
    p.add_argument("--out", type=Path, help="folder for report.json, model.pt and plots")
    _add_overwrite(p)
    p.add_argument(
        "--resume",
        type=Path,
        metavar="OUT",
        help="continue the run that wrote OUT (its coordinator or machine died) after its last completed round, "
        "with the plan saved there",
    )
    _add_dp_args(p)
    p.add_argument(
        "--central-dp-noise",
        type=float,
        help="distributed central DP: noise multiplier z of the "
        "Gaussian noise the aggregators add to the sum of clipped updates inside MPC",
    )
    p.add_argument(
        "--update-clip", type=float, help="with --central-dp-noise: L2 clip of each hospital's update (default 1.0)"
    )
    p.add_argument(
        "--stats-noise",
        type=float,
        help="std of the Gaussian noise added inside MPC to each aggregated "
        "normalisation statistic and class count (accounted; included in DP-SGD budgets)",
    )
    p.add_argument(
        "--update-norm-bound",
        type=float,
        metavar="B",
        help="reject, inside MPC, every hospital update of L2 norm above B (one accept bit per hospital; "
        "needs --min-hospitals below --hospitals); updates then count with equal weights",
    )
    p.add_argument(
        "--update-norm-factor",
        type=float,
        metavar="F",
        help="with --update-norm-bound B: each later round's bound is F times the norm of the previous round's "
        "average update where that is below B",
    )
    for action in p._actions:  # unset flags take the config file's value, else the plan's default
        default = DEFAULTS.get(action.dest)
        if action.default is None and default not in (None, "", [], {}) and "(default" not in (action.help or ""):
            action.help = f"{action.help or ''} (default: {default})".strip()
    p.set_defaults(func=commands.simulate)


def _tune(sub: Subcommands) -> None:
    p = sub.add_parser(
        "tune",
        help="search the training recipe (learning rate, weight decay, augmentation, batch size, MixUp or DP "
        "clipping) with Optuna, by validation MCC; the same command resumes the study",
    )
    p.add_argument("--mode", choices=("centralised", "federated"), default="centralised", help="how each trial trains")
    p.add_argument("--trials", type=POSITIVE, default=20, help="finished trials the study should have")
    p.add_argument("--config", type=Path, help="TOML plan with the fixed settings (flags override it)")
    p.add_argument("--data", help="data folder (Kaggle layout) or 'synthetic[:N]'")
    p.add_argument("--model", help="cnn, cnn_gn, resnet18, resnet18_gn")
    p.add_argument("--image-size", type=IMAGE_SIZE)
    p.add_argument("--classes", dest="num_classes", type=int, choices=(2, 3))
    p.add_argument("--rounds", type=POSITIVE, help="federated rounds; centralised: epochs = rounds x local epochs")
    p.add_argument("--local-epochs", type=POSITIVE)
    p.add_argument("--hospitals", type=int)
    p.add_argument("--partition", help="iid, dirichlet:ALPHA or sizes:W1,...,WN")
    p.add_argument("--precision", choices=PRECISIONS, help="floating point of the training passes (see train)")
    p.add_argument("--seed", type=int)
    _add_dp_args(p)
    p.add_argument(
        "--out", type=Path, required=True, help="the study's folder: study.db, study.json, trials.png, trials/"
    )
    p.set_defaults(func=commands.tune)


def _role(sub: Subcommands) -> None:
    p = sub.add_parser(
        "role",
        help="one federated role on this machine (coordinator, hospital, aggregator, or the norm check's dealer), "
        "reading a shared plan",
        description="Same as python -m medmpc.protocols.roles: ROLE --plan plan.json [--index I] [--out DIR]. "
        "Exit status 3 names the party and what went wrong.",
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="ROLE --plan PLAN [--index I] [--out DIR]")
    p.set_defaults(func=commands.role)


def _bench(sub: Subcommands) -> None:
    bench = sub.add_parser("bench", help="protocol benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("secure-aggregation", help="one secure aggregation vs plaintext FedAvg")
    p.add_argument("--params", type=POSITIVE, default=11_200_000, help="float32 values per update (ResNet-18: 11.2M)")
    p.add_argument("--hospitals", type=int, default=3)
    p.add_argument("--aggregators", type=int, default=2)
    p.add_argument(
        "--min-hospitals",
        type=int,
        help="as for simulate (default 3): below the hospitals, the aggregators' mask sums wait for the reveal",
    )
    p.add_argument("--repeat", type=POSITIVE, default=3, help="runs of each; medians are reported")
    p.add_argument(
        "--update-norm-bound",
        type=float,
        metavar="B",
        help="with the norm check (as for simulate; needs --min-hospitals below --hospitals): every random "
        "update has norm B/2",
    )
    p.add_argument("--fractional-bits", type=int, default=16)
    p.add_argument("--timeout", type=float, default=300.0)
    _add_json(p)
    _add_transport_args(p)
    _add_network(p)
    p.set_defaults(func=commands.bench_secure_aggregation)

    p = bench.add_parser("inference", help="encrypted inference of a random model against plaintext")
    p.add_argument("--model", default="resnet18", help="architecture from the registry")
    p.add_argument("--image-size", type=IMAGE_SIZE, default=64)
    p.add_argument("--batch", type=POSITIVE, default=1)
    p.add_argument("--seed", type=int, default=0)
    _add_inference_run_args(p)
    _add_network(p)
    p.set_defaults(func=commands.bench_inference)


def _infer(sub: Subcommands) -> None:
    p = sub.add_parser("infer", help="encrypted prediction: secret-shared model on a secret-shared image")
    p.add_argument("--model", type=Path, required=True, help="checkpoint (model.pt)")
    p.add_argument("--image", type=Path, required=True, nargs="+", help="image file(s); several form one batch")
    _add_inference_run_args(p)
    p.set_defaults(func=commands.infer)


def _serve(sub: Subcommands) -> None:
    p = sub.add_parser("serve", help="encrypted prediction service: model owner, compute party and dealer over HTTP")
    p.add_argument("--model", type=Path, help="checkpoint (model.pt); needed by the model owner")
    p.add_argument(
        "--role",
        choices=("all", "model-owner", "compute", "dealer"),
        default="all",
        help="'all' runs the three parties here; one role runs that party alone (one per machine)",
    )
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (and the parties' address for --role all)")
    p.add_argument("--ports", default="8000,8001,8002", help="HTTP ports of model owner, compute party, dealer")
    p.add_argument(
        "--parties",
        help="HOST:PORT of model owner, compute party and dealer for their CrypTen "
        "channels (default HOST:29500,HOST:29501,HOST:29502)",
    )
    p.add_argument(
        "--mpc-tls-dir",
        type=Path,
        help="one role: the federation folder with ca.pem, crl.pem and "
        "its party0/party1/dealer key (--role all makes an ephemeral CA)",
    )
    _add_plaintext_transport(p)
    add_service_options(p)
    p.add_argument("--log-dir", type=Path, default=Path("runs/serve"), help="party logs (JSON lines) for --role all")
    p.set_defaults(func=commands.serve)


def _add_client_args(p: argparse.ArgumentParser, *, servers_help: str = "") -> None:
    """How a client reaches the prediction service."""
    p.add_argument(
        "--servers", required=not servers_help, help=f"URL1,URL2 of the model owner and the compute party{servers_help}"
    )
    p.add_argument("--token-file", type=Path, help="file holding the bearer token (else $MEDMPC_TOKEN)")
    p.add_argument("--ca-cert", type=Path, help="CA certificate (PEM) to verify HTTPS servers with")
    p.add_argument(
        "--insecure-http",
        action="store_true",
        help="allow plain http:// to a host that is not this machine (every share then crosses the network readable)",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a prediction")


def _predict(sub: Subcommands) -> None:
    p = sub.add_parser("predict", help="client of the prediction service: shares an image, reconstructs the result")
    p.add_argument("image", type=Path, nargs="+", help="image file(s); several form one request")
    _add_client_args(p, servers_help=" (or --model)")
    p.add_argument(
        "--model",
        type=Path,
        help="instead of the service: this checkpoint (or run folder), in the clear on this machine; nothing leaves it",
    )
    p.add_argument(
        "--wait-ready", type=float, default=0.0, metavar="S", help="first wait up to S seconds for both servers' /ready"
    )
    _add_json(p)
    p.set_defaults(func=commands.predict)


def _clinic(sub: Subcommands) -> None:
    p = sub.add_parser(
        "clinic",
        help="a web page on this machine: drop X-rays, read encrypted predictions from the service",
        description="Serves a page for the clinic's browser. Each dropped image is secret-shared by this process "
        "and only its shares go to the two servers; the page itself never comes from a server.",
    )
    _add_client_args(p)
    p.add_argument("--host", default="127.0.0.1", help="loopback address the page listens at (this machine only)")
    p.add_argument("--port", type=int, default=8080, help="the page's port (0: any free one)")
    p.add_argument("--max-upload-mb", type=float, default=64.0, help="largest X-ray file the page accepts")
    p.set_defaults(func=commands.clinic)


def _selfcheck(sub: Subcommands) -> None:
    p = sub.add_parser("selfcheck", help="secret-shared arithmetic across real party processes")
    p.add_argument("--parties", type=int, default=2)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a silent party is an error")
    p.set_defaults(func=commands.selfcheck)


def _pki(sub: Subcommands) -> None:
    pki = sub.add_parser("pki", help="federation CA and party certificates").add_subparsers(dest="pki", required=True)
    p = pki.add_parser("init", help="a new CA, its CRL, and a key and certificate for every party")
    p.add_argument("--out", type=Path, required=True, help="new federation folder (ca.pem, crl.pem, PARTY.pem/.key)")
    p.add_argument("--hospitals", type=int, default=3)
    p.add_argument("--aggregators", type=int, default=2)
    p.add_argument("--days", type=float, default=365.0, help="validity of every certificate")
    p.set_defaults(func=commands.pki_init)
    p = pki.add_parser("issue", help="a key and certificate for one more party, e.g. hospital3")
    p.add_argument("--dir", type=Path, required=True, help="federation folder holding ca.key")
    p.add_argument("party")
    p.add_argument("--days", type=float, default=365.0)
    p.add_argument(
        "--address",
        action="append",
        default=[],
        help="IP address or DNS name the certificate also serves HTTPS at (repeatable)",
    )
    p.set_defaults(func=commands.pki_issue)
    p = pki.add_parser("revoke", help="add a party's certificate to the CRL (copy crl.pem to every party)")
    p.add_argument("--dir", type=Path, required=True, help="federation folder holding ca.key")
    p.add_argument("party")
    p.set_defaults(func=commands.pki_revoke)


# every subcommand: a function that adds its parser (and sets the function that runs it)
SUBCOMMANDS = (
    _demo,
    _train,
    _evaluate,
    _partition,
    _simulate,
    _tune,
    _role,
    _bench,
    _infer,
    _serve,
    _predict,
    _clinic,
    _selfcheck,
    _pki,
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="medmpc", description="Secure multi-party learning on chest X-rays.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('medmpc')}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


class Stopped(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP, raised where the main thread is, so every ``finally`` runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOPPING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _importing(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _stop(signum: int, frame: FrameType | None) -> None:
    # Code run by an import may catch the exception and go on (a Ctrl-C during start-up's imports
    # was lost that way, and the command then waited out its whole --wait-ready): while an import
    # runs, the signal is sent again a moment later instead
    if _importing(frame):
        threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
        return
    raise Stopped(signum)


def install_stop_handlers() -> None:
    """Ctrl-C, ``kill``, systemd, docker stop and a closed SSH session all stop a command the same
    way: the launchers' clean-up (party processes, temporary folders) runs on the way out."""
    for stopping in STOPPING:
        signal.signal(stopping, _stop)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    install_stop_handlers()
    # progress and results for a person on stdout; with --json, stdout carries only the JSON object
    stream = sys.stderr if getattr(args, "json", False) else sys.stdout
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=stream, force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per HTTP request is noise to a person
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        # DataError, PartyError and bad arguments: one clear line, no traceback
        print(f"medmpc {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        signum: int = err.signum if isinstance(err, Stopped) else signal.SIGINT
        print(f"medmpc {args.command}: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    if getattr(args, "json", False) and result is not None:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
