"""Fused elementwise loops over ring vectors, compiled by Numba.

Why compiled: encoding an update (scale, round, convert, mask) and decoding an average
(add the shares, estimate the wrap-around, correct it, scale) are each several
elementwise steps. As NumPy calls, every step is its own pass over memory; one loop does
them all in one pass, which is what time follows on large vectors. ``nogil``: the parties
run these from threads that also read sockets.
``cache``: compiled once per machine (into ``__pycache__``), not in every party process.

Integer arithmetic here wraps around 2^64, as the ring needs (Numba, like NumPy, does
not trap on int64 overflow).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def encode_into(x: np.ndarray, scale: float, out: np.ndarray, subtract: bool) -> None:
    """``out = round(x * scale)``, or with ``subtract`` ``round(x * scale) - out``, in int64.
    Rounds half to even, as torch.round and np.rint do."""
    if subtract:
        for i in range(x.size):
            out[i] = np.int64(np.rint(x[i] * scale)) - out[i]
    else:
        for i in range(x.size):
            out[i] = np.int64(np.rint(x[i] * scale))


@numba.njit(cache=True, nogil=True, inline="always")
def _corrected_sum(parts, i, divisor, shift, offset, table):  # type: ignore[no-untyped-def]
    """Element ``i`` of the parts' sum, less the wrap-around correction that mpc.division
    reads from the sum's top 32 bits; ``(value, False)`` where no table entry fits."""
    s = parts[0][i]
    for p in range(1, len(parts)):
        s += parts[p][i]
    if divisor == 1:
        return s, True
    m = ((s >> 32) * divisor + offset) >> shift
    if m < 0 or m >= table.size:
        return s, False
    return s - table[m], True


@numba.njit(cache=True, nogil=True)
def decode_quotients(
    parts: tuple[np.ndarray, ...],
    lo: int,
    hi: int,
    divisor: int,
    shift: int,
    offset: int,
    table: np.ndarray,
    out: np.ndarray,
) -> int:
    """``out[lo:hi]`` (int64): the corrected sum of ``parts`` (mpc.division.QuotientDecoder).
    Returns -1, or the first element that no correction fits."""
    for i in range(lo, hi):
        v, ok = _corrected_sum(parts, i, divisor, shift, offset, table)
        if not ok:
            return i
        out[i] = v
    return -1


@numba.njit(cache=True, nogil=True)
def decode_scaled(
    parts: tuple[np.ndarray, ...],
    lo: int,
    hi: int,
    divisor: int,
    shift: int,
    offset: int,
    table: np.ndarray,
    scale: float,
    out: np.ndarray,
) -> int:
    """As :func:`decode_quotients`, each value times ``scale`` into a float ``out``."""
    for i in range(lo, hi):
        v, ok = _corrected_sum(parts, i, divisor, shift, offset, table)
        if not ok:
            return i
        out[i] = v * scale
    return -1


def warm_up() -> None:
    """Run each loop that hospitals and the coordinator use once, on one element (each loop
    after the first is cheap to load, so both roles simply load all). The first call in a
    process loads Numba's runtime and the cached code: done at start-up, that is not paid
    inside the first aggregation."""
    ring = np.zeros(1, dtype=np.int64)
    for dtype in (np.float32, np.float64):  # model updates, statistics
        encode_into(np.zeros(1, dtype=dtype), 1.0, ring, True)
    # divisor 1 returns before the correction is read; named, so a changed signature fails here
    decode_scaled(
        (ring, ring), 0, 1, divisor=1, shift=32, offset=0, table=ring, scale=1.0, out=np.zeros(1, dtype=np.float32)
    )
