"""Encrypted inference: the secret-shared model on the secret-shared image.

Parties (each its own process, see mpc.launch): the model owner (rank 0) shares
the BatchNorm-folded weights, the data owner (rank 1) shares the preprocessed
images, and the dealer (TTP) supplies Beaver triples and other correlated
randomness. Only the data owner receives the logits.

Offline/online split: a first pass on a dummy input of the same shape records
which correlated randomness the model needs, and the dealer produces all of it
into a cache before the real image is used; the convolutions also open their
weight masks then (mpc.compile.Conv). The online pass (image in, prediction
out) takes everything from that cache.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from medmpc.models import architecture, build_model
from medmpc.mpc import comparison, crypten_compat
from medmpc.mpc.compile import compile_model
from medmpc.mpc.launch import Hosts, ThisMachine, run_crypten_job
from medmpc.mpc.pki import describe_channels
from medmpc.training.checkpoint import Checkpoint

MODEL_OWNER, DATA_OWNER = 0, 1


def _traffic(crypten: Any) -> dict[str, float]:
    stats = crypten.communicator.get().get_communication_stats()
    return {"rounds": int(stats["rounds"]), "bytes": int(stats["bytes"])}


def encrypted_forward(
    *,
    rank: int,
    world_size: int,
    model_name: str,
    num_classes: int,
    shape: list[int],
    checkpoint: str | None = None,
    images: str | None = None,
    device: str = "cpu",
    nonlinear: str = comparison.FSS,
) -> dict[str, Any] | None:
    """The job every party runs. The model owner reads only ``checkpoint``, the data owner
    only ``images`` (a saved float tensor of preprocessed images of ``shape``). With
    ``device="cuda"`` every share lives and is computed on the GPU; ``nonlinear`` as for
    mpc.comparison.configure."""
    crypten = crypten_compat.patched()
    crypten.cfg.communicator.verbose = True  # count rounds and bytes
    comparison.configure(nonlinear=nonlinear)
    if rank == MODEL_OWNER:
        if checkpoint is None:
            raise ValueError("the model owner runs with a checkpoint")
        ckpt = Checkpoint.load(checkpoint)
        program = compile_model(ckpt.build(), input_range=ckpt.preprocessing.valid_range())
    else:  # the public architecture; its weights are never used
        program = compile_model(architecture(model_name, num_classes))
    program.publish_bounds(src=MODEL_OWNER)
    weights = program.share_parameters(src=MODEL_OWNER, device=device)
    start = time.perf_counter()
    program.trace(program.share_input(torch.zeros(shape, device=device), src=DATA_OWNER), weights)
    offline_s = time.perf_counter() - start

    if rank == DATA_OWNER and images is None:
        raise ValueError("the data owner runs with images")
    x = torch.load(images, weights_only=True) if images is not None and rank == DATA_OWNER else torch.zeros(shape)
    crypten.communicator.get().reset_communication_stats()
    keys_before = comparison.gate_key_bytes()
    _synchronize(device)
    start = time.perf_counter()
    x = program.share_input(x.to(device), src=DATA_OWNER)
    logits = program.run(x, weights).get_plain_text(dst=DATA_OWNER)
    _synchronize(device)
    online_s = time.perf_counter() - start
    traffic = _traffic(crypten)
    key_bytes = comparison.gate_key_bytes() - keys_before
    if rank != DATA_OWNER:
        return None  # the model owner learns nothing about the result
    return {
        "logits": logits.cpu(),
        "online_s": online_s,
        "offline_s": offline_s,
        "device": device,
        "prepared_convs": program.prepared_runs,
        "comparison_bits": [site.bits for site in program.sites],
        "bounds_proven": program.bounds_proven,
        "nonlinear": nonlinear,
        "key_bytes": key_bytes,  # the dealer's keys this party used online (made offline)
        **traffic,
    }


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_inference(
    checkpoint: str,
    images: torch.Tensor,
    *,
    timeout_s: float = 600.0,
    device: str = "cpu",
    plaintext_transport: bool = False,
    hosts: Hosts | None = None,
    nonlinear: str = comparison.FSS,
) -> dict[str, Any]:
    """Run model owner, data owner and dealer as processes on preprocessed ``images``, over
    mutually authenticated TLS (``plaintext_transport``: without, to measure what TLS costs);
    ``hosts`` places each (default: all on this machine); ``nonlinear`` as for
    mpc.comparison.configure."""
    comparison.configure(nonlinear=nonlinear)  # refuses a bad name before any process starts
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but this machine has no CUDA GPU")
    ckpt = Checkpoint.load(checkpoint)
    with tempfile.TemporaryDirectory(prefix="medmpc-infer-") as tmp:
        image_file = Path(tmp) / "images.pt"
        torch.save(images.float().contiguous(), image_file)
        results = run_crypten_job(
            "medmpc.protocols.inference:encrypted_forward",
            world_size=2,
            timeout_s=timeout_s,
            plaintext_transport=plaintext_transport,
            hosts=hosts or ThisMachine(),
            args={
                "model_name": ckpt.model_name,
                "num_classes": len(ckpt.classes),
                "shape": list(images.shape),
                "checkpoint": str(checkpoint),
                "images": str(image_file),
                "device": device,
                "nonlinear": nonlinear,
            },
        )
    if results[MODEL_OWNER] is not None:
        raise RuntimeError("the model owner received a result; it must learn nothing")
    result: dict[str, Any] = results[DATA_OWNER]
    return result | {"transport": describe_channels(plaintext=plaintext_transport)}


def random_model_and_input(
    model_name: str, image_size: int, batch: int, seed: int
) -> tuple[torch.nn.Module, torch.Tensor]:
    """A benchmark model (random weights, non-trivial BatchNorm statistics, so that folding is
    really exercised) and a batch of random valid inputs (uniform pixels normalised with
    mean 0.5, std 0.25: in [-2, 2], as the benchmarks' checkpoints declare), the same on every
    party for the same seed."""
    # torch's generator on purpose: a public benchmark model and input that every party and the
    # plaintext reference rebuild from the seed; no secret depends on them
    g = torch.Generator().manual_seed(seed)
    model = randomise_batchnorm(build_model(model_name, 3, seed=seed), g)
    return model, (torch.rand(batch, 1, image_size, image_size, generator=g) - 0.5) / 0.25


def randomise_batchnorm(model: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics and affine terms; returns the model in eval mode.

    ``generator`` is torch's on purpose: these are the public benchmark model's parameters, which
    every party and the plaintext reference rebuild from one seed; no secret depends on them."""
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                continue
            if m.running_mean is None or m.running_var is None or m.weight is None or m.bias is None:
                raise ValueError(f"{type(m).__name__} without running statistics or affine terms")
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
    return model.eval()
