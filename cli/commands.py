"""What each ``medmpc`` sub-command does; argument parsing lives in cli.main."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medmpc.imaging.dataset import ImageSet, load_dataset

if TYPE_CHECKING:
    from medmpc.mpc.launch import Hosts
    from medmpc.protocols.plan import Plan
    from medmpc.serving.client import PredictionClient
    from medmpc.training.dp import DPConfig
    from medmpc.training.predictions import Prediction


SYNTHETIC_MODEL = "note: this model was trained on synthetic images only; its predictions say nothing about a patient"
_STARTING = "each loads PyTorch and connects to the others, which takes 10 to 40 s before any progress shows"
# what a person reads; cli.main sends it to stdout, or to stderr when stdout carries --json
_log = logging.getLogger("medmpc").info


@contextlib.contextmanager
def _hosts(profile: str | None, names: list[str]) -> Iterator[Hosts | None]:
    """Each party on a host of its own, linked by the ``--network`` profile; None: all on this machine."""
    if profile is None:
        yield None
        return
    from medmpc.netlab.hosts import Network

    with Network(names, profile=profile) as net:
        _log(f"network {net.profile.describe()}: " + ", ".join(f"{n} at {net.address(n)}" for n in names))
        yield net


# files only medmpc writes: a folder holding one is an earlier run's, which --overwrite may replace
_RUN_MARKERS = ("report.json", "summary.json", "metrics.json")


def _fresh_out(out: Path, *, overwrite: bool, keep: Path | None = None) -> Path:
    """``out``, new or empty, so that one run's files never mix with another's. A non-empty folder
    is refused, or with ``overwrite`` removed first if an earlier run wrote it (and ``keep``, an
    input of this run, is not inside it)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(
                f"--out {out} is not empty (an earlier run's files would mix with this one's): "
                "choose a new folder, or pass --overwrite to replace that run"
            )
        if not any((out / marker).exists() for marker in _RUN_MARKERS):
            raise ValueError(f"--out {out} holds files no medmpc run wrote; --overwrite replaces only a run's folder")
        if keep is not None and keep.resolve().is_relative_to(out.resolve()):
            raise ValueError(f"--overwrite would delete {keep}, which this command reads, with --out {out}")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _load(args: argparse.Namespace, *, image_size: int, num_classes: int, split: str) -> ImageSet:
    data = load_dataset(
        args.data,
        image_size=image_size,
        num_classes=num_classes,
        split=split,
        skip_unreadable=args.skip_unreadable,
        seed=getattr(args, "seed", 0),
    )
    if data.skipped:
        _log(f"skipped {len(data.skipped)} unreadable file(s): " + ", ".join(map(str, data.skipped[:5])))
    return data


def _load_shift(folder: str, args: argparse.Namespace) -> ImageSet:
    """The --shift-data set at the run's image size and classes."""
    return load_dataset(folder, image_size=args.image_size, num_classes=args.classes, split="val")


def _dp_config(args: argparse.Namespace) -> DPConfig | None:
    from medmpc.training.dp import DPConfig

    if args.dp_epsilon is None:
        if any(v is not None for v in (args.dp_delta, args.dp_clip, args.dp_noise, args.dp_physical_batch)):
            raise ValueError("--dp-delta/--dp-clip/--dp-noise/--dp-physical-batch need --dp-epsilon (the budget)")
        return None
    return DPConfig(
        epsilon=args.dp_epsilon,
        delta=args.dp_delta or 1e-5,
        clip=args.dp_clip or 1.0,
        noise_multiplier=args.dp_noise,
        physical_batch=args.dp_physical_batch or DPConfig.physical_batch,
    )


def demo(args: argparse.Namespace) -> dict[str, Any] | None:
    from medmpc.cli.demo import describe, run_demo

    summary = run_demo(
        _fresh_out(args.out, overwrite=args.overwrite),
        hospitals=args.hospitals,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        images=args.images,
        synthetic=args.synthetic,
        image_size=args.image_size,
        seed=args.seed,
        log=_log,
    )
    if args.json:
        return summary
    _log(describe(summary))
    return None


