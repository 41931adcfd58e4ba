"""The protocols with every party on its own host (``netlab`` namespaces), per network profile.

Each measurement sits beside the profile's simple model, compute + rounds x RTT/2 + bytes /
bandwidth (``netlab.profiles.Profile.predict``), where compute is the same case with the links
unshaped, rounds the sequential message rounds (one one-way latency each) and bytes what the
busiest host's link carries in its busier direction. Results go to
``benchmarks/results/network.json``. Choose profiles with MEDMPC_BENCH_NETWORKS (default
"lan,wan") and cases with -k, e.g.

    .venv/bin/python -m pytest benchmarks/test_network.py --benchmark-only -k "inference and 224-1 and wan"
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from benchmarks import record
from medmpc.imaging.transforms import Preprocessing
from medmpc.mpc.launch import party_name, run_crypten_job
from medmpc.netlab.hosts import Network, unavailable
from medmpc.netlab.profiles import profile
from medmpc.protocols.inference import random_model_and_input, run_inference
from medmpc.training.checkpoint import Checkpoint

pytestmark = [
    pytest.mark.skipif(unavailable() is not None, reason=f"no separate hosts here: {unavailable()}"),
    pytest.mark.timeout(3 * 3600),  # stock CrypTen at 224 px, batch 8: about 15 minutes on lan
]

NETWORKS = os.environ.get("MEDMPC_BENCH_NETWORKS", "lan,wan").split(",")
PARAMS = int(os.environ.get("MEDMPC_BENCH_PARAMS", 11_200_000))
CRYPTEN_HOSTS = [party_name(rank, 2) for rank in range(3)]
_unshaped: dict[str, dict] = {}  # compute-only runs, measured once per case


def _medmpc(*args: object) -> dict:
    cmd = [sys.executable, "-m", "medmpc.cli.main", *map(str, args), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _busiest(traffic: dict[str, dict[str, int]]) -> int:
    return max(max(t["bytes_sent"], t.get("bytes_received", 0)) for t in traffic.values())


def _compute(key: str, measure) -> dict:
    if key not in _unshaped:
        _unshaped[key] = measure("unshaped")
    return _unshaped[key]


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("hospitals", [3, 10])
def test_secure_aggregation_against_fedavg(benchmark, hospitals, network):
    """11.2M values, K = 2, TLS: one secure aggregation against plaintext FedAvg to the coordinator."""

    def measure(net: str) -> dict:
        return _medmpc("bench", "secure-aggregation", "--params", PARAMS, "--hospitals", hospitals,
                       "--repeat", 3, "--network", net, "--timeout", 900)  # fmt: skip

    result = benchmark.pedantic(measure, args=(network,), rounds=1, iterations=1)
    base = _compute(f"aggregation {hospitals}", measure)
    p = profile(network)
    # the collector takes every hospital's share in, then sends its share of the average to the
    # coordinator (the other aggregator's share, made from seeds alone, goes meanwhile); FedAvg:
    # the coordinator takes every plaintext update in
    share_in = sum(b for party, b in result["bytes_per_party"].items() if party.startswith("hospital"))
    secure_link = share_in + result["bytes_per_party"]["aggregator0"]
    update_in = sum(b for party, b in result["fedavg_bytes_per_party"].items() if party.startswith("hospital"))
    row = {
        "network": p.describe(),
        **{k: result[k] for k in ("secure_s", "fedavg_s", "ratio_fedavg", "offline_s", "max_abs_err")},
        "bytes_per_party": result["bytes_per_party"],
        "collector_bytes_in": share_in,
        "coordinator_bytes_in_fedavg": update_in,
        # request, shares in, reveal, result out: 4 one-way trips; FedAvg: request, update back
        "secure_model_s": p.predict(compute_s=base["secure_s"], rounds=4, bytes_sent=secure_link),
        "fedavg_model_s": p.predict(compute_s=base["fedavg_s"], rounds=2, bytes_sent=update_in),
        "unshaped_secure_s": base["secure_s"],
        "unshaped_fedavg_s": base["fedavg_s"],
    }
    benchmark.extra_info.update(row)
    record("network", {f"secure aggregation {PARAMS / 1e6:.1f}M N={hospitals} K=2 on {network}": row})


def _ours(model: torch.nn.Module, x: torch.Tensor, hosts: Network) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        Checkpoint(
            "resnet18", ("normal", "bacterial", "viral"), Preprocessing(x.shape[-1], 0.5, 0.25), model.state_dict()
        ).save(path)
        return run_inference(str(path), x, timeout_s=3600, hosts=hosts)


def _stock(size: int, batch: int, hosts: Network) -> dict:
    args = {"model_name": "resnet18", "image_size": size, "batch": batch, "seed": 0}
    return run_crypten_job(
        "benchmarks.stock_crypten:stock_forward", world_size=2, args=args, timeout_s=7200, hosts=hosts
    )[1]


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("size,batch", [(64, 1), (64, 8), (224, 1), (224, 8)])
def test_encrypted_resnet18_against_stock_crypten(benchmark, size, batch, network):
    """Both engines with model owner, data owner and dealer on three hosts. Stock CrypTen at 224 px,
    batch 8 sends 15.5 GB each way per party, over half an hour on wan: there it runs only with
    MEDMPC_BENCH_STOCK_224_8=1."""
    model, x = random_model_and_input("resnet18", size, batch, 0)
    plain = model(x).detach()
    slow = (size, batch, network) == (224, 8, "wan")
    with_stock = not slow or os.environ.get("MEDMPC_BENCH_STOCK_224_8") == "1"

    def measure(net: str) -> dict:
        with Network(CRYPTEN_HOSTS, profile=net) as hosts:
            return {"ours": _ours(model, x, hosts), "stock": _stock(size, batch, hosts) if with_stock else None}

    runs = benchmark.pedantic(measure, args=(network,), rounds=1, iterations=1)
    base = _compute(f"inference {size}-{batch}, stock: {with_stock}", measure)
    p = profile(network)
    row: dict = {"network": p.describe()}
    for engine, run in runs.items():
        if run is None:
            continue
        row[engine] = {
            "online_s": run["online_s"],
            "rounds": run["rounds"],
            "bytes_sent_and_received_per_party": run["bytes"],
            "max_abs_err": float((run["logits"] - plain).abs().max()),
            "unshaped_online_s": base[engine]["online_s"],
            # CrypTen counts what a party sends and what it receives: half of it each way
            "model_s": p.predict(compute_s=base[engine]["online_s"], rounds=run["rounds"], bytes_sent=run["bytes"] / 2),
        }
    if runs["stock"] is not None:
        row["speedup_online"] = runs["stock"]["online_s"] / runs["ours"]["online_s"]
    assert row["ours"]["max_abs_err"] < 0.05
    benchmark.extra_info.update(row)
    record("network", {f"resnet18 {size}px batch {batch} on {network}": row})


@pytest.mark.parametrize("network", ["wan"])
def test_federated_round_secure_against_plaintext(benchmark, network, tmp_path):
    """Wall time of a federated round (3 hospitals, 64 px CNN, the same local training), rounds 2-4."""
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray" / "train"
    common = ["--hospitals", 3, "--rounds", 4, "--model", "cnn", "--image-size", 64, "--network", network]
    common += ["--data", data if data.exists() else "synthetic"]

    def run(*extra: object) -> list[dict]:
        subprocess.run([sys.executable, "-m", "medmpc.cli.main", "simulate", *map(str, common), *map(str, extra)],
                       check=True, capture_output=True, timeout=3600)  # fmt: skip
        return json.loads((Path(str(extra[-1])) / "report.json").read_text())["rounds"]

    secure = benchmark.pedantic(run, args=("--out", tmp_path / "secure"), rounds=1, iterations=1)
    plain = run("--plaintext", "--out", tmp_path / "plain")
    wall = {
        name: statistics.median(r["wall_s"] for r in rounds[1:])
        for name, rounds in (("secure", secure), ("plaintext", plain))
    }
    row = {
        "network": profile(network).describe(),
        "secure_round_s": wall["secure"],
        "plaintext_round_s": wall["plaintext"],
        "ratio": wall["secure"] / wall["plaintext"],
        "local_training_s": {
            n: statistics.median(r["local_training_s"] for r in rounds[1:])
            for n, rounds in (("secure", secure), ("plaintext", plain))
        },
        "busiest_link_bytes": {"secure": _busiest(secure[1]["traffic"]), "plaintext": _busiest(plain[1]["traffic"])},
    }
    benchmark.extra_info.update(row)
    record("network", {f"federated round, 3 hospitals, 64px CNN, on {network}": row})
