"""The update norm check: the aggregators learn one accept/reject bit per hospital, nothing else.

Every aggregator holds an additive share of each hospital's encoded update ``x`` (int64 ring,
``2^f`` units). When an aggregation begins, the aggregators draw a sketch key together (each
adds 32 bytes from the OS CSPRNG; hospitals never see it) and each sketches its own shares as
they arrive (mpc.sketch: linear, so the shares' sketches are shares of the sketch ``y`` of
``x``: ``r`` repetitions of ``k`` buckets). Once every share is in, with ``T = floor(B 2^f)``
for the public bound ``B``, they compute inside MPC (CrypTen, Beaver triples from the dealer)

    violations = #{c : y_c < -T} + #{c : y_c > T} + #{t : sum_c y_{t,c}^2 > T^2}

and reveal only ``[violations == 0]``: accept. The range checks come first because a square
of a ring element can wrap: with every ``|y_c| <= T`` each repetition's sum is below
``k T^2 < 2^62`` (:func:`max_bound`) and is the integer estimate of ``||x||^2 2^(2f)``.
Every comparison works on the full 64-bit ring (the shares come from a hospital that may
send anything), except the last, on the count, which is below 2^15.

What a pass means, for a key the hospital did not know (mpc.sketch's bound, ``e = 1 - 1/c^2``):
an update of norm ``c B`` passes with probability at most ``(2.1 / (k e^2))^r``; updates whose
entries are far beyond any model's (so large that a bucket's integer sum wraps the ring) pass
only where every such bucket cancels to within ``T`` in every repetition (behind this, the
coordinator refuses an average above ``2B``). An honest update of norm ``B / 1.25`` is rejected
with probability at most ``r 2.1 / (k 0.5625^2)`` (Chebyshev, any update; for dense updates the
estimate's relative spread is about ``sqrt(2/k)``).
"""

from __future__ import annotations

import hashlib
import math
import os

import torch

from medmpc.mpc import comparison, crypten_compat, sketch
from medmpc.mpc.launch import PARTY_NAMES_ENV, channel_environment
from medmpc.mpc.streams import KEY_BYTES

_COUNT_BITS = 16  # the violation count is at most 2 r k + r, below 2^15


def max_bound(fractional_bits: int, *, buckets: int = sketch.BUCKETS) -> float:
    """The largest ``B`` whose sums of ``buckets`` squares of values up to ``B 2^f`` stay below 2^62."""
    return math.floor(math.sqrt(2.0**62 / buckets)) / 2.0**fractional_bits


def world_environment(
    *, rank: int, names: list[str], addresses: list[str], tls_dir: str | None, listen: str = ""
) -> dict[str, str]:
    """The environment that makes CrypTen (mpc.tls_communicator) join the aggregators' world as
    ``names[rank]``: ``names`` and ``addresses`` list the aggregators by index, the dealer last
    (``tls_dir`` and ``listen`` as for :func:`mpc.launch.channel_environment`)."""
    world = {"RANK": str(rank), "WORLD_SIZE": str(len(names) - 1), PARTY_NAMES_ENV: ",".join(names)}
    return world | channel_environment(parties=",".join(addresses), tls_dir=tls_dir, listen=listen)


def join(environment: dict[str, str], *, timeout_s: float) -> None:
    """Join the aggregators' CrypTen world (blocks until every aggregator and the dealer are in)."""
    os.environ.update(environment)
    crypten = crypten_compat.init_party(timeout_s=timeout_s)
    crypten.cfg.communicator.verbose = True  # count the check's rounds and bytes


def serve_dealer(environment: dict[str, str], *, timeout_s: float) -> None:
    """The dealer: correlated randomness for the aggregators' checks until they leave."""
    os.environ.update(environment)
    crypten_compat.run_dealer(timeout_s=timeout_s)


def leave() -> None:
    crypten_compat.patched().uninit()


def agree_key() -> bytes:
    """A sketch key no single aggregator chose: the hash of every aggregator's 32 random bytes."""
    crypten = crypten_compat.patched()
    mine = torch.frombuffer(bytearray(os.urandom(KEY_BYTES)), dtype=torch.int64).clone()
    parts = crypten.communicator.get().all_gather(mine)
    return hashlib.sha256(b"".join(p.numpy().tobytes() for p in parts)).digest()


def everyone(flag: bool) -> bool:
    """Whether ``flag`` holds at every aggregator (one small exchange)."""
    crypten = crypten_compat.patched()
    flags = crypten.communicator.get().all_gather(torch.tensor([int(flag)], dtype=torch.int64))
    return all(int(f) for f in flags)


def prepare(n_hospitals: int, *, bound: float, fractional_bits: int) -> None:
    """Offline, before any update exists: the dealer makes every triple the check of
    ``n_hospitals`` will use (a pass on zero sketches records them, CrypTen's provider caches them)."""
    crypten = crypten_compat.patched()
    provider = crypten.mpc.get_default_provider()
    # CrypTen's provider keeps every request it ever traced (and refills them all) and the tuples
    # an unchecked collection left; the aggregators drop both at the same point, so stay in step
    provider.request_cache, provider.tuple_cache = [], {}
    provider.trace(True)
    try:
        placeholder = torch.zeros(n_hospitals, sketch.REPETITIONS, sketch.BUCKETS, dtype=torch.int64)
        accepted(placeholder, bound=bound, fractional_bits=fractional_bits)
    finally:
        provider.trace(False)
    provider.fill_cache()


def traffic() -> tuple[int, int]:
    """Bytes this aggregator has sent in the check's world, and the rounds, so far."""
    stats = crypten_compat.patched().communicator.get().get_communication_stats()
    return int(stats["bytes"]), int(stats["rounds"])


def accepted(sketches: torch.Tensor, *, bound: float, fractional_bits: int) -> list[bool]:
    """Run by every aggregator at once on its shares of the hospitals' sketches, ``(N, r, k)``
    int64 in hospital order: whether each hospital's update passes the bound ``bound``."""
    n, _, buckets = sketches.shape
    top = max_bound(fractional_bits, buckets=buckets)
    if not 0 < bound <= top:
        raise ValueError(f"update norm bound {bound} is outside (0, {top:g}] at {fractional_bits} fractional bits")
    crypten = crypten_compat.patched()
    limit = math.floor(bound * 2.0**fractional_bits)
    y = crypten.mpc.MPCTensor.from_shares(sketches, precision=0)
    # y < -T, y > T and the squared lengths above T^2, compared at once (one comparison's rounds)
    squares = y.square().sum(dim=2)
    tests = crypten.cat([(y + limit).view(n, -1), (limit - y).view(n, -1), limit * limit - squares], dim=1)
    count = comparison.less_than_zero(tests).sum(dim=1)
    accept = comparison.less_than_zero(count - 1, bits=_COUNT_BITS)
    return [bool(v) for v in accept.get_plain_text().round().long().tolist()]
