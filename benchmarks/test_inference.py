"""Our encrypted engine against stock CrypTen 0.4.1 on the same model, input and machine.

ResNet-18 (random weights, non-trivial BatchNorm statistics), two parties plus a
dealer (TTP) over loopback, one thread per party, both engines in the same run.
Results go to benchmarks/results/inference.json. Select sizes with -k, e.g.

    .venv/bin/python -m pytest benchmarks/test_inference.py --benchmark-only -k "64-1"
"""

import tempfile
from pathlib import Path

import pytest
import torch

from benchmarks import record
from medmpc.imaging.transforms import Preprocessing
from medmpc.mpc.launch import run_crypten_job
from medmpc.protocols.inference import random_model_and_input, run_inference
from medmpc.training.checkpoint import Checkpoint


def _ours(model: torch.nn.Module, x: torch.Tensor, device: str = "cpu", plaintext_transport: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        Checkpoint(
            "resnet18", ("normal", "bacterial", "viral"), Preprocessing(x.shape[-1], 0.5, 0.25), model.state_dict()
        ).save(path)
        return run_inference(str(path), x, timeout_s=3600, device=device, plaintext_transport=plaintext_transport)


def _stock(size: int, batch: int, **options) -> dict:
    args = {"model_name": "resnet18", "image_size": size, "batch": batch, "seed": 0, **options}
    return run_crypten_job("benchmarks.stock_crypten:stock_forward", world_size=2, args=args, timeout_s=3600)[1]


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("size", [64, 128, 224])
def test_encrypted_resnet18_vs_stock_crypten(benchmark, size, batch):
    model, x = random_model_and_input("resnet18", size, batch, 0)
    plain = model(x).detach()
    ours = benchmark.pedantic(_ours, args=(model, x), rounds=1, iterations=1)
    stock = _stock(size, batch)
    result = {
        "ours_online_s": ours["online_s"],
        "ours_offline_s": ours["offline_s"],
        "ours_rounds": ours["rounds"],
        "ours_bytes": ours["bytes"],
        "ours_max_abs_err": float((ours["logits"] - plain).abs().max()),
        "stock_online_s": stock["online_s"],
        "stock_rounds": stock["rounds"],
        "stock_bytes": stock["bytes"],
        "stock_max_abs_err": float((stock["logits"] - plain).abs().max()),
        "speedup_online": stock["online_s"] / ours["online_s"],
    }
    assert result["ours_max_abs_err"] < 0.05
    benchmark.extra_info.update(result)
    record("inference", {f"resnet18 {size}px batch {batch}": result})


def test_what_tls_costs_encrypted_resnet18_at_224px(benchmark):
    """The same inference over the parties' mutually authenticated TLS channels and over plain TCP
    (measurement only), alternating, three times each."""
    model, x = random_model_and_input("resnet18", 224, 1, 0)
    runs: dict[str, list[dict]] = {"tls": [], "plaintext": []}
    for _ in range(3):
        runs["tls"].append(_ours(model, x))
        runs["plaintext"].append(_ours(model, x, plaintext_transport=True))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    online = {k: sorted(r["online_s"] for r in v) for k, v in runs.items()}
    result = {
        "tls_online_s": online["tls"],
        "plaintext_online_s": online["plaintext"],
        "tls_overhead_median": online["tls"][1] / online["plaintext"][1] - 1,
        "bytes": runs["tls"][0]["bytes"],
        "rounds": runs["tls"][0]["rounds"],
    }
    benchmark.extra_info.update(result)
    record("inference", {"resnet18 224px batch 1: TLS against plaintext channels": result})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_encrypted_resnet18_on_gpu_vs_stock_crypten(benchmark):
    """224 px, one image: both engines on the GPU and on the CPU of the same machine, and stock
    CrypTen with its own CUDA convolution (the one that is off by ~1e8)."""
    model, x = random_model_and_input("resnet18", 224, 1, 0)
    plain = model(x).detach()
    runs = {
        "ours_cuda": benchmark.pedantic(_ours, args=(model, x, "cuda"), rounds=1, iterations=1),
        "ours_cpu": _ours(model, x),
        "stock_cuda_exact_conv": _stock(224, 1, device="cuda"),
        "stock_cuda_crypten_conv": _stock(224, 1, device="cuda", crypten_cuda_conv=True),
        "stock_cpu": _stock(224, 1),
    }
    result = {
        name: {"online_s": r["online_s"], "max_abs_err": float((r["logits"] - plain).abs().max())}
        for name, r in runs.items()
    }
    result["speedup_online_vs_stock_cuda"] = runs["stock_cuda_exact_conv"]["online_s"] / runs["ours_cuda"]["online_s"]
    result["speedup_online_vs_stock_cpu"] = runs["stock_cpu"]["online_s"] / runs["ours_cuda"]["online_s"]
    assert result["ours_cuda"]["max_abs_err"] < 0.05
    benchmark.extra_info.update(result)
    record("inference", {f"resnet18 224px batch 1 gpu ({torch.cuda.get_device_name()})": result})
