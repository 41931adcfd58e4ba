"""CrypTen's CUDA convolution on int64 shares against the exact CPU result, before and
after our fix (needs a GPU). Prints one JSON object per case:

    .venv/bin/python benchmarks/check_cuda_conv.py

``wrong_fraction`` is the share of outputs that differ from the exact ring result and
``max_err`` the largest difference in fixed-point units (ring units / 2^16).
"""

import json

import torch

from medmpc.mpc import crypten_compat

crypten_compat.install()  # the exact convolution among the patches
from crypten.cuda import CUDALongTensor  # noqa: E402  (after the import patches)

stock = CUDALongTensor.crypten_conv_ops
ours = CUDALongTensor._CUDALongTensor__patched_conv_ops

g = torch.Generator().manual_seed(0)
for c_in in (1, 64, 256, 512):
    x = torch.randint(-(2**63), 2**63 - 1, (2, c_in, 14, 14), generator=g)
    w = torch.randint(-(2**63), 2**63 - 1, (64, c_in, 3, 3), generator=g)
    want = torch.conv2d(x, w, padding=1)
    for name, conv in (("crypten", stock), ("medmpc", ours)):
        got = conv("conv2d", CUDALongTensor(x.cuda()), CUDALongTensor(w.cuda()), padding=1).tensor().cpu()
        diff = (got - want).double().abs()
        print(
            json.dumps(
                {
                    "impl": name,
                    "c_in": c_in,
                    "kernel": 3,
                    "wrong_fraction": float((got != want).double().mean()),
                    "max_err": float(diff.max() / 2**16),
                }
            ),
            flush=True,
        )
