"""Fixed-point encoding, CSPRNG shares, and what one aggregator's share reveals (nothing)."""

from fractions import Fraction

import pytest
import torch
from scipy import stats
from uniformity import as_unit, looks_uniform

from medmpc.mpc import prg, sharing
from medmpc.protocols.secure_aggregation import (
    AggregatorState,
    ContributionError,
    RevealRefused,
    clip_update,
    masked_share,
)


def test_encode_decode_round_trip_within_fixed_point_error():
    x = torch.randn(10_000) * 50
    assert (sharing.decode(sharing.encode(x, 16), 16) - x).abs().max() <= 2**-17 + 1e-5
    assert torch.equal(sharing.encode(torch.tensor([1.5, -2.25]), 16), torch.tensor([98304, -147456]))


def test_shares_reconstruct_exactly():
    x = sharing.encode(torch.randn(5000), 16)
    for k in (2, 3, 5):
        s = sharing.split(x, k)
        assert torch.equal(sharing.reconstruct([sharing.share_of(s, j) for j in range(k)]), x)


def test_seed_expansion_is_deterministic_and_seeds_are_fresh():
    seed = prg.new_seed()
    assert torch.equal(prg.expand(seed, 100), prg.expand(seed, 100))
    assert prg.new_seed() != seed
    assert not torch.equal(prg.expand(prg.new_seed(), 100), prg.expand(seed, 100))
    with pytest.raises(ValueError, match="32 bytes"):
        prg.expand(b"short", 4)


def test_seed_expansion_is_the_chacha20_keystream():
    """RFC 7539, appendix A.1, test vector 1 (all-zero key, nonce and counter)."""
    expected = (
        "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
        "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
    )
    assert prg.expand(bytes(32), 8).numpy().tobytes().hex() == expected


@pytest.mark.parametrize("party", [0, 1, 2])
def test_one_aggregators_shares_of_different_updates_are_indistinguishable(party):
    n = 50_000
    zeros = sharing.encode(torch.zeros(n), 16)
    big = sharing.encode(torch.full((n,), 1000.0) + torch.randn(n), 16)
    a = sharing.share_of(sharing.split(zeros, 3), party)
    b = sharing.share_of(sharing.split(big, 3), party)
    assert looks_uniform(a) and looks_uniform(b)
    assert stats.ks_2samp(as_unit(a), as_unit(b)).pvalue > 1e-4


def test_the_statistical_check_catches_update_plus_small_noise():
    """The checks above have power: a 'share' that is the update plus noise fails them."""
    n = 50_000
    zeros = sharing.encode(torch.zeros(n), 16)
    big = sharing.encode(torch.full((n,), 1000.0), 16)
    noisy = [x + torch.randint(-(2**20), 2**20, (n,)) for x in (zeros, big)]
    assert not looks_uniform(noisy[0]) and not looks_uniform(noisy[1])
    # compare low-order bits, where the noise lives
    low = [(x & ((1 << 30) - 1)).double().numpy() for x in noisy]
    assert stats.ks_2samp(*low).pvalue < 1e-6


def test_guards_name_the_hospital():
    mask = sharing.new_mask(2, 3)
    for bad, what in (
        (torch.tensor([1.0, float("nan"), 0]), "NaN/Inf"),
        (torch.tensor([1.0, float("inf"), 0]), "NaN/Inf"),
        (torch.tensor([1.0, 2.0**46, 0]), "overflow"),
    ):
        with pytest.raises(sharing.EncodingError, match=f"hospital7.*{what}|hospital7: .*{what}"):
            masked_share(bad, mask, hospital="hospital7", n_hospitals=3, fractional_bits=16)
    # the limit is N * max|x| * 2^f < 2^62
    masked_share(torch.tensor([2.0**44]), sharing.new_mask(2, 1), hospital="h", n_hospitals=3, fractional_bits=16)


