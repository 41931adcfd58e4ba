"""Dividing shared sums by a public integer: every party locally, the wrap corrected at reveal."""

import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from medmpc.mpc import division, kernels, prg, sharing
from medmpc.protocols.secure_aggregation import AggregatorState, masked_share, reveal_decoder


def _shares(x: torch.Tensor, k: int) -> list[torch.Tensor]:
    s = sharing.split(x, k)
    return [sharing.share_of(s, j) for j in range(k)]


def _divided(share: torch.Tensor, d: int, extra: int = 0) -> torch.Tensor:
    division.divide_in_place(share.numpy(), d, extra)
    return share


def _reveal(parts: list[torch.Tensor], d: int, extra: int = 0) -> torch.Tensor:
    decoder = division.QuotientDecoder(len(parts), d, extra=extra)
    out = decoder.empty(parts[0].numel())
    decoder.decode(parts, out, 0, out.numel())
    return out


def _quotient_error(x: torch.Tensor, k: int, d: int, extra: int = 0) -> np.ndarray:
    """Revealed quotient minus the exact x * 2^extra / d, in units of the last place."""
    got = _reveal([_divided(p, d, extra) for p in _shares(x, k)], d, extra)
    # exact rational comparison: got - x 2^e / d = (got * d - x 2^e) / d, in Python integers
    return np.array([(int(g) * d - (int(v) << extra)) / d for g, v in zip(got[:20_000], x[:20_000])])


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("d", [1, 2, 3, 10, 40, 4_217, 1 << 28])
@pytest.mark.parametrize("with_extra", [False, True])
def test_quotient_is_within_k_over_2_plus_1_units_for_any_sum_the_guard_admits(k, d, with_extra):
    n = 20_000
    extra = division.extra_bits(d, k) if with_extra else 0
    x = torch.randint(-(2**62) + 1, 2**62, (n,))
    x[:6] = torch.tensor([0, 1, -1, 2**62 - 1, -(2**62) + 1, d])
    err = _quotient_error(x, k, d, extra)
    assert np.abs(err).max() <= k / 2 + 1
    if d == 1:
        assert not err.any()  # nothing to divide: exact


def test_the_quotient_gains_every_bit_the_divisor_allows():
    assert [division.extra_bits(d, 2) for d in (1, 7, 8, 15, 16, 3_900, 1 << 28)] == [0, 0, 0, 0, 1, 8, 25]
    assert division.extra_bits(3_900, 3) == 8 and division.extra_bits(3_900, 5) == 7
    with pytest.raises(ValueError, match="too many"):
        division.QuotientDecoder(2, 3_900, extra=9)


def test_two_party_local_truncation_without_the_correction_fails_on_large_sums():
    """Control: CrypTen's two-party division (each party divides, no correction) is off by
    about 2^64/d on a fraction |x|/2^64 of the elements; ours is not."""
    n, d = 20_000, 3
    x = torch.randint(2**61, 2**62, (n,))
    parts = [p.div(d, rounding_mode="trunc") for p in _shares(x, 2)]
    naive = sharing.reconstruct(parts)
    wrong = ((naive - x.div(d, rounding_mode="floor")).abs() > 4).float().mean()
    assert 0.05 < wrong < 0.5
    assert np.abs(_quotient_error(x, 2, d)).max() <= 2


def test_inconsistent_shares_and_bad_divisors_are_errors():
    with pytest.raises(ValueError, match="do not reconstruct a sum below 2\\^62"):
        _reveal([prg.random_ring(10_000) for _ in range(3)], 10)
    for d in (0, -3, (1 << 28) + 1):
        with pytest.raises(ValueError, match="divisor"):
            division.divide_in_place(np.zeros(3, dtype=np.int64), d)
        with pytest.raises(ValueError, match="divisor"):
            division.QuotientDecoder(2, d)


def _secure_average(updates: list[torch.Tensor], k: int, divisor: int) -> tuple[torch.Tensor, division.QuotientDecoder]:
    """Every hospital's update shared among ``k`` aggregators, each aggregator's sum divided by
    ``divisor``, the average reconstructed range by range, as the coordinator decodes while
    the collector's share arrives."""
    n = updates[0].numel()
    names = [f"hospital{i}" for i in range(len(updates))]
    states = [AggregatorState("r", names, n, n_aggregators=k, divisor=divisor) for _ in range(k)]
    for name, u in zip(names, updates):
        mask = sharing.new_mask(k, n)
        pieces = masked_share(u, mask, hospital=name, n_hospitals=len(names), fractional_bits=16)
        shares = sharing.Shares(torch.cat(list(pieces)), mask.seeds)
        for j, state in enumerate(states):
            state.add(name, sharing.share_of(shares, j))
    parts = [torch.cat(list(state.average_share())) for state in states]
    decoder = reveal_decoder(k, divisor, fractional_bits=16)
    avg = decoder.empty(n)
    for lo in range(0, n, 7_000):
        decoder.decode(parts, avg, lo, min(lo + 7_000, n))
    return avg, decoder


