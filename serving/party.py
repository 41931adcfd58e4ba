"""One party of the prediction service: ``python -m medmpc.serving.party --role ROLE ...``.

Roles: ``model-owner`` (CrypTen rank 0, holds the checkpoint), ``compute`` (rank 1,
holds no weights: it receives the public model card from the model owner and
builds the same architecture), and ``dealer`` (CrypTen's TTP: correlated
randomness only). Every party has its own HTTP port and its own CrypTen address (mutually
authenticated TLS between the three, mpc.tls_communicator), so one party per machine works
as well (PARTIES=10.0.0.1:29500,10.0.0.2:29500,10.0.0.3:29500, model owner, compute, dealer;
federation/ holds ca.pem, crl.pem and the party's own key: party0, party1 or dealer):

    python -m medmpc.serving.party --role dealer      --parties $PARTIES --mpc-tls-dir federation/ --port 8002
    python -m medmpc.serving.party --role model-owner --parties $PARTIES --mpc-tls-dir federation/ --port 8000 \\
        --model model.pt
    python -m medmpc.serving.party --role compute     --parties $PARTIES --mpc-tls-dir federation/ --port 8001

Client tokens come from ``--tokens-file`` (one per line) or ``MEDMPC_TOKENS`` (comma-separated).
"""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path

import torch

from medmpc.models import architecture
from medmpc.mpc import comparison, crypten_compat
from medmpc.mpc.compile import compile_model
from medmpc.mpc.party import add_channel_args, channel_env
from medmpc.serving.app import compute_app, health_app
from medmpc.serving.engine import LEADER, BatchEngine, Model
from medmpc.serving.logs import log
from medmpc.serving.options import add_service_options, is_loopback
from medmpc.serving.wire import ModelCard
from medmpc.training.checkpoint import Checkpoint

ROLES = {"model-owner": 0, "compute": 1, "dealer": 2}


def load_tokens(tokens_file: Path | None) -> list[str]:
    if tokens_file is not None:
        lines = tokens_file.read_text().splitlines()
    else:
        lines = os.environ.get("MEDMPC_TOKENS", "").split(",")
    return [t.strip() for t in lines if t.strip()]


def _setup(rank: int, ckpt: Checkpoint | None, max_batch: int, timeout_s: float) -> Model:
    """Join the CrypTen parties, agree on the model card, compile, and share the weights."""
    crypten = crypten_compat.init_party(timeout_s=timeout_s)
    if ckpt is not None:
        prep = ckpt.preprocessing
        program = compile_model(ckpt.build(), input_range=prep.valid_range())
        card = ModelCard(
            ckpt.model_name,
            ckpt.classes,
            1,
            prep.image_size,
            prep.mean,
            prep.std,
            program.precision.activations,
            max_batch,
            synthetic=ckpt.synthetic,
        )
    else:
        card, program = None, None
    card = ModelCard.from_dict(crypten.communicator.get().broadcast_obj(card and card.to_dict(), LEADER))
    if program is None:  # the public architecture, never its weights
        program = compile_model(architecture(card.model_name, len(card.classes)))
    program.publish_bounds(src=LEADER)
    theirs = crypten.communicator.get().broadcast_obj(comparison.nonlinear(), LEADER)
    if theirs != comparison.nonlinear():
        raise ValueError(
            f"the model owner runs --nonlinear {theirs}, this party {comparison.nonlinear()}: start both alike"
        )
    return Model(card, program, program.share_parameters(src=LEADER))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m medmpc.serving.party", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--role", choices=sorted(ROLES), required=True)
    add_channel_args(p)
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    p.add_argument("--port", type=int, required=True, help="HTTP port of this party")
    p.add_argument("--model", type=Path, help="checkpoint (model owner only)")
    add_service_options(p)
    a = p.parse_args(argv)
    if (a.tls_cert is None) != (a.tls_key is None):
        p.error("--tls-cert and --tls-key go together")
    if a.tls_cert is None and not is_loopback(a.host):
        p.error(f"refusing to serve plain HTTP on {a.host}, which is not loopback: give --tls-cert and --tls-key")
    if a.role == "model-owner" and a.model is None:
        p.error("the model owner needs --model CKPT")
    if a.max_batch < 1 or a.max_queue < 1 or (a.per_client_queue is not None and a.per_client_queue < 1):
        p.error("--max-batch, --max-queue and --per-client-queue must be at least 1")
    if a.nonlinear not in comparison.NONLINEAR:
        p.error(f"--nonlinear must be one of {', '.join(comparison.NONLINEAR)}, got {a.nonlinear!r}")
    comparison.configure(nonlinear=a.nonlinear)

    rank = ROLES[a.role]
    ckpt = Checkpoint.load(a.model) if rank == LEADER else None  # a bad checkpoint fails here, before serving
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", **channel_env(a))
    torch.set_num_threads(max(1, int(os.environ.get("MEDMPC_THREADS", "1"))))
    if a.role == "dealer":
        failure: list[str] = []

        def deal() -> None:
            try:
                crypten_compat.run_dealer(timeout_s=a.peer_timeout)
            except Exception as err:  # a party vanished: report it on /ready
                failure.append(f"{type(err).__name__}: {err}")
                log("dealer_failed", error=failure[0])

        thread = threading.Thread(target=deal, name="dealer", daemon=True)
        app = health_app("dealer", lambda: (thread.is_alive(), failure[0] if failure else "dealing"))
    else:
        tokens = load_tokens(a.tokens_file)
        engine = BatchEngine(
            rank=rank,
            max_batch=a.max_batch,
            max_queue=a.max_queue,
            per_client_queue=a.per_client_queue,
            heartbeat_s=min(5.0, a.peer_timeout / 4),
        )
        app = compute_app(
            a.role,
            engine,
            tokens=tokens,
            share_timeout_s=a.share_timeout,
            request_timeout_s=a.request_timeout,
            max_body_bytes=int(a.max_body_mb * 2**20),
        )
        thread = threading.Thread(
            target=engine.run,
            args=(lambda: _setup(rank, ckpt, a.max_batch, a.peer_timeout),),
            name="engine",
            daemon=True,
        )
    thread.start()
    log("listening", role=a.role, host=a.host, port=a.port, tls=a.tls_cert is not None)

    import uvicorn

    uvicorn.run(
        app,
        host=a.host,
        port=a.port,
        ssl_certfile=a.tls_cert,
        ssl_keyfile=a.tls_key,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