def train(args: argparse.Namespace) -> None:
    from medmpc.training.centralised import train_centralised
    from medmpc.training.local import TrainConfig

    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        augment=args.augment,
        mixup=args.mixup,
        precision=args.precision,
        class_weighting=not args.no_class_weights,
        seed=args.seed,
    )
    _fresh_out(args.out, overwrite=args.overwrite)
    data = _load(args, image_size=args.image_size, num_classes=args.classes, split="train")
    report = train_centralised(
        data,
        model_name=args.model,
        cfg=cfg,
        out=args.out,
        val_fraction=args.val_fraction,
        dp=_dp_config(args),
        stats_noise=args.stats_noise,
        shift=None if args.shift_data is None else _load_shift(args.shift_data, args),
        log=_log,
    )
    from medmpc.training.metrics import format_metrics

    _log("validation split:\n" + format_metrics(report["validation"]))
    _log(f"wrote {args.out / 'model.pt'}, {args.out / 'report.json'} and plots")


def evaluate(args: argparse.Namespace) -> dict[str, Any] | None:
    from medmpc.training.checkpoint import Checkpoint
    from medmpc.training.evaluation import evaluate_checkpoint
    from medmpc.training.metrics import format_metrics
    from medmpc.training.reports import write_json

    if args.data is None:
        raise ValueError("--data is needed: a labelled folder, or 'synthetic' for the built-in synthetic images")
    ckpt = Checkpoint.load(args.model)
    if args.out is not None:
        _fresh_out(args.out, overwrite=args.overwrite, keep=args.model)
    data = _load(args, image_size=ckpt.preprocessing.image_size, num_classes=len(ckpt.classes), split="val")
    metrics = evaluate_checkpoint(ckpt, data)
    if args.out is not None:
        from medmpc.training.plots import confusion_matrix_png

        write_json(metrics, args.out / "metrics.json")
        confusion_matrix_png(metrics, args.out / "confusion_matrix.png", f"{ckpt.model_name} on {data.source}")
    if args.json:
        return metrics
    tag = " [synthetic data]" if data.is_synthetic else ""
    _log(f"{ckpt.model_name} on {data.source}{tag}\n" + format_metrics(metrics))
    return None


def partition(args: argparse.Namespace) -> None:
    from medmpc.imaging.splits import partition as split_hospitals
    from medmpc.imaging.splits import partition_table

    data = _load(args, image_size=args.image_size, num_classes=args.classes, split="train")
    parts = split_hospitals(data.labels, args.hospitals, args.partition, seed=args.seed)
    tag = " [synthetic data]" if data.is_synthetic else ""
    _log(f"{data.source}{tag}: {len(data)} images, partition {args.partition}")
    _log(partition_table(parts, data.labels, data.classes))


def selfcheck(args: argparse.Namespace) -> None:
    from medmpc.mpc import selfcheck as check
    from medmpc.mpc.launch import run_crypten_job

    results = run_crypten_job(
        "medmpc.mpc.selfcheck:arithmetic", world_size=args.parties, args={"size": 16, "seed": 0}, timeout_s=args.timeout
    )
    want = check.expected(args.parties, 16, 0)
    worst = max(check.mismatch(r[k], want[k]) for r in results for k in want)
    if worst > 1e-3:
        raise RuntimeError(f"secret-shared results differ from plaintext by {worst:.2e}")
    _log(
        f"{args.parties} parties + dealer: sum, product, convolution, ReLU and max-pooling match plaintext "
        f"(max error {worst:.1e}); comparisons exact at the edges of "
        f"{', '.join(map(str, check.EDGE_BITS))}-bit rings, clamping at the ring's ends"
    )


_PLAN_FLAGS = (
    "hospitals",
    "aggregators",
    "rounds",
    "local_epochs",
    "partition",
    "data",
    "model",
    "image_size",
    "num_classes",
    "batch_size",
    "lr",
    "weight_decay",
    "augment",
    "mixup",
    "precision",
    "lr_decay",
    "shift_data",
    "fractional_bits",
    "seed",
    "timeout_s",
    "min_hospitals",
    "host",
    "central_dp_noise",
    "update_clip",
    "stats_noise",
    "update_norm_bound",
    "update_norm_factor",
)