@pytest.mark.parametrize("k", [2, 3])
def test_secure_average_matches_the_plaintext_average(k):
    updates = [torch.randn(30_000) * s for s in (0.01, 1.0, 300.0)]
    avg, _ = _secure_average(updates, k, divisor=3)
    expected = torch.stack(updates).double().mean(0)
    assert avg.dtype == torch.float32
    # encoding (half a unit) + division (k/2 + 1 units) + float32 decoding
    assert ((avg.double() - expected).abs() <= (k / 2 + 1.5) * 2**-16 + expected.abs() * 2**-23).all()


def test_a_weighted_average_comes_out_near_float32_precision():
    """Hospitals weight their updates by their sample counts; dividing by the total (3900)
    keeps 8 extra fractional bits, so the average is 2^8 times finer than the 2^-16 grid of the
    sum (the plain division's error, up to 2 units of 2^-16, would fail this bound)."""
    k, counts = 2, (1_000, 1_300, 1_600)
    weighted = [c * torch.randn(30_000) * 1e-3 for c in counts]
    divisor = sum(counts)
    avg, decoder = _secure_average(weighted, k, divisor)
    expected = torch.stack(weighted).double().sum(0) / divisor
    # encoding (half a unit of 2^-16 per hospital, divided by the total), division (k/2 + 1
    # units of 2^-24), float32
    bound = 3 * 0.5 * 2**-16 / divisor + (k / 2 + 1) * 2**-24 + expected.abs() * 2**-23
    assert decoder.extra == 8 and bound.max() < 2**-21
    assert ((avg.double() - expected).abs() <= bound).all()


def test_each_block_is_divided_once_every_hospital_added_its_piece_of_it():
    """The aggregator divides blocks of its sum while other blocks are still arriving; a block
    is final (and divided) only when every expected hospital's piece of it is in."""
    block, d = AggregatorState.BLOCK, 7
    n = 2 * block + 1_000  # three blocks, the last one short
    names = ["hospital0", "hospital1"]
    shares = [prg.random_ring(n) for _ in names]
    start = prg.random_ring(n)  # e.g. this aggregator's part of the noise
    state = AggregatorState("r", names, n, n_aggregators=2, divisor=d, start=start.clone())
    for name in names:
        state.admit(name, torch.int64, n)
    cuts = [0, 100_000, block + 5, n]  # pieces that straddle block boundaries
    for lo, hi in itertools.pairwise(cuts):
        state.add_piece(lo, shares[0][lo:hi])
    state.add_piece(0, shares[1][: block + 5])  # first block complete, second not
    total = start + shares[0] + shares[1]
    held = state.shared.share
    assert torch.equal(held[:block], total[:block].div(d, rounding_mode="floor"))
    assert torch.equal(held[block : block + 5], total[block : block + 5])  # not final: not divided
    state.add_piece(block + 5, shares[1][block + 5 :])
    for name in names:
        state.complete(name)
    assert torch.equal(torch.cat(list(state.average_share())), total.div(d, rounding_mode="floor"))


def test_hospitals_adding_the_same_blocks_at_once_lose_nothing():
    """The collector adds every hospital's pieces from its own thread; each block has its own
    lock, and a block is divided exactly once, after its last piece, whatever the order."""
    block, d, n_hospitals = AggregatorState.BLOCK, 3, 6
    n = 4 * block + 17
    names = [f"hospital{i}" for i in range(n_hospitals)]
    shares = [prg.random_ring(n) for _ in names]
    state = AggregatorState("r", names, n, n_aggregators=2, divisor=d)
    for name in names:
        state.admit(name, torch.int64, n)
    starts = list(range(0, n, block))

    def contribute(i: int) -> None:
        for lo in starts if i % 2 else reversed(starts):  # every block is added to by several at once
            state.add_piece(lo, shares[i][lo : lo + block])
        state.complete(names[i])

    with ThreadPoolExecutor(n_hospitals) as pool:
        list(pool.map(contribute, range(n_hospitals)))
    expected = torch.stack(shares).sum(0).div(d, rounding_mode="floor")
    assert torch.equal(torch.cat(list(state.average_share())), expected)


def test_encoding_over_a_mask_equals_encoding_then_masking():
    x = torch.randn(200_001) * 40
    mask = sharing.new_mask(3, x.numel())
    expected = sharing.apply_mask(sharing.encode(x, 16), mask).masked
    over = mask.total.clone()
    pieces = list(sharing.encode_pieces(x, 16, out=over, subtract=True))
    assert len(pieces) > 1 and torch.equal(torch.cat(pieces), expected) and torch.equal(over, expected)
    with pytest.raises(ValueError, match="mask has 5"):
        sharing.encode_pieces(x, 16, out=torch.zeros(5, dtype=torch.int64), subtract=True)


def test_warm_up_compiles_what_encoding_and_decoding_then_use():
    kernels.warm_up()
    compiled = [len(k.signatures) for k in (kernels.encode_into, kernels.decode_scaled)]
    sharing.encode(torch.randn(10), 16)  # model updates
    sharing.encode(torch.randn(10, dtype=torch.float64), 16)  # statistics
    decoder = reveal_decoder(2, 3, fractional_bits=16)
    parts = sharing.split(sharing.encode(torch.randn(10), 16), 2)
    out = decoder.empty(10)
    decoder.decode([parts.masked, sharing.share_of(parts, 1)], out, 0, 10)
    # nothing new was compiled: the first aggregation finds its loops loaded
    assert [len(k.signatures) for k in (kernels.encode_into, kernels.decode_scaled)] == compiled
