"""Make every sampling function of torch and NumPy raise ``WeakRandomness``.

Neither torch's generators (MT19937, Philox) nor NumPy's (PCG64, MT19937) is a CSPRNG,
so no value that protects a secret may come from them. Tensors on the ``meta`` device
hold no data and draw nothing, so building an architecture there is allowed.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

TORCH_FUNCTIONS = (
    "rand",
    "randn",
    "randint",
    "randperm",
    "rand_like",
    "randn_like",
    "randint_like",
    "normal",
    "bernoulli",
    "multinomial",
    "poisson",
)
TENSOR_METHODS = (
    "random_",
    "uniform_",
    "normal_",
    "bernoulli_",
    "exponential_",
    "geometric_",
    "cauchy_",
    "log_normal_",
    "bernoulli",
    "multinomial",
)
NUMPY_FUNCTIONS = (
    "default_rng",
    "rand",
    "randn",
    "randint",
    "random",
    "random_sample",
    "choice",
    "shuffle",
    "permutation",
    "normal",
    "uniform",
    "bytes",
    "seed",
)


class WeakRandomness(RuntimeError):
    pass


def _forbidden(owner: str, name: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def refuse(*args: Any, **kwargs: Any) -> Any:
        meta = (args and isinstance(args[0], torch.Tensor) and args[0].is_meta) or str(kwargs.get("device")) == "meta"
        if meta:
            return fn(*args, **kwargs)
        raise WeakRandomness(f"{owner}.{name} drawn in a protocol process: not a CSPRNG")

    return refuse


def install() -> None:
    for name in TORCH_FUNCTIONS:
        setattr(torch, name, _forbidden("torch", name, getattr(torch, name)))
    for name in TENSOR_METHODS:
        setattr(torch.Tensor, name, _forbidden("torch.Tensor", name, getattr(torch.Tensor, name)))
    for name in NUMPY_FUNCTIONS:
        setattr(np.random, name, _forbidden("numpy.random", name, getattr(np.random, name)))
