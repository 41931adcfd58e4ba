"""Load test of the encrypted prediction service on loopback.

Starts the three service parties as local processes, then for each concurrency C runs C client
threads that each send M single-image requests, and reports throughput and latency percentiles:

    .venv/bin/python -m benchmarks.load_service --random-model cnn --image-size 64 \\
        --concurrency 1,4,16 --requests 4

Results are printed as JSON lines and merged into benchmarks/results/service_load.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks import record
from medmpc.imaging.transforms import Preprocessing
from medmpc.protocols.inference import random_model_and_input
from medmpc.serving.client import PredictionClient
from medmpc.serving.launch import LocalService
from medmpc.training.checkpoint import Checkpoint


def run_load(client: PredictionClient, images: torch.Tensor, concurrency: int, requests: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    bar = tqdm(total=concurrency * requests, desc=f"C={concurrency}", unit="req")

    def worker(k: int) -> None:
        for i in range(requests):
            x = images[(k * requests + i) % len(images)][None]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint to serve")
    p.add_argument("--random-model", help="serve random weights of this registry model instead (e.g. cnn, resnet18)")
    p.add_argument("--image-size", type=int, default=64, help="with --random-model")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--nonlinear", choices=("fss", "bit-sliced"), default="fss")
    a = p.parse_args()
    if (a.model is None) == (a.random_model is None):
        p.error("give exactly one of --model and --random-model")
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
        images = torch.randn(
            32,
            1,
            card.preprocessing.image_size,
            card.preprocessing.image_size,
            generator=torch.Generator().manual_seed(0),
        )
        # one token carries the whole load here, so it may fill the queue alone
        with LocalService(
            checkpoint,
            tokens,
            max_batch=a.max_batch,
            per_client_queue=LocalService.max_queue,
            request_timeout_s=600,
            share_timeout_s=60,
            nonlinear=a.nonlinear,
        ) as svc:
            with PredictionClient(svc.urls, token, timeout_s=600) as client:
                client.logits(images[:1])  # warm-up
                rows = []
                for c in map(int, a.concurrency.split(",")):
                    row = {"service": name, **run_load(client, images, c, a.requests)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    record("service_load", {f"{name} C={r['concurrency']}": r for r in rows})


if __name__ == "__main__":
    main()
