"""Load test of the encrypted prediction service.

Starts the three service parties, then for each concurrency C runs C client threads that each
send M single-image requests, and reports throughput and latency percentiles:

    .venv/bin/python -m benchmarks.load_service --random-model cnn --image-size 64 \\
        --concurrency 1,4,16 --requests 4

On loopback by default. ``--network lan|wan`` (as root) puts each party and the client on a host
of its own (``medmpc.netlab``), with HTTPS between client and parties. ``--paced`` sends each
request only once the service has prepared the dealer's material for it (what a client of a
service that keeps up sees): the latency is then the online phase alone, and the rows also give
the parties' own timings from their logs (``online_s`` per batch, ``prepare_s`` per preparation).

Results are printed as JSON lines and merged into benchmarks/results/service_load.json (unless
``--no-record``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks import record
from medmpc.imaging.transforms import Preprocessing
from medmpc.mpc import pki
from medmpc.netlab import hosts as netlab
from medmpc.netlab.profiles import PROFILES
from medmpc.protocols.inference import random_model_and_input
from medmpc.serving.client import PredictionClient
from medmpc.serving.launch import HOSTS, LocalService
from medmpc.training.checkpoint import Checkpoint

CLIENT = "client"  # the load's host, beside the parties' HOSTS


def run_load(
    client: PredictionClient,
    images: torch.Tensor,
    concurrency: int,
    requests: int,
    *,
    before_each: Callable[[], None] = lambda: None,
) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    bar = tqdm(total=concurrency * requests, desc=f"C={concurrency}", unit="req")

    def worker(k: int) -> None:
        for i in range(requests):
            x = images[(k * requests + i) % len(images)][None]
            before_each()
            start = time.perf_counter()
            try:
                client.logits(x)
            except Exception as err:  # counted and reported, never hidden
                with lock:
                    errors.append(str(err))
            else:
                with lock:
                    latencies.append(time.perf_counter() - start)
            bar.update()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    bar.close()
    lat = torch.tensor(latencies or [float("nan")])
    return {
        "concurrency": concurrency,
        "requests": concurrency * requests,
        "errors": len(errors),
        "throughput_rps": len(latencies) / elapsed,
        "p50_s": float(lat.quantile(0.5)),
        "p95_s": float(lat.quantile(0.95)),
        "elapsed_s": elapsed,
        "first_error": errors[0] if errors else None,
    }


def _events(svc: LocalService) -> list[dict]:
    """The model owner's log events so far, in order (the parties prepare and compute in step)."""
    found = []
    for line in svc.log_file("model-owner").read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a library's own output between the records
        if isinstance(rec, dict) and "event" in rec:
            found.append(rec)
    return found


def _of(records: list[dict], event: str) -> list[dict]:
    return [r for r in records if r["event"] == event]


def _wait_prepared(svc: LocalService, timeout_s: float) -> None:
    """Until the service has prepared one more batch than it has computed (it prepares while idle)."""
    deadline = time.monotonic() + timeout_s
    while len(_of(events := _events(svc), "prepared")) <= len(_of(events, "batch")):
        svc.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the service prepared nothing within {timeout_s:.0f} s; see {svc.log_file('dealer')}")
        time.sleep(0.5)


def _party_timings(svc: LocalService, skip_batches: int) -> dict:
    """Median seconds of the model owner's batches after the first ``skip_batches``, and of its preparations."""
    events = _events(svc)
    batches = [e["seconds"] for e in _of(events, "batch")[skip_batches:]]
    prepared = [e["seconds"] for e in _of(events, "prepared")]
    return {
        "online_s": statistics.median(batches) if batches else None,
        "prepare_s": statistics.median(prepared) if prepared else None,
    }


