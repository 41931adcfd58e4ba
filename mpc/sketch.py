"""A squared-norm sketch of a secret-shared vector: linear, so each party sketches its own share.

For a key drawn after the vector is fixed, ``sketch(x, key)`` is ``r`` independent
CountSketches of ``x`` in ``k = BUCKETS`` buckets (int64, wrapping: the sketch of a sum of
shares is the sum of their sketches), and each repetition's squared length estimates
``||x||^2`` without bias. Each repetition is two levels, both keyed by a ChaCha20 stream:

* level 1, one pass over ``x``: ``x`` is cut into rows of ``L = W / 2`` values; row ``b`` is
  multiplied by a random sign ``s_b`` and, coordinate-wise, by one random sign pattern ``p``
  (``L`` values), then added into ``W = WIDE`` buckets from a random offset ``o_b`` on (cyclic).
  Two values of one row never meet; values of different rows meet with probability ``1/W``.
  A row covers a random half of the buckets, not all of them: rows that each covered every
  bucket once would let values of 2^63 in an even number of whole rows cancel in every bucket
  (2^63 = -2^63 in the ring) whatever the key.
* level 2: the ``W`` level-1 buckets go to ``k`` buckets by a fully random hash and sign.

Variance, for any fixed ``x`` (independent uniform signs, offsets and hash; the proof is in
docs/protocols.md): ``Var(||y||^2) <= (2/k + 6/W + 12/(k W)) ||x||^4``. With
``k = 1024, W = 65536`` that is at most ``2.1 ||x||^4 / k``. By Chebyshev one repetition
underestimates ``||x||^2`` by a factor ``1 - e`` with probability at most ``2.1 / (k e^2)``,
and all ``r`` independent ones do so with at most the ``r``-th power of that.

The estimate is over the integers only while no bucket wraps around the ring: a check built on
it (protocols.norm_check) range-checks every bucket first, and the coordinator checks the norm of
the average it reveals.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from medmpc.mpc.streams import KEY_BYTES, ChaChaStream

BUCKETS = 1024  # k: the variance and each check's comparisons scale with 1/k and k
WIDE = 1 << 16  # W: level 1's buckets; a pass over x costs 2 len(x) / W Python-level adds
REPETITIONS = 3  # r: soundness error of an all-must-pass check is the r-th power of one's


def variance_factor(*, buckets: int = BUCKETS, wide: int = WIDE) -> float:
    """``c`` in ``Var(||sketch||^2) <= c ||x||^4`` for one repetition."""
    return 2 / buckets + 6 / wide + 12 / (buckets * wide)


def _repetition_stream(key: bytes, t: int) -> ChaChaStream:
    if len(key) != KEY_BYTES:
        raise ValueError(f"a sketch key is {KEY_BYTES} bytes, got {len(key)}")
    return ChaChaStream(hashlib.sha256(key + t.to_bytes(4, "little")).digest())


def _signs(stream: ChaChaStream, n: int) -> torch.Tensor:
    return 1 - 2 * stream.bits([n], 1)


class Sketcher:
    """The sketch of one flat int64 vector of ``numel`` values under ``key``, fed piece by piece
    (any order, pieces not overlapping) as the vector arrives; :meth:`result` once all are in.
    ``row``: level 1's row length (at most ``wide``)."""

    def __init__(
        self,
        numel: int,
        key: bytes,
        *,
        buckets: int = BUCKETS,
        wide: int = WIDE,
        row: int | None = None,
        repetitions: int = REPETITIONS,
    ) -> None:
        row = wide // 2 if row is None else row
        if wide % buckets or not 0 < row <= wide:
            raise ValueError(f"the width {wide} must be a multiple of the buckets {buckets}, the row {row} at most it")
        self.numel, self.buckets, self.wide, self.row = numel, buckets, wide, row
        rows = -(-numel // row)
        streams = [_repetition_stream(key, t) for t in range(repetitions)]
        self._patterns = np.stack([_signs(s, row).numpy() for s in streams])
        self._adds = [[bool(v > 0) for v in _signs(s, rows)] for s in streams]  # else subtract: the row sign
        self._offsets = [s.bits([rows], 64).remainder(wide).tolist() for s in streams]
        self._level2 = [(s.bits([wide], 64).remainder(buckets), _signs(s, wide)) for s in streams]
        # values go to o..o+row-1 of a buffer of W + row, whose tail folds back onto its head
        self._level1 = np.zeros((repetitions, wide + row), dtype=np.int64)
        self._signed = np.empty((repetitions, row), dtype=np.int64)  # a row times each pattern

    def add(self, start: int, piece: torch.Tensor) -> None:
        if piece.dtype != torch.int64 or piece.dim() != 1 or not 0 <= start <= self.numel - piece.numel():
            raise ValueError(f"a piece of {piece.numel()} {piece.dtype} values does not fit at {start}")
        values = piece.numpy()
        n, end = self.row, start + values.size
        lo = start
        while lo < end:
            b = lo // n
            hi = min(end, (b + 1) * n)
            a, z = lo - b * n, hi - b * n
            # NumPy's int64 multiply and add run several times faster than torch's addcmul here
            signed = self._signed[:, : z - a]
            np.multiply(self._patterns[:, a:z], values[lo - start : hi - start], out=signed)
            for t, level1 in enumerate(self._level1):
                o = self._offsets[t][b]
                dest = level1[o + a : o + z]
                (np.add if self._adds[t][b] else np.subtract)(dest, signed[t], out=dest)
            lo = hi

    def result(self) -> torch.Tensor:
        """``(repetitions, buckets)`` int64, in the ring."""
        w = self.wide
        out = torch.empty(len(self._level2), self.buckets, dtype=torch.int64)
        for t, (bucket, sign) in enumerate(self._level2):
            folded = self._level1[t, :w].copy()
            folded[: self.row] += self._level1[t, w:]
            out[t] = torch.zeros(self.buckets, dtype=torch.int64).index_add_(0, bucket, torch.from_numpy(folded) * sign)
        return out


def sketch(x: torch.Tensor, key: bytes, **sizes: int) -> torch.Tensor:
    """The sketch of a whole flat int64 vector (:class:`Sketcher`'s sizes as keywords)."""
    if x.dtype != torch.int64 or x.dim() != 1:
        raise ValueError(f"a sketch takes a flat int64 vector, got {x.dtype} of shape {list(x.shape)}")
    sketcher = Sketcher(x.numel(), key, **sizes)
    sketcher.add(0, x)
    return sketcher.result()


def estimates(y: torch.Tensor) -> torch.Tensor:
    """Each repetition's estimate of ``||x||^2`` from a sketch of plaintext (float64, no wrapping)."""
    return y.double().square().sum(dim=1)