def _simulation_plan(args: argparse.Namespace) -> tuple[Plan, Path]:
    """The plan and the out folder: from the flags, or with --resume from the saved run."""
    from medmpc.protocols.plan import load_plan
    from medmpc.protocols.run_state import saved_plan

    overrides = {k: getattr(args, k) for k in _PLAN_FLAGS}
    dp = _dp_config(args)
    if dp is not None:
        overrides |= {
            "dp_epsilon": dp.epsilon,
            "dp_delta": dp.delta,
            "dp_clip": dp.clip,
            "dp_noise": dp.noise_multiplier,
            "dp_physical_batch": dp.physical_batch,
        }
    if args.resume is None:
        if args.out is None:
            raise ValueError("--out is needed (or --resume OUT to continue an interrupted run)")
        if args.plaintext:
            overrides["secure"] = False
        plan = load_plan(args.config, overrides | _transport_overrides(args))
        return plan, _fresh_out(args.out, overwrite=args.overwrite)
    given = [k for k, v in overrides.items() if v is not None]
    given += [k for k in ("config", "plaintext", "plaintext_transport", "overwrite") if getattr(args, k)]
    if given or args.out not in (None, args.resume):
        flags = ", ".join("--" + k.replace("_", "-") for k in given + (["out"] if args.out else []))
        raise ValueError(f"--resume continues the plan saved in {args.resume}; drop {flags}")
    plan = saved_plan(args.resume)
    if args.tls_dir:
        plan.tls_dir = str(args.tls_dir)
    return plan, args.resume


def simulate(args: argparse.Namespace) -> None:
    from medmpc.protocols.simulate import simulate as run
    from medmpc.training.metrics import format_metrics

    plan, out = _simulation_plan(args)
    mode = "secure aggregation" if plan.secure else "PLAINTEXT FedAvg (no protection)"
    _log(
        f"{mode}: {plan.hospitals} hospitals, {plan.aggregators if plan.secure else 0} aggregators, "
        f"{plan.rounds} rounds, data {plan.data}{' [synthetic data]' if plan.data.startswith('synthetic') else ''}; "
        f"channels: {plan.transport}"
    )
    _log(f"starting {len(plan.party_names)} processes ({', '.join(plan.party_names)}): {_STARTING}")
    with _hosts(args.network, plan.party_names) as hosts:
        report = run(plan, out, hosts=hosts, resume=args.resume is not None)
    if "stopped" in report:
        _log(f"stopped early: {report['stopped']}")
    if "validation" in report:
        _log("final validation:\n" + format_metrics(report["validation"]))
    wrote = [out / f for f in ("report.json", "model.pt") if (out / f).exists()]
    _log(f"wrote {', '.join(map(str, wrote))}" + (" and plots" if "validation" in report else ""))


def tune(args: argparse.Namespace) -> dict[str, Any] | None:
    from medmpc.cli.tune import FLAGS
    from medmpc.cli.tune import tune as run
    from medmpc.protocols.plan import load_plan

    overrides = {k: getattr(args, k) for k in FLAGS}
    dp = _dp_config(args)
    if dp is not None:
        overrides |= {
            "dp_epsilon": dp.epsilon,
            "dp_delta": dp.delta,
            "dp_noise": dp.noise_multiplier,
            "dp_physical_batch": dp.physical_batch,
        }
    summary = run(load_plan(args.config, overrides), args.out, mode=args.mode, trials=args.trials, log=_log)
    best = summary["best"]
    _log(
        "no trial completed"
        if best is None
        else f"best: trial {best['trial']}, validation MCC {best['mcc']:.4f}, {best['params']} ({args.out / 'trials'})"
    )
    _log(f"wrote {args.out / 'study.json'} and {args.out / 'trials.png'}")
    return None


def role(args: argparse.Namespace) -> None:
    from medmpc.protocols import roles

    status = roles.main(args.args)
    if status:
        raise SystemExit(status)


def _transport_overrides(args: argparse.Namespace) -> dict[str, Any]:
    if args.plaintext_transport and args.tls_dir:
        raise SystemExit("--tls-dir and --plaintext-transport exclude each other")
    chosen = {"plaintext_transport": args.plaintext_transport or None, "tls_dir": args.tls_dir and str(args.tls_dir)}
    return {k: v for k, v in chosen.items() if v is not None}  # unset: the config file's or the default


