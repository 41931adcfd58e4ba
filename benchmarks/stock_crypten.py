"""Stock CrypTen 0.4.1 inference, as the baseline for our encrypted engine.

Only the patches it needs to run on torch 2.14: the import stub (mpc.crypten_compat),
ONNX export with ``dynamo=False``, and an ``Identity`` module for the ONNX op of that
name. Then ``crypten.nn.from_pytorch`` and its ``TTP`` provider, as a user of stock
CrypTen would run it. Both parties build the same (seeded) model, because
``load_from_party`` + ``from_pytorch`` desynchronises the parties' random streams.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch

from medmpc.mpc import crypten_compat
from medmpc.protocols.inference import random_model_and_input


def _patch_stock(crypten: Any) -> None:
    if getattr(torch.onnx.export, "_medmpc_stock_patch", False):
        return
    export = functools.partial(torch.onnx.export, dynamo=False)
    export._medmpc_stock_patch = True  # type: ignore[attr-defined]
    torch.onnx.export = export

    class Identity(crypten.nn.Module):
        def forward(self, x: Any) -> Any:
            return x

        @staticmethod
        def from_onnx(attributes: Any = None) -> Identity:
            return Identity()

    crypten.nn.module.Identity = Identity


def stock_forward(
    *,
    rank: int,
    world_size: int,
    model_name: str,
    image_size: int,
    batch: int,
    seed: int,
    device: str = "cpu",
    crypten_cuda_conv: bool = False,
) -> dict[str, Any]:
    """``crypten_cuda_conv`` puts back CrypTen's own (inexact) CUDA convolution, to show its error."""
    crypten = crypten_compat.patched()
    _patch_stock(crypten)
    if crypten_cuda_conv:
        from crypten.cuda import CUDALongTensor

        CUDALongTensor._CUDALongTensor__patched_conv_ops = CUDALongTensor.crypten_conv_ops
    crypten.cfg.communicator.verbose = True
    model, x = random_model_and_input(model_name, image_size, batch, seed)
    encrypted_model = crypten.nn.from_pytorch(model, torch.zeros_like(x)).encrypt(src=0).to(device)
    encrypted_model.eval()
    x = (x if rank == 1 else torch.zeros_like(x)).to(device)
    crypten.communicator.get().reset_communication_stats()
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    logits = encrypted_model(crypten.cryptensor(x, src=1)).get_plain_text().cpu()
    online_s = time.perf_counter() - start
    stats = crypten.communicator.get().get_communication_stats()
    return {"logits": logits, "online_s": online_s, "rounds": int(stats["rounds"]), "bytes": int(stats["bytes"])}
