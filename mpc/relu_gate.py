"""ReLU in one round: the dealer's function-secret-shared key for "ReLU at a masked input".

For values ``x`` known to lie in [-2^(L-1), 2^(L-1)) (fixed-point units; mpc.bounds proves L),
the dealer draws a mask ``r`` uniform in Z/2^L and gives each party a share of ``r`` and a key.
The parties open ``xh = x + r mod 2^L`` (one round, L bits per value) and each computes, from
``xh`` and its key alone, its Z/2^64 share of ``ReLU(x)``.

Why it works. Split ``xh`` and ``r`` into their top bit and their low L-1 bits: ``xh = (h, xl)``,
``r = (rm, rl)``. With the borrow ``c = [xl < rl]`` of the low subtraction, the sign bit of
``x`` is ``d = h ^ rm ^ c``, and for ``x >= 0`` its value is ``xl - rl + 2^(L-1) c``. With
``s = h ^ rm``, ``1 - d = (1 - s) + (2s - 1) c`` and, as ``(1 - d) c = s c``,

    ReLU(x) = (1 - s)(xl - rl) + c * ((2s - 1)(xl - rl) + 2^(L-1) s).

``h`` and ``xl`` are public; ``rm`` and ``rl`` are the dealer's. A DCF key (mpc.dcf) on the
L-1 low bits with ``alpha = rl`` gives shares of ``beta * c`` for a vector ``beta`` of the
dealer's choosing; with ``sigma = 2 rm - 1`` and ``beta = (sigma, -sigma rl + 2^(L-1) rm,
2^(L-1))``, and shares of ``rm``, ``rm rl`` and ``rl``, both cases of ``h`` are linear in what
each party holds:

    h = 0:  ReLU = (1 - rm)(xl - rl) + u1 xl + u2
    h = 1:  ReLU = rm (xl - rl) - u1 xl - u2 + u3        (u = shares of beta * c).

Security (semi-honest, dealer colluding with neither party): the opened ``xh`` is ``x`` plus a
fresh uniform mask, so it is uniform; each party's key and shares are pseudorandom on their
own (mpc.dcf). A key is used once: evaluating it on a second input is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medmpc.mpc import dcf, opening, prg

OUTPUTS = 3  # the DCF's payload: (sigma, -sigma rl + 2^(L-1) rm, 2^(L-1))


@dataclass
class GateKey:
    """One party's key for ``N`` ReLUs on ``bits``-bit values: its share of the mask ``r``, of
    ``(rm, rm rl, rl)`` (N, 3), and its DCF key."""

    bits: int
    mask: np.ndarray
    constants: np.ndarray
    comparison: dcf.Key
    opened: bool = False  # mpc.opening.mask_once: one opening per mask

    @property
    def party(self) -> int:
        return self.comparison.party

    @property
    def size(self) -> int:
        return self.comparison.size

    @property
    def nbytes(self) -> int:
        return self.mask.nbytes + self.constants.nbytes + self.comparison.nbytes


def _check_bits(bits: int) -> None:
    if not 2 <= bits <= 64:
        raise ValueError(f"ReLU gate ring bits must be in 2..64, got {bits}")


def deal(size: int, bits: int) -> tuple[GateKey, GateKey]:
    """The dealer's keys for ``size`` ReLUs of values in [-2^(bits-1), 2^(bits-1)), from the CSPRNG."""
    _check_bits(bits)
    r = prg.random_words(size) & opening.low_bits(bits)
    top = r >> np.uint64(bits - 1)
    low = r & opening.low_bits(bits - 1)
    sigma = np.uint64(2) * top - np.uint64(1)  # +1 or -1 (mod 2^64)
    half = np.uint64(1 << (bits - 1))
    beta = np.stack([sigma, np.uint64(0) - sigma * low + half * top, np.full(size, half)], axis=1)
    keys = dcf.generate(low, beta, bits - 1)
    masks = prg.additive_shares(r)
    constants = prg.additive_shares(np.stack([top, top * low, low], axis=1))
    return GateKey(bits, masks[0], constants[0], keys[0]), GateKey(bits, masks[1], constants[1], keys[1])


def masked_share(key: GateKey, share: np.ndarray) -> np.ndarray:
    """This party's part of the opening: ``x_b + r_b mod 2^bits`` (uint64; mpc.opening packs it)."""
    return opening.mask_once(key, share, key.bits, "ReLU")


def evaluate(key: GateKey, opened: np.ndarray, *, start: int = 0) -> np.ndarray:
    """This party's Z/2^64 share of ``ReLU(x)`` from the opened ``x + r mod 2^bits``, for the
    key's values ``start`` to ``start + len(opened)`` (in consecutive parts, as for mpc.dcf)."""
    bits = key.bits
    top = (opened >> np.uint64(bits - 1)).astype(bool)
    low = opened & opening.low_bits(bits - 1)
    u = dcf.evaluate(key.comparison, low, start=start)
    q_top, q_product, q_low = key.constants[start : start + opened.size].T
    own = low if key.party == 0 else np.zeros_like(low)  # public terms, added once
    below = own - q_top * low - q_low + q_product + u[:, 0] * low + u[:, 1]
    above = q_top * low - q_product - u[:, 0] * low - u[:, 1] + u[:, 2]
    share: np.ndarray = np.where(top, above, below)
    return share


# ---- a key as uint64 words, as the dealer sends it -----------------------------------------


def word_count(size: int, bits: int) -> int:
    """How many uint64 words :func:`to_words` makes of a key for ``size`` ReLUs of ``bits`` bits."""
    return size * (1 + 3) + dcf.word_count(size, bits - 1, OUTPUTS)


def to_words(key: GateKey) -> np.ndarray:
    return np.concatenate([key.mask, key.constants.reshape(-1), dcf.to_words(key.comparison)])


def from_words(words: np.ndarray, party: int, size: int, bits: int) -> GateKey:
    """The key :func:`to_words` made, for party ``party``; ValueError if the length is not that of
    a key for ``size`` ReLUs of ``bits`` bits."""
    _check_bits(bits)
    if words.shape != (word_count(size, bits),):
        raise ValueError(
            f"a ReLU key for {size} values of {bits} bits is {word_count(size, bits)} words, got {words.shape}"
        )
    comparison = dcf.from_words(words[4 * size :], party=party, size=size, bits=bits - 1, outputs=OUTPUTS)
    return GateKey(bits, words[:size], words[size : 4 * size].reshape(size, 3), comparison)