def bench_secure_aggregation(args: argparse.Namespace) -> dict[str, Any] | None:
    import tempfile
    from pathlib import Path

    from medmpc.protocols.bench import Bench, run_bench
    from medmpc.protocols.plan import Plan

    plan = Plan(
        hospitals=args.hospitals,
        aggregators=args.aggregators,
        fractional_bits=args.fractional_bits,
        timeout_s=args.timeout,
        min_hospitals=args.min_hospitals,
        update_norm_bound=args.update_norm_bound,
        **_transport_overrides(args),
    )
    _log(f"starting {len(plan.party_names)} processes: {_STARTING}")
    with tempfile.TemporaryDirectory(prefix="medmpc-bench-") as tmp, _hosts(args.network, plan.party_names) as hosts:
        bench = Bench(params=args.params, repeat=args.repeat)
        result = run_bench(plan, bench, Path(tmp), hosts=hosts, deadline_s=args.timeout * (args.repeat + 1))
    result["network"] = args.network or "loopback"
    # with exclusions possible the aggregators' data-independent shares move from offline to the reveal
    result["deferred_shares"] = plan.exclusions_possible
    if args.json:
        return result
    allreduce = f", all-reduce {result['plaintext_s']:.3f} s" if "plaintext_s" in result else ""
    _log(
        f"{args.params:,} params, {args.hospitals} hospitals, {args.aggregators} aggregators, network "
        f"{result['network']}: secure {result['secure_s']:.3f} s, plaintext FedAvg {result['fedavg_s']:.3f} s "
        f"(ratio {result['ratio_fedavg']:.2f}){allreduce}, max error {result['max_abs_err']:.2e}; "
        + (
            f"norm check {result['norm_check_s']:.3f} s online, {result['norm_check_bytes'] / 1e6:.1f} MB and "
            f"{result['norm_check_rounds']:.0f} rounds per aggregator; "
            if plan.norm_checked
            else ""
        )
        + f"channels: {result['transport']}"
    )
    return None


def infer(args: argparse.Namespace) -> dict[str, Any] | None:
    from dataclasses import asdict

    from medmpc.protocols.inference import run_inference
    from medmpc.training.checkpoint import Checkpoint
    from medmpc.training.predictions import predictions

    ckpt = Checkpoint.load(args.model)
    images = ckpt.preprocessing.read(args.image)
    _log(f"starting the model owner, the data owner and the dealer: {_STARTING}")
    result = run_inference(
        str(args.model),
        images,
        timeout_s=args.timeout,
        device=args.device,
        plaintext_transport=args.plaintext_transport,
        nonlinear=args.nonlinear,
    )
    preds = predictions(args.image, result["logits"], ckpt.classes)
    if args.json:
        return {
            "predictions": [asdict(p) for p in preds],
            "model_trained_on_synthetic_data": ckpt.synthetic,
            **{k: result[k] for k in ("online_s", "offline_s", "rounds", "bytes", "transport")},
        }
    for pred in preds:
        _log(pred.describe())
    if ckpt.synthetic:
        _log(SYNTHETIC_MODEL)
    _log(
        f"online {result['online_s']:.2f} s, offline {result['offline_s']:.2f} s, "
        f"{result['rounds']} rounds, {result['bytes'] / 1e6:.1f} MB; channels: {result['transport']}"
    )
    return None


def bench_inference(args: argparse.Namespace) -> dict[str, Any] | None:
    import tempfile
    from pathlib import Path

    import torch

    from medmpc.imaging.transforms import Preprocessing
    from medmpc.mpc.launch import party_name
    from medmpc.protocols.inference import random_model_and_input, run_inference
    from medmpc.training.checkpoint import Checkpoint

    model, x = random_model_and_input(args.model, args.image_size, args.batch, args.seed)
    _log(f"starting the model owner, the data owner and the dealer: {_STARTING}")
    with (
        tempfile.TemporaryDirectory(prefix="medmpc-bench-") as tmp,
        _hosts(args.network, [party_name(r, 2) for r in range(3)]) as hosts,
    ):
        path = Path(tmp) / "model.pt"
        Checkpoint(
            args.model, ("normal", "bacterial", "viral"), Preprocessing(args.image_size, 0.5, 0.25), model.state_dict()
        ).save(path)
        result = run_inference(
            str(path),
            x,
            timeout_s=args.timeout,
            device=args.device,
            plaintext_transport=args.plaintext_transport,
            hosts=hosts,
            nonlinear=args.nonlinear,
        )
    with torch.no_grad():
        plain = model(x)
    out = {
        "model": args.model,
        "image_size": args.image_size,
        "batch": args.batch,
        "network": args.network or "loopback",
        **{k: result[k] for k in ("device", "nonlinear", "online_s", "offline_s", "rounds", "bytes", "key_bytes")},
        "transport": result["transport"],
        "max_abs_err": float((result["logits"] - plain).abs().max()),
        "argmax_agree": bool((result["logits"].argmax(1) == plain.argmax(1)).all()),
    }
    if args.json:
        return out
    _log(json.dumps(out, indent=2))
    return None


