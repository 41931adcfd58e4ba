"""ReLU's secure comparison for two parties: the sign bit on a sub-ring sized from a proven bound, bit-sliced.

CrypTen finds the sign of a shared ``x = x0 + x1`` by converting both shares to
binary and adding them with a full 64-bit parallel-prefix adder: 6 levels of
Beaver ANDs, each opening two 64-bit words per element and party. Three
observations make it several times cheaper:

* **Smaller ring.** For ``|x| < 2^(L-1)`` (fixed-point units) the sign of ``x`` is
  bit L-1 of ``(x0 + x1) mod 2^L``, and reducing a share mod 2^L is local. Outside
  that range the sign is wrong (with L = 40 and 16 fractional bits, 1.2e7 came out
  positive-as-zero), so each call names its L: mpc.bounds derives it from a proven
  bound on the compared values, and L = 64 (the default) is exact for every ring
  element, as a client's unchecked input needs (:func:`clamp`).
* **Only one carry.** The sign is ``a_{L-1} ^ b_{L-1} ^ c``, where ``c`` is the
  carry into bit L-1: a prefix *reduction* over bits 0..L-2 of (generate,
  propagate) pairs, halving the groups at each of ceil(log2(L-1)) levels.
* **Bit slicing.** Bit j of 64 elements travels in one int64 word, so an AND
  opens 2 bits per element and party instead of 2 words.

Party 0's share gives the bits ``a_j``, party 1's the ``b_j``. The propagate bits
``a_j ^ b_j`` are then XOR-shared for free; the generate bits ``a_j & b_j`` take one
Beaver AND. Every AND uses a binary triple from the dealer (CrypTen's provider,
so the offline pass caches them like all other randomness); the sign bit becomes
arithmetic with CrypTen's B2A and multiplies ``x`` as in CrypTen's ReLU.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medmpc.mpc import clamp_gate, crypten_compat, opening

FULL_RING = 64
FSS, BIT_SLICED = "fss", "bit-sliced"
NONLINEAR = (FSS, BIT_SLICED)


@dataclass
class _Settings:
    nonlinear: str = FSS
    key_bytes: int = 0  # of the dealer's keys evaluated in this process


_settings = _Settings()


def configure(*, nonlinear: str) -> None:
    """How two CPU parties with a dealer compute ReLU and the input clamp in this process: ``"fss"``
    (default: the dealer's one-round keys, mpc.relu_gate and mpc.clamp_gate) or ``"bit-sliced"``
    (a round per level of the comparison, but only a few dealer bytes per value: for large
    images on fast links, whose keys would not fit)."""
    if nonlinear not in NONLINEAR:
        raise ValueError(f"nonlinear must be one of {', '.join(NONLINEAR)}, got {nonlinear!r}")
    _settings.nonlinear = nonlinear


def nonlinear() -> str:
    """This process's choice for ReLU and the input clamp (:func:`configure`)."""
    return _settings.nonlinear


def gate_key_bytes() -> int:
    """Bytes of the dealer's keys this process has evaluated so far (one party's)."""
    return _settings.key_bytes


def relu(x: Any, *, bits: int = FULL_RING) -> Any:
    """ReLU of a CrypTen MPCTensor whose values (fixed-point units) are known to lie in
    [-2^(bits-1), 2^(bits-1)); exact for any value with ``bits=64`` (as CrypTen's: ``x [x >= 0]``).
    Two CPU parties with a dealer use its one-round key (mpc.relu_gate), others ``x [x >= 0]``."""
    crypten = crypten_compat.patched()
    if _one_round(crypten, x):
        if not 2 <= bits <= FULL_RING:
            raise ValueError(f"comparison ring bits must be in 2..{FULL_RING}, got {bits}")
        return _gate(crypten, x, "relu", bits, bits)
    return x * (1 - less_than_zero(x, bits=bits))


def _one_round(crypten: Any, x: Any) -> bool:
    two_parties = crypten.communicator.get().get_world_size() == 2
    dealer = crypten.cfg.mpc.provider == "TTP"
    return _settings.nonlinear == FSS and two_parties and dealer and not x._tensor.share.is_cuda


def _inside(x: Any, low: float, high: float) -> tuple[int, int]:
    """``[low, high]`` in ``x``'s fixed point, rounded inward: the clamped values stay inside the
    range the proven bounds (mpc.bounds) start from."""
    return math.ceil(low * x.encoder.scale), math.floor(high * x.encoder.scale)


# values a gate opens and evaluates at a time: each part is evaluated while the next ones travel
_PART = 1 << 15


def _gate(crypten: Any, x: Any, kind: str, bits: int, *params: int) -> Any:
    """A one-round gate of the dealer's (crypten_compat.GATES): one opening of ``x + r mod 2^bits``
    (``bits`` bits a value on the wire), then local evaluation, part by part as the opening arrives."""
    gate = crypten_compat.GATES[kind]
    share = x._tensor.share
    flat = share.reshape(-1).contiguous().numpy().view(np.uint64)
    provider = crypten.mpc.get_default_provider()
    if provider.tracing:  # the offline pass on a placeholder: record the request, deal nothing yet
        provider.request_cache.append(("gate_keys", (kind, flat.size, *params), {}))
        return x * 0
    key = provider.gate_keys(kind, flat.size, *params)
    _settings.key_bytes += key.nbytes
    mine = torch.from_numpy(opening.pack(gate.masked_share(key, flat), bits))
    starts = list(range(0, flat.size, _PART))
    bounds = [start * bits // 64 for start in starts] + [mine.numel()]  # whole words: _PART is a multiple of 64
    out = np.empty(flat.size, np.uint64)
    arriving = crypten.communicator.get().all_gather_parts(mine, bounds)
    for start, parts in zip(starts, arriving, strict=True):
        size = min(_PART, flat.size - start)
        opened = opening.combine([p.numpy() for p in parts], bits, size)
        out[start : start + size] = gate.evaluate(key, opened, start=start)
    result = torch.from_numpy(out.view(np.int64)).reshape(share.shape)
    return crypten.mpc.MPCTensor.from_shares(result, precision=x.encoder._precision_bits)


# one made-up gate of each kind for warm_up: (kind, opening bits, the gate's parameters)
_WARM_UP = (("relu", 8, (8,)), ("clamp", clamp_gate.BITS, (-1, 1)))


@functools.cache  # once per process: a service prepares many runs
def warm_up() -> None:
    """Run the one-round gates' compiled kernels once, each on a key this process deals itself
    and throws away: Numba loads machine code at a process's first call (0.4 to 0.7 s in all),
    which belongs in the offline pass, not in the online time of the first image."""
    for kind, bits, params in _WARM_UP:
        gate = crypten_compat.GATES[kind]
        key = gate.from_words(gate.to_words(gate.deal(1, *params)[0]), 0, 1, *params)
        mine = opening.pack(gate.masked_share(key, np.zeros(1, np.uint64)), bits)
        gate.evaluate(key, opening.combine([mine], bits, 1))


def less_than_zero(x: Any, *, bits: int = FULL_RING) -> Any:
    """``[x < 0]`` as an arithmetic MPCTensor of scale 1, for values in [-2^(bits-1), 2^(bits-1));
    exact for any ring element with ``bits=64``. Two CPU parties use the bit-sliced sign test,
    others CrypTen's (always on the full ring)."""
    if not 2 <= bits <= FULL_RING:
        raise ValueError(f"comparison ring bits must be in 2..{FULL_RING}, got {bits}")
    crypten = crypten_compat.patched()
    if crypten.communicator.get().get_world_size() != 2 or x._tensor.share.is_cuda:
        return x._ltz()
    return _ltz(x, bits)


def clamp(x: Any, low: float, high: float) -> Any:
    """``min(max(x, low), high)`` for every ring element ``x`` (its signed value), ``low <= 0 <= high``.

    A client may send shares of anything, so ``x - high`` could wrap around the ring. Two CPU
    parties with a dealer use its one-round key (mpc.clamp_gate), exact for every element. Others
    split: ``p = relu(x)`` and ``n = relu(-x)`` are in [0, 2^63), so ``p - high`` and ``n + low``
    cannot wrap, and ``x`` clamped is ``min(p, high) - min(n, -low)``. Two batched full-ring
    comparisons. The one exception is -2^63, whose negation wraps to itself: it gives 0, still
    inside [low, high].
    """
    if not low <= 0 <= high:
        raise ValueError(f"clamp needs low <= 0 <= high, got [{low}, {high}]")
    crypten = crypten_compat.patched()
    if _one_round(crypten, x):
        return _gate(crypten, x, "clamp", clamp_gate.BITS, *_inside(x, low, high))
    parts = relu(crypten.stack([x, -x]))
    p, n = parts[0], parts[1]
    excess = relu(crypten.stack([p - high, n + low]))
    return (p - excess[0]) - (n - excess[1])


def _ltz(x: Any, bits: int) -> Any:
    """``[x < 0]`` as an arithmetic MPCTensor (scale 1)."""
    crypten = crypten_compat.patched()
    from crypten.mpc.primitives import beaver
    from crypten.mpc.primitives.binary import BinarySharedTensor

    share = x._tensor.share
    sign = _sign_share(share, crypten.communicator.get().get_rank(), bits)
    arithmetic = beaver.B2A_single_bit(BinarySharedTensor.from_shares(sign))
    return crypten.mpc.MPCTensor.from_shares(arithmetic.share, precision=0)


def _and(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """XOR-shares of ``x & y`` from XOR-shares of ``x`` and ``y`` (one Beaver AND, batched)."""
    from crypten.mpc.primitives.binary import BinarySharedTensor

    shares: torch.Tensor = (BinarySharedTensor.from_shares(x) & BinarySharedTensor.from_shares(y)).share
    return shares


def _sign_share(share: torch.Tensor, rank: int, bits: int) -> torch.Tensor:
    """This party's XOR-share (int64 0/1, ``share``'s shape) of bit ``bits - 1`` of the shared values."""
    planes = bit_planes(share, bits)
    zero = torch.zeros_like(planes[: bits - 1])
    own = planes[: bits - 1]
    generate = _and(own if rank == 0 else zero, zero if rank == 0 else own)
    propagate = own  # a_j ^ b_j: party 0 holds a_j, party 1 holds b_j
    while generate.shape[0] > 1:  # combine neighbouring bit groups, low group first
        m = generate.shape[0] // 2
        lo, hi = slice(0, 2 * m, 2), slice(1, 2 * m, 2)
        # (G, P) = (G_hi ^ (P_hi & G_lo), P_hi & P_lo): G_hi and P_hi & G_lo never both hold
        both = _and(torch.cat([propagate[hi], propagate[hi]]), torch.cat([generate[lo], propagate[lo]]))
        odd = slice(2 * m, None)
        generate = torch.cat([generate[hi] ^ both[:m], generate[odd]])
        propagate = torch.cat([both[m:], propagate[odd]])
    sign_plane = planes[bits - 1] ^ generate[0]
    return unpack_bits(sign_plane, share.numel()).reshape(share.shape)


def bit_planes(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``(bits, ceil(n / 64))`` int64: row j holds bit j of every value, 64 values per word."""
    flat = values.reshape(-1).numpy()
    padded = np.zeros(-(-flat.size // 64) * 64, dtype=np.int64)
    padded[: flat.size] = flat
    octets = padded.view(np.uint8).reshape(-1, 8)  # little-endian: octet k holds bits 8k..8k+7
    planes = np.empty((bits, padded.size // 64), dtype=np.int64)
    for j in range(bits):
        bit = (octets[:, j // 8] >> (j % 8)) & 1
        planes[j] = np.packbits(bit, bitorder="little").view(np.int64)
    return torch.from_numpy(planes)


def unpack_bits(plane: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` bits of a packed plane, one int64 0/1 per value."""
    bits = np.unpackbits(plane.contiguous().numpy().view(np.uint8), bitorder="little")[:n]
    return torch.from_numpy(bits.astype(np.int64))