def _on_hosts(a: argparse.Namespace) -> None:
    """Run this script again on the client's host of a fresh network, which it gives to that run."""
    reason = netlab.unavailable(PROFILES[a.network])
    if reason is not None:
        sys.exit(f"--network {a.network}: {reason}")
    with netlab.Network([*HOSTS, CLIENT], profile=a.network) as net:
        print(f"network {net.profile.describe()}: " + ", ".join(f"{h} at {net.address(h)}" for h in net.hosts))
        argv = [
            sys.executable,
            "-m",
            "benchmarks.load_service",
            *sys.argv[1:],
            "--placement",
            json.dumps(net.placement()),
        ]
        done = net.run(CLIENT, argv)
    sys.exit(done.returncode)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint to serve")
    p.add_argument("--random-model", help="serve random weights of this registry model instead (e.g. cnn, resnet18)")
    p.add_argument("--image-size", type=int, default=64, help="with --random-model")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--nonlinear", choices=("fss", "bit-sliced"), default="fss")
    p.add_argument("--network", choices=sorted(PROFILES), help="each party and the client on a host of its own")
    p.add_argument("--paced", action="store_true", help="each request once the service has prepared it (one client)")
    p.add_argument("--peer-timeout", type=float, default=600.0, help="seconds a party waits for a peer's message")
    p.add_argument("--record", action=argparse.BooleanOptionalAction, default=True, help="merge into results/")
    p.add_argument("--placement", help=argparse.SUPPRESS)  # set by --network for the run on the client's host
    a = p.parse_args()
    if (a.model is None) == (a.random_model is None):
        p.error("give exactly one of --model and --random-model")
    if a.paced and a.concurrency != "1":
        p.error("--paced measures one client at a time: give --concurrency 1")
    if a.network and a.placement is None:
        _on_hosts(a)
    hosts = netlab.Placed(json.loads(a.placement)) if a.placement else None
    with tempfile.TemporaryDirectory(prefix="medmpc-load-") as tmp:
        checkpoint = a.model
        if a.random_model:
            model, _ = random_model_and_input(a.random_model, a.image_size, 1, 0)
            checkpoint = Path(tmp) / "model.pt"
            Checkpoint(
                a.random_model,
                ("normal", "bacterial", "viral"),
                Preprocessing(a.image_size, 0.5, 0.25),
                model.state_dict(),
            ).save(checkpoint)
        token = uuid.uuid4().hex
        tokens = Path(tmp) / "tokens"
        tokens.write_text(token)
        card = Checkpoint.load(checkpoint)
        name = f"{card.model_name} {card.preprocessing.image_size}px max_batch {a.max_batch} {a.nonlinear}"
        if a.network:
            name += f" {a.network}"
        if a.paced:
            name += " paced"
        images = torch.randn(
            32,
            1,
            card.preprocessing.image_size,
            card.preprocessing.image_size,
            generator=torch.Generator().manual_seed(0),
        )
        # HTTPS between the client and parties on other hosts, as a deployment has it
        cert, key = pki.self_signed(Path(tmp) / "https", [hosts.address(h) for h in HOSTS]) if hosts else (None, None)
        # one token carries the whole load here, so it may fill the queue alone
        with LocalService(
            checkpoint,
            tokens,
            hosts=hosts,
            tls_cert=cert,
            tls_key=key,
            max_batch=a.max_batch,
            per_client_queue=LocalService.max_queue,
            request_timeout_s=3600,
            share_timeout_s=60,
            peer_timeout_s=a.peer_timeout,
            nonlinear=a.nonlinear,
        ) as svc:
            paced = (lambda: _wait_prepared(svc, 3600)) if a.paced else (lambda: None)
            with PredictionClient(svc.urls, token, timeout_s=3600, verify=str(cert) if cert else True) as client:
                paced()
                client.logits(images[:1])  # warm-up
                rows = []
                for c in map(int, a.concurrency.split(",")):
                    row = {"service": name, **run_load(client, images, c, a.requests, before_each=paced)}
                    if a.paced:
                        row.update(_party_timings(svc, skip_batches=1))
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    if a.record:
        record("service_load", {f"{name} C={r['concurrency']}": r for r in rows})


if __name__ == "__main__":
    main()