def _one_each(ports: list[int], error: str) -> tuple[int, int, int]:
    """The model owner's, the compute party's and the dealer's port, in that order."""
    if len(ports) != 3:
        raise ValueError(f"{error} (model owner, compute party, dealer)")
    return ports[0], ports[1], ports[2]


def _check_free(listeners: dict[str, tuple[str, int]]) -> None:
    """Fail at once, naming the listener, where an address is taken (a second ``serve`` would
    otherwise wait for its peers' rendezvous until its timeout)."""
    import socket

    for what, (host, port) in listeners.items():
        try:
            socket.create_server((host, port)).close()
        except OSError as err:
            raise ValueError(
                f"{what} address {host}:{port} is taken ({err.strerror}): is another `medmpc serve` running? "
                "choose other --ports / --parties"
            ) from err


def serve(args: argparse.Namespace) -> None:
    import time

    from medmpc.serving import party
    from medmpc.serving.launch import LocalService
    from medmpc.serving.options import service_argv

    ports = _one_each([int(p) for p in args.ports.split(",")], f"--ports takes three ports, got {args.ports!r}")
    parties = args.parties or ",".join(f"{args.host}:{29500 + rank}" for rank in range(3))
    addresses = [a.rpartition(":") for a in parties.split(",")]
    mpc_ports = _one_each([int(port) for _, _, port in addresses], f"--parties takes three HOST:PORT, got {parties!r}")
    if args.role != "all":
        if args.mpc_tls_dir is None and not args.plaintext_transport:
            raise ValueError("one role needs --mpc-tls-dir (from `medmpc pki`), or --plaintext-transport to measure")
        port = ports[party.ROLES[args.role]]
        _check_free({f"{args.role}'s HTTP": (args.host, port)})
        channels = ["--plaintext-transport"] if args.plaintext_transport else ["--mpc-tls-dir", str(args.mpc_tls_dir)]
        argv = [
            "--role",
            args.role,
            "--parties",
            parties,
            *channels,
            "--host",
            args.host,
            "--port",
            str(port),
            *service_argv(vars(args)),
        ]
        if args.model is not None:
            argv += ["--model", str(args.model)]
        party.main(argv)
        return
    _check_free(
        {f"{name}'s HTTP": (args.host, port) for name, port in zip(party.ROLES, ports)}
        | {f"{name}'s MPC channel": (host, port) for name, (host, _, _), port in zip(party.ROLES, addresses, mpc_ports)}
    )
    if args.model is None:
        raise ValueError("--model CKPT is needed to serve")
    if args.tokens_file is None and not party.load_tokens(None):
        raise ValueError("no client tokens configured: pass --tokens-file FILE or set MEDMPC_TOKENS")
    service = LocalService(
        args.model,
        args.tokens_file,
        host=args.host,
        ports=ports,
        mpc_ports=mpc_ports,
        plaintext_transport=args.plaintext_transport,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        share_timeout_s=args.share_timeout,
        request_timeout_s=args.request_timeout,
        per_client_queue=args.per_client_queue,
        peer_timeout_s=args.peer_timeout,
        max_body_mb=args.max_body_mb,
        log_dir=args.log_dir,
    )
    _log(f"starting the model owner, the compute party and the dealer: {_STARTING}")
    with service:
        _log(
            f"serving {args.model}: model owner {service.urls[0]}, compute party {service.urls[1]} "
            f"(OpenAPI docs at /docs); party logs in {args.log_dir}; Ctrl-C stops"
        )
        try:
            while True:
                service.check_alive()
                time.sleep(1)
        except KeyboardInterrupt:
            _log("stopping")


