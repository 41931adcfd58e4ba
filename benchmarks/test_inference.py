"""Our encrypted engine against stock CrypTen 0.4.1 on the same model, input and machine.

ResNet-18 (random weights, non-trivial BatchNorm statistics), two parties plus a
dealer (TTP) over loopback, one thread per party, both of our protocols for the non-linear
layers (``--nonlinear fss`` and ``bit-sliced``) and stock CrypTen in the same run.
Results go to benchmarks/results/inference.json. Select sizes with -k, e.g.

    .venv/bin/python -m pytest benchmarks/test_inference.py --benchmark-only -k "64-1"
"""

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from benchmarks import RESULTS_DIR, record
from medmpc.imaging.transforms import Preprocessing
from medmpc.mpc.launch import run_crypten_job
from medmpc.protocols.inference import random_model_and_input, run_inference
from medmpc.training.checkpoint import Checkpoint


def _ours(
    model: torch.nn.Module,
    x: torch.Tensor,
    device: str = "cpu",
    plaintext_transport: bool = False,
    nonlinear: str = "fss",
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        Checkpoint(
            "resnet18", ("normal", "bacterial", "viral"), Preprocessing(x.shape[-1], 0.5, 0.25), model.state_dict()
        ).save(path)
        return run_inference(
            str(path), x, timeout_s=3600, device=device, plaintext_transport=plaintext_transport, nonlinear=nonlinear
        )


def _stock(size: int, batch: int, **options) -> dict:
    args = {"model_name": "resnet18", "image_size": size, "batch": batch, "seed": 0, **options}
    return run_crypten_job("benchmarks.stock_crypten:stock_forward", world_size=2, args=args, timeout_s=3600)[1]


# the dealer holds both parties' keys while it sends them, each party its own: about three times one
# party's key bytes are in memory at once, and must stay below this share of the machine's
KEY_MEMORY_SHARE = 0.6


def _keys_fit(size: int, batch: int) -> tuple[bool, float]:
    """Whether the one-round gates' keys for ``batch`` images fit this machine, from the per-image
    key bytes this run measured at batch 1 (the keys grow linearly with the batch)."""
    row = json.loads((RESULTS_DIR / "inference.json").read_text()).get(f"resnet18 {size}px batch 1", {})
    per_image = row.get("fss", {}).get("key_bytes")
    if per_image is None or batch == 1:
        return True, float(per_image or 0) * batch
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 3 * per_image * batch < KEY_MEMORY_SHARE * memory, float(per_image * batch)


def _summary(run: dict, plain: torch.Tensor) -> dict:
    keep = ("online_s", "offline_s", "rounds", "bytes", "key_bytes")
    return {k: run[k] for k in keep} | {"max_abs_err": float((run["logits"] - plain).abs().max())}


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("size", [64, 128, 224])
def test_encrypted_resnet18_vs_stock_crypten(benchmark, size, batch):
    """Both of our protocols for the non-linear layers (the dealer's one-round keys and the
    bit-sliced comparison) and stock CrypTen, on one model and input in one run."""
    model, x = random_model_and_input("resnet18", size, batch, 0)
    plain = model(x).detach()
    fits, key_bytes = _keys_fit(size, batch)
    result: dict = {}
    if fits:
        fss = benchmark.pedantic(_ours, args=(model, x), kwargs={"nonlinear": "fss"}, rounds=1, iterations=1)
        result["fss"] = _summary(fss, plain)
        sliced = _ours(model, x, nonlinear="bit-sliced")
    else:
        result["fss"] = {"skipped": f"keys of {key_bytes / 1e9:.1f} GB per party do not fit this machine"}
        sliced = benchmark.pedantic(_ours, args=(model, x), kwargs={"nonlinear": "bit-sliced"}, rounds=1, iterations=1)
    result["bit-sliced"] = _summary(sliced, plain)
    stock = _stock(size, batch)
    result["stock"] = {k: stock[k] for k in ("online_s", "rounds", "bytes")}
    result["stock"]["max_abs_err"] = float((stock["logits"] - plain).abs().max())
    for name in ("fss", "bit-sliced"):
        if "online_s" in result[name]:
            assert result[name]["max_abs_err"] < 0.05
            result[name]["speedup_online_vs_stock"] = stock["online_s"] / result[name]["online_s"]
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
