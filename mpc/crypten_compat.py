"""Every workaround CrypTen 0.4.1 needs on current PyTorch, in one place.

CrypTen is unmaintained since 2022. What breaks, and what we do about it:

* ``import crypten`` fails because ``torch.onnx._internal.registration`` is gone.
  CrypTen only imports it to patch ONNX export, which we never use (models are
  compiled by our own tracer, never through ``crypten.nn.from_pytorch``), so an
  empty stand-in module is enough.
* ``torch.distributed`` process groups default to a 30-minute timeout, so a dead
  party would hang the others for half an hour. :func:`init_party` injects our
  timeout into the process groups CrypTen creates.
* The default provider ``TFP`` lets party 0 generate every Beaver triple in the
  clear. :func:`init_party` defaults to ``TTP`` (a separate dealer process) and
  refuses ``TFP`` unless the caller explicitly asks for the insecure mode.
* ``crypten.cryptensor(numpy_array)`` truncates to integers before scaling.
  :func:`encrypt` only accepts floating-point torch tensors.
* ``torch.load`` defaults to ``weights_only=True``, which breaks ``crypten.load``;
  we do not use ``crypten.save``/``crypten.load`` at all (shares travel through
  our own transport), so nothing here re-enables unpickling.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.util
import sys
import types
from collections.abc import Iterator
from typing import Any

import torch

_SECURE_PROVIDERS = ("TTP",)
_INSECURE_PROVIDERS = ("TFP",)


def _install_onnx_registration_stub() -> None:
    name = "torch.onnx._internal.registration"
    if name in sys.modules or importlib.util.find_spec("torch.onnx._internal") is None:
        return
    if importlib.util.find_spec(name) is None:
        stub = types.ModuleType(name)
        stub.registry = None  # crypten only binds the name
        sys.modules[name] = stub


@functools.cache
def import_crypten() -> types.ModuleType:
    """Import CrypTen with the compatibility patches applied."""
    _install_onnx_registration_stub()
    import crypten

    return crypten


@contextlib.contextmanager
def _process_group_timeout(timeout_s: float) -> Iterator[None]:
    """Make every process group created inside the block use ``timeout_s``.

    CrypTen calls ``dist.init_process_group``/``dist.new_group`` without a timeout.
    """
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    originals = {"init_process_group": dist.init_process_group, "new_group": dist.new_group}

    def with_timeout(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", timeout)
            return fn(*args, **kwargs)

        return wrapper

    for name, fn in originals.items():
        setattr(dist, name, with_timeout(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def configure_provider(provider: str = "TTP", *, allow_insecure: bool = False) -> None:
    """Select CrypTen's correlated-randomness provider before ``init``."""
    provider = provider.upper()
    if provider in _INSECURE_PROVIDERS and not allow_insecure:
        raise ValueError(
            f"provider {provider!r} lets party 0 generate every Beaver triple in the clear; "
            "it is a debugging mode, not MPC. Use 'TTP' (separate dealer process), or pass "
            "allow_insecure=True in tests."
        )
    if provider not in _SECURE_PROVIDERS + _INSECURE_PROVIDERS:
        raise ValueError(f"unknown CrypTen provider {provider!r}; expected one of TTP, TFP")
    crypten = import_crypten()
    crypten.cfg.mpc.provider = provider


def init_party(
    *, timeout_s: float, provider: str = "TTP", allow_insecure: bool = False
) -> types.ModuleType:
    """Initialise CrypTen in this process from RANK/WORLD_SIZE/RENDEZVOUS env vars."""
    crypten = import_crypten()
    configure_provider(provider, allow_insecure=allow_insecure)
    with _process_group_timeout(timeout_s):
        crypten.init()
    return crypten


def run_dealer(*, timeout_s: float) -> None:
    """Serve Beaver triples and other correlated randomness until the parties finish."""
    crypten = import_crypten()
    configure_provider("TTP")
    with _process_group_timeout(timeout_s):
        crypten.mpc.provider.TTPServer()


def encrypt(tensor: torch.Tensor, *, src: int = 0) -> Any:
    """Secret-share a float tensor held by party ``src`` (other parties pass a same-shape tensor).

    Refuses NumPy arrays and integer tensors: CrypTen would truncate them to
    integers *before* fixed-point scaling, silently turning 1.5 into 1.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(
            f"encrypt() takes a torch float tensor, got {type(tensor).__name__}; "
            "convert with torch.as_tensor(x, dtype=torch.float32)"
        )
    if not tensor.is_floating_point():
        raise TypeError(
            f"encrypt() takes a floating-point tensor, got dtype {tensor.dtype}; "
            "CrypTen would drop the fractional part before encoding"
        )
    return import_crypten().cryptensor(tensor, src=src)