def _prediction_client(args: argparse.Namespace) -> PredictionClient:
    """The service's client from --servers, --token-file (else $MEDMPC_TOKEN), --ca-cert and --insecure-http."""
    import os

    from medmpc.serving.client import PredictionClient

    lines = args.token_file.read_text().split() if args.token_file else [os.environ.get("MEDMPC_TOKEN", "").strip()]
    if len(lines) > 1:
        raise ValueError(f"{args.token_file} holds {len(lines)} tokens; a client sends one: keep it alone in the file")
    token = lines[0] if lines else ""
    if not token:
        raise ValueError("no bearer token: pass --token-file FILE or set MEDMPC_TOKEN")
    servers = [s for s in args.servers.split(",") if s]
    verify = str(args.ca_cert) if args.ca_cert else True
    return PredictionClient(servers, token, timeout_s=args.timeout, verify=verify, allow_plain_http=args.insecure_http)


def predict(args: argparse.Namespace) -> dict[str, Any] | None:
    from dataclasses import asdict

    if (args.servers is None) == (args.model is None):
        raise ValueError("pass --servers URL1,URL2 (the encrypted service) or --model CKPT (this machine), not both")
    if args.model is not None:
        predictions, synthetic = _predict_here(args.model, args.image)
    else:
        with _prediction_client(args) as client:
            if args.wait_ready:
                client.wait_ready(args.wait_ready)
            predictions = client.predict_files(args.image)
            synthetic = client.card().synthetic
    if args.json:
        return {"predictions": [asdict(p) for p in predictions], "model_trained_on_synthetic_data": synthetic}
    for pred in predictions:
        _log(pred.describe())
    if synthetic:
        _log(SYNTHETIC_MODEL)
    return None


def _predict_here(model: Path, images: list[Path]) -> tuple[list[Prediction], bool]:
    """Plaintext predictions of a checkpoint on this machine, and whether it was trained on synthetic images."""
    from medmpc.training.checkpoint import Checkpoint
    from medmpc.training.predictions import plaintext_logits, predictions

    ckpt = Checkpoint.load(model)
    return predictions(images, plaintext_logits(ckpt, images), ckpt.classes), ckpt.synthetic


def clinic(args: argparse.Namespace) -> None:
    import socket

    import uvicorn

    from medmpc.serving.clinic import Clinic
    from medmpc.serving.options import is_loopback

    if not is_loopback(args.host):
        raise ValueError(
            f"--host {args.host}: the clinic page serves this machine only (a loopback address such as 127.0.0.1); "
            "run it on each clinician's machine"
        )
    try:  # here, at once, rather than after the page is announced
        listener = socket.create_server((args.host, args.port))
    except OSError as err:
        raise ValueError(f"the clinic page cannot listen at {args.host}:{args.port}: {err.strerror}") from err
    port = listener.getsockname()[1]
    names = {args.host, "localhost", "127.0.0.1", "[::1]"}
    with _prediction_client(args) as client:
        page = Clinic(
            client, allowed_hosts={f"{n}:{port}" for n in names}, max_upload_bytes=int(args.max_upload_mb * 2**20)
        )
        _log(
            f"clinic page at http://{args.host}:{port}/?key={page.key} (open it in this machine's browser; "
            f"predictions by {' and '.join(client.servers)}); Ctrl-C stops"
        )
        server = uvicorn.Server(uvicorn.Config(page.app, log_level="warning"))
        server.run(sockets=[listener])


def pki_init(args: argparse.Namespace) -> None:
    from medmpc.mpc import pki

    parties = [
        "coordinator",
        *(f"hospital{i}" for i in range(args.hospitals)),
        *(f"aggregator{j}" for j in range(args.aggregators)),
    ]
    pki.init_federation(args.out, parties, days=args.days)
    _log(
        f"federation CA and {len(parties)} party certificates in {args.out}: give each party ca.pem, crl.pem "
        "and its own PARTY.pem/.key only; keep ca.key offline"
    )


def pki_issue(args: argparse.Namespace) -> None:
    from medmpc.mpc import pki

    pki.issue(args.dir, args.party, days=args.days, addresses=args.address)
    also = f" (also HTTPS at {', '.join(args.address)})" if args.address else ""
    _log(f"issued {args.dir / (args.party + '.pem')}{also}")


def pki_revoke(args: argparse.Namespace) -> None:
    from medmpc.mpc import pki

    pki.revoke(args.dir, args.party)
    _log(f"revoked {args.party}: copy {args.dir / pki.CRL} to every party")
