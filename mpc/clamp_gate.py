"""Clamping any ring element in one round: the dealer's key for ``min(max(x, lo), hi)`` at a masked input.

A client may send shares of anything, so the first step of an encrypted prediction clamps
its input into the range the model's bounds were proven for, for every ``x`` in Z/2^64 read
as signed. The parties open ``xh = x + r`` on the whole ring (one round, 64 bits a value)
and each computes its share from ``xh`` and its key alone.

Why it works. Shifting by 2^63 turns signed order into unsigned: with ``X = x + 2^63`` and
``Xh = xh + 2^63 = X + r``, for any threshold ``K``,

    [X < K] = [Xh - r mod 2^64 < K] = [Xh < r + K] - [Xh < r] + w_K,

where the sums are mod 2^64 and ``w_K = [r + K >= 2^64]`` (the interval ``[r, r + K)`` wraps).
Three distributed comparison functions (mpc.dcf) on the 64-bit ``Xh`` give shares of
``c1 = [Xh < r]``, of ``c2 = [Xh < r + K_lo]`` and ``r c2``, and of ``c3 = [Xh < r + K_hi]`` and
``r c3``, with ``K_lo = lo + 2^63`` and ``K_hi = hi + 1 + 2^63``. Then ``below = [x < lo] =
c2 - c1 + w_lo``, ``inside = c3 - c2 + W`` with ``W = w_hi - w_lo``, ``above = 1 - c3 + c1 - w_hi``,
and with ``x = xh - r``:

    clamp(x) = xh inside - (r c3 - r c2 + r W) + lo below + hi above,

linear in what each party holds (the dealer also shares ``W``, ``r W``, ``w_lo``, ``w_hi``).

Security as for mpc.relu_gate: the opened ``xh`` is ``x`` plus a fresh uniform mask, each key is
pseudorandom on its own, and each is evaluated once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medmpc.mpc import dcf, opening, prg

BITS = 64  # the whole ring: an unchecked input may be any element
_HALF = np.uint64(1 << 63)
_CONSTANTS = 4  # W, r W, w_lo, w_hi
_OUTPUTS = (1, 2, 2)  # c1; c2 and r c2; c3 and r c3


@dataclass
class GateKey:
    """One party's key for ``N`` clamps: its share of the mask, of the constants (N, 4), and its
    three DCF keys."""

    low: int
    high: int
    mask: np.ndarray
    constants: np.ndarray
    comparisons: tuple[dcf.Key, dcf.Key, dcf.Key]
    opened: bool = False  # mpc.opening.mask_once: one opening per mask

    @property
    def party(self) -> int:
        return self.comparisons[0].party

    @property
    def size(self) -> int:
        return self.comparisons[0].size

    @property
    def nbytes(self) -> int:
        return self.mask.nbytes + self.constants.nbytes + sum(k.nbytes for k in self.comparisons)


def _check_range(low: int, high: int) -> None:
    if not -(2**63) < low <= 0 <= high < 2**63 - 1:
        raise ValueError(f"clamp needs -2^63 < low <= 0 <= high < 2^63 - 1 (fixed-point units), got [{low}, {high}]")


def _thresholds(low: int, high: int) -> tuple[np.uint64, np.uint64]:
    return np.uint64(low + 2**63), np.uint64(high + 1 + 2**63)


def deal(size: int, low: int, high: int) -> tuple[GateKey, GateKey]:
    """The dealer's keys for ``size`` clamps to [``low``, ``high``] (fixed-point units), from the CSPRNG."""
    _check_range(low, high)
    r = prg.random_words(size)
    k_lo, k_hi = _thresholds(low, high)
    a_lo, a_hi = r + k_lo, r + k_hi  # mod 2^64
    w_lo, w_hi = (a_lo < r).astype(np.uint64), (a_hi < r).astype(np.uint64)  # the sums wrapped
    ones = np.ones(size, np.uint64)
    keys = [
        dcf.generate(r, ones[:, None], BITS),
        dcf.generate(a_lo, np.stack([ones, r], axis=1), BITS),
        dcf.generate(a_hi, np.stack([ones, r], axis=1), BITS),
    ]
    wrap = w_hi - w_lo
    masks = prg.additive_shares(r)
    constants = prg.additive_shares(np.stack([wrap, r * wrap, w_lo, w_hi], axis=1))
    return tuple(  # type: ignore[return-value]
        GateKey(low, high, masks[b], constants[b], (keys[0][b], keys[1][b], keys[2][b])) for b in (0, 1)
    )


def masked_share(key: GateKey, share: np.ndarray) -> np.ndarray:
    """This party's part of the opening: ``x_b + r_b`` (uint64)."""
    return opening.mask_once(key, share, BITS, "clamp")


def evaluate(key: GateKey, opened: np.ndarray, *, start: int = 0) -> np.ndarray:
    """This party's Z/2^64 share of ``clamp(x)`` from the opened ``x + r``, for the key's values
    ``start`` to ``start + len(opened)`` (in consecutive parts, as for mpc.dcf)."""
    shifted = opened + _HALF
    c1, c2, c3 = (dcf.evaluate(k, shifted, start=start) for k in key.comparisons)
    wrap, r_wrap, w_lo, w_hi = key.constants[start : start + opened.size].T
    one = np.uint64(1 if key.party == 0 else 0)  # the public 1, added once
    inside = c3[:, 0] - c2[:, 0] + wrap
    below = c2[:, 0] - c1[:, 0] + w_lo
    above = one - c3[:, 0] + c1[:, 0] - w_hi
    r_inside = c3[:, 1] - c2[:, 1] + r_wrap
    low, high = np.int64(key.low).view(np.uint64), np.uint64(key.high)
    share: np.ndarray = opened * inside - r_inside + low * below + high * above
    return share


# ---- a key as uint64 words, as the dealer sends it -----------------------------------------


def word_count(size: int, low: int, high: int) -> int:
    """How many uint64 words :func:`to_words` makes of a key for ``size`` clamps."""
    return size * (1 + _CONSTANTS) + sum(dcf.word_count(size, BITS, m) for m in _OUTPUTS)


def to_words(key: GateKey) -> np.ndarray:
    return np.concatenate([key.mask, key.constants.reshape(-1), *(dcf.to_words(k) for k in key.comparisons)])


def from_words(words: np.ndarray, party: int, size: int, low: int, high: int) -> GateKey:
    """The key :func:`to_words` made, for party ``party``; ValueError if the length does not match."""
    _check_range(low, high)
    if words.shape != (word_count(size, low, high),):
        raise ValueError(f"a clamp key for {size} values is {word_count(size, low, high)} words, got {words.shape}")
    start = size * (1 + _CONSTANTS)
    comparisons = []
    for m in _OUTPUTS:
        end = start + dcf.word_count(size, BITS, m)
        comparisons.append(dcf.from_words(words[start:end], party=party, size=size, bits=BITS, outputs=m))
        start = end
    constants = words[size : size * (1 + _CONSTANTS)].reshape(size, _CONSTANTS)
    return GateKey(low, high, words[:size], constants, (comparisons[0], comparisons[1], comparisons[2]))