def test_reveal_is_refused_until_every_hospital_contributed():
    names = ["hospital0", "hospital1", "hospital2"]
    state = AggregatorState("round1", names, 4, n_aggregators=2)
    state.add("hospital0", torch.ones(4, dtype=torch.int64))
    state.add("hospital2", torch.ones(4, dtype=torch.int64))
    with pytest.raises(RevealRefused, match="2 of 3.*hospital1"):
        state.average_share()
    with pytest.raises(ContributionError, match="second share"):
        state.add("hospital0", torch.ones(4, dtype=torch.int64))
    with pytest.raises(ContributionError, match="unexpected sender"):
        state.add("hospital9", torch.ones(4, dtype=torch.int64))
    with pytest.raises(ContributionError, match="expected 4 int64"):
        state.add("hospital1", torch.ones(5, dtype=torch.int64))
    state.add("hospital1", torch.full((4,), 5, dtype=torch.int64))
    assert torch.cat(list(state.average_share())).tolist() == [7, 7, 7, 7]


def test_a_share_still_arriving_piece_by_piece_does_not_count():
    state = AggregatorState("round1", ["hospital0", "hospital1"], 4, n_aggregators=2)
    state.add("hospital1", torch.ones(4, dtype=torch.int64))
    state.admit("hospital0", torch.int64, 4)
    state.add_piece(0, torch.full((2,), 3, dtype=torch.int64))
    with pytest.raises(RevealRefused, match="1 of 2.*hospital0"):
        state.average_share()
    with pytest.raises(ContributionError, match="second share"):
        state.admit("hospital0", torch.int64, 4)
    state.add_piece(2, torch.full((2,), 3, dtype=torch.int64))
    state.complete("hospital0")
    assert torch.cat(list(state.average_share())).tolist() == [4, 4, 4, 4]


def test_the_coordinator_and_the_collector_together_learn_only_the_sum():
    """What the coordinator receives ahead of time from aggregator 1 is the sum of every
    hospital's mask: with the collector's masked updates it unmasks the sum, and no single
    update (control: an individual mask would unmask one)."""
    n = 50_000
    updates = [torch.full((n,), 1000.0) + torch.randn(n), torch.zeros(n), torch.randn(n) * 5]
    masks = [sharing.new_mask(2, n) for _ in updates]
    masked = [
        torch.cat([p.clone() for p in masked_share(x, m, hospital=f"hospital{i}", n_hospitals=3, fractional_bits=16)])
        for i, (x, m) in enumerate(zip(updates, masks))
    ]
    offline = sum(prg.expand(m.seeds[0], n) for m in masks)  # aggregator 1's share of the sum
    assert torch.equal(sum(masked) + offline, sum(sharing.encode(x, 16) for x in updates))
    attempts = [masked[0] + offline, masked[1] + offline]  # unmasking hospital 0, or hospital 1
    assert looks_uniform(attempts[0]) and looks_uniform(attempts[1])
    assert stats.ks_2samp(as_unit(attempts[0]), as_unit(attempts[1])).pvalue > 1e-4
    assert torch.equal(masked[0] + prg.expand(masks[0].seeds[0], n), sharing.encode(updates[0], 16))


def test_a_clipped_update_encodes_within_the_clip_norm_on_the_integers():
    """Central DP's sensitivity is the norm of what is encoded: rounding each value to the nearest
    grid step could add up to sqrt(d) 2^-(f+1). Every value here is 1.51 steps, already at the clip:
    to nearest, each would grow to 2 steps."""
    f, d = 16, 1000
    at_clip = torch.full((d,), 1.51 * 2.0**-f)
    clip = float(at_clip.double().norm())
    for update in (at_clip, torch.randn(d) * 1e-3, -at_clip.double()):  # at the clip; far above it; float64
        clipped = clip_update(update, clip=clip, fractional_bits=f)
        k = sharing.encode(clipped, f)
        assert int((k * k).sum()) <= Fraction(clip * 2**f) ** 2  # exact, on the integers
        scaled = update.double() * min(1.0, clip / float(update.double().norm()))
        assert float((clipped.double() - scaled).abs().max()) <= 2.0**-f  # within one grid step of the clip
