"""The update norm check (issue 20): the sketch's statistics, the check's bits and what the
aggregators see while computing them (real CrypTen processes with a dealer), and the plan's rules."""

import os
import tempfile
from pathlib import Path

import pytest
import torch
from uniformity import looks_uniform

from medmpc.mpc import sketch
from medmpc.mpc.launch import run_crypten_job
from medmpc.protocols.plan import Plan

HOOKS = Path(__file__).parent / "party_hooks"
F = 16  # fractional bits
BOUND = 2.0


def _ring(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(-(2**63), 2**63 - 1, (n,), dtype=torch.int64, generator=g)


def _dense(norm: float, n: int, g: torch.Generator) -> torch.Tensor:
    v = torch.randn(n, generator=g, dtype=torch.float64)
    return (v / v.norm() * norm * 2**F).round().long()


def test_the_sketch_is_linear_in_the_ring_and_may_be_fed_piece_by_piece():
    g = torch.Generator().manual_seed(1)
    a, b, key = _ring(300_001, g), _ring(300_001, g), os.urandom(32)
    assert torch.equal(sketch.sketch(a, key) + sketch.sketch(b, key), sketch.sketch(a + b, key))
    streamed = sketch.Sketcher(a.numel(), key)
    cuts = [0, 7, 65_536, 65_540, 200_000, a.numel()]
    for lo, hi in reversed(list(zip(cuts, cuts[1:]))):
        streamed.add(lo, a[lo:hi])
    assert torch.equal(streamed.result(), sketch.sketch(a, key))
    assert not torch.equal(sketch.sketch(a, os.urandom(32)), sketch.sketch(a, key))
    with pytest.raises(ValueError, match="does not fit"):
        streamed.add(300_000, a[:2])
    with pytest.raises(ValueError, match="32 bytes"):
        sketch.Sketcher(10, b"short")


def test_the_sketch_estimates_the_squared_norm_within_its_proven_variance():
    g = torch.Generator().manual_seed(2)
    x = _dense(3.0, 200_000, g)
    truth = float(x.double().square().sum())
    est = torch.cat([sketch.estimates(sketch.sketch(x, os.urandom(32))) for _ in range(60)]) / truth
    assert abs(float(est.mean()) - 1) < 0.03
    assert float(est.var()) <= 1.5 * sketch.variance_factor()  # sampling slack over the bound
    assert float((est - 1).abs().max()) < 0.25  # dense: spread about sqrt(2/k) = 0.044


def _fooled(x: torch.Tensor, *, offsets: bool, trials: int = 400) -> int:
    """How many fresh keys make every repetition estimate below a quarter of ||x||^2."""
    truth = float(x.double().square().sum())
    fooled = 0
    for _ in range(trials):
        sketcher = sketch.Sketcher(x.numel(), os.urandom(32))
        if not offsets:  # control: level 1 without its random rotations
            sketcher._offsets = [[0] * len(o) for o in sketcher._offsets]
        sketcher.add(0, x)
        fooled += bool((sketch.estimates(sketcher.result()) < truth / 4).all())
    return fooled


def test_an_update_built_to_cancel_in_the_sketch_is_caught_by_the_random_rotations():
    """Two rows of level 1 with one constant value each meet in every bucket whatever the rotation
    if there is none: with opposite row signs (half of the keys) they cancel completely."""
    x = torch.full((sketch.WIDE,), 1 << 20, dtype=torch.int64)  # two rows of W / 2
    assert _fooled(x, offsets=False) >= 10  # control: 1 key in 8 (3 repetitions) without rotations
    assert _fooled(x, offsets=True) == 0


def test_whole_rows_of_2_63_cancel_only_where_a_row_covers_every_bucket():
    """2^63 = -2^63 in the ring: added to an even number of rows that each reach every level-1
    bucket once, it cancels in every bucket for every key (the control, rows as wide as the
    buckets); rows covering a random half of the buckets leave it in the sketch."""
    g = torch.Generator().manual_seed(4)
    honest = _dense(1.0, 3 * sketch.WIDE, g)
    attack = honest.clone()
    attack[: 2 * sketch.WIDE] += -(2**63)
    keys = [os.urandom(32) for _ in range(3)]
    assert all(
        torch.equal(sketch.sketch(attack, k, row=sketch.WIDE), sketch.sketch(honest, k, row=sketch.WIDE)) for k in keys
    )
    assert not any(torch.equal(sketch.sketch(attack, k), sketch.sketch(honest, k)) for k in keys)


def test_the_coordinator_refuses_an_average_no_accepted_updates_make():
    from medmpc.protocols.coordinator import _check_average
    from medmpc.protocols.strategy import Aggregation, RoundAborted

    job = Aggregation(tag="round2", numel=4, round=2, divisor=3, norm_bound=1.0)
    _check_average(job, 1.7)  # below twice the bound
    with pytest.raises(RoundAborted, match="round2: the revealed average update has norm 3.*wrapping"):
        _check_average(job, 3.0)
    _check_average(Aggregation(tag="round2", numel=1, round=2, divisor=3), 1e9)  # no check


# ---- the check, in MPC -----------------------------------------------------------------


def _cases(g: torch.Generator, n: int) -> dict[str, torch.Tensor]:
    honest = _dense(0.8 * BOUND, n, g)
    edge = torch.zeros(n, dtype=torch.int64)
    edge[[3, 70_001]] = -(2**63)  # cancel mod 2^64 when they share a bucket; |value| 1.4e14
    wrap = torch.zeros(n, dtype=torch.int64)
    wrap[::1000] = 1 << 32  # every bucket a multiple of 2^32: its square wraps to 0
    rows = honest.clone()
    rows[: 2 * sketch.WIDE] += -(2**63)  # whole rows of 2^63 (see the test above)
    return {
        "zero": torch.zeros(n, dtype=torch.int64),
        "honest": honest,
        "boosted": honest * 100,
        "flipped": honest * -100,
        "above": _dense(1.25 * BOUND, n, g),
        "edge": edge,
        "wrap": wrap,
        "rows": rows,
    }


ACCEPTED = {
    "zero": True,
    "honest": True,
    "boosted": False,
    "flipped": False,
    "above": False,
    "edge": False,
    "rows": False,
}


@pytest.fixture(scope="module")
def checked() -> dict:
    """Every case secret-shared between two aggregators, sketched under one key and checked in
    MPC (each aggregator its own process, the dealer a third), with each aggregator's view."""
    g = torch.Generator().manual_seed(3)
    cases = _cases(g, 140_000)
    key = os.urandom(32)
    masks = [_ring(x.numel(), g) for x in cases.values()]
    shares = [[x - m for x, m in zip(cases.values(), masks)], masks]
    sketches = [torch.stack([sketch.sketch(s, key) for s in mine]) for mine in shares]
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")]))
        path = Path(tmp) / "sketches.pt"
        torch.save(sketches, path)
        args = {"sketches": str(path), "bound": BOUND, "fractional_bits": F}
        parties = run_crypten_job("views:recorded_norm_check", world_size=2, args=args, timeout_s=120)
    return {"cases": cases, "key": key, "sketches": sketches, "parties": parties}


def test_the_check_accepts_updates_within_the_bound_and_rejects_the_others(checked):
    bits = [dict(zip(checked["cases"], p["result"])) for p in checked["parties"]]
    assert bits[0] == bits[1]  # both aggregators learn the same bits
    assert {name: bits[0][name] for name in ACCEPTED} == ACCEPTED
    assert bits[0]["wrap"] is False


def test_without_its_range_checks_the_wrapping_update_would_pass(checked):
    """Control for the range checks: the ``wrap`` update's squared sketch lengths, computed in
    the ring as a check without them would, are 0, far below the bound."""
    wrap = list(checked["cases"]).index("wrap")
    y = checked["sketches"][0][wrap] + checked["sketches"][1][wrap]
    assert (y.square().sum(dim=1) == 0).all()
    assert float(checked["cases"]["wrap"].double().norm()) / 2**F > 1000 * BOUND


def _peer_messages(view: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """What the peer sent in every opening but the last (the revealed bits): words, and single bits."""
    words, bits = [], []
    for opening in view["opened"][:-1]:
        for mine, opened in zip(opening["mine"], opening["opened"]):
            peer = (opened ^ mine) if opening["xor"] else (opened - mine)
            is_bit = bool(((opened == 0) | (opened == 1)).all())
            (bits if is_bit else words).append(peer.reshape(-1))
    return words, bits


def test_each_aggregator_sees_only_uniformly_random_messages_and_the_bits(checked):
    for party in checked["parties"]:
        words, bits = _peer_messages(party["view"])
        assert sum(w.numel() for w in words) > 10_000 and looks_uniform(torch.cat(words))
        if bits:
            b = torch.cat(bits).double()
            assert abs(float(b.mean()) - 0.5) < 5 * 0.5 / b.numel() ** 0.5
    # control: had the sketch itself been opened, the uniformity test would say so
    honest = list(checked["cases"]).index("honest")
    assert not looks_uniform(checked["sketches"][0][honest] + checked["sketches"][1][honest])


# ---- the plan ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, problem",
    [
        ({"update_norm_bound": 5.0, "secure": False}, "needs a secure run"),
        ({"update_norm_bound": 5.0, "hospitals": 3}, "needs min_hospitals below"),
        ({"update_norm_bound": 1e6, "min_hospitals": 2}, "update_norm_bound must be in"),
        ({"update_norm_bound": -1.0, "min_hospitals": 2}, "update_norm_bound must be in"),
        ({"update_norm_factor": 3.0}, "needs update_norm_bound"),
        ({"update_norm_bound": 5.0, "update_norm_factor": 0.0, "min_hospitals": 2}, "must be positive"),
    ],
)
def test_the_plan_refuses_a_norm_check_it_cannot_run(settings, problem):
    with pytest.raises(ValueError, match=problem):
        Plan(**settings)


def test_an_adaptive_bound_follows_the_previous_average():
    plan = Plan(update_norm_bound=50.0, update_norm_factor=3.0, min_hospitals=2)
    assert plan.norm_bound(1, None) == 50.0
    assert plan.norm_bound(2, 4.0) == 12.0
    assert plan.norm_bound(3, 1e9) == 50.0  # never above the plan's: attackers cannot ratchet it up
    assert Plan(update_norm_bound=50.0, min_hospitals=2).norm_bound(5, 4.0) == 50.0
    assert plan.aggregation("round2", n_samples=999, n_hospitals=2) == (0.0, 2)
    assert "dealer" in plan.party_names and "dealer" not in Plan().party_names


def test_aggregators_take_the_bound_and_divisor_from_the_plan_not_the_coordinator():
    """A coordinator asking to skip the check, for another fixed bound, for a bound the ring cannot
    hold, or for a divisor other than the number of hospitals whose updates go in, is refused."""
    from medmpc.mpc.transport import PeerError
    from medmpc.protocols.aggregator import Aggregator
    from medmpc.protocols.messages import Collect

    fixed = Plan(hospitals=4, rounds=3, update_norm_bound=5.0)
    adaptive = Plan(hospitals=4, rounds=3, update_norm_bound=5.0, update_norm_factor=3.0)
    H = fixed.hospital_names[:3]

    def collect(round_: int, bound: float | None, divisor: int = 3, tag: str = "") -> Collect:
        return Collect(tag or f"round{round_}", numel=8, round=round_, divisor=divisor, noise_std=0.0,
                       hospitals=H, deferred=True, norm_bound=bound)  # fmt: skip

    for plan, asked, why in [
        (fixed, collect(1, None), "norm bound None"),
        (fixed, collect(2, 7.0), "norm bound 7.0"),
        (adaptive, collect(1, 7.0), "norm bound 7.0"),  # round 1 takes the plan's
        (adaptive, collect(2, 7.0), "norm bound 7.0"),  # adaptive bounds only tighten the plan's
        (fixed, collect(0, 5.0, divisor=1, tag="stats"), "norm bound 5.0"),  # the statistics are not checked
        (fixed, collect(2, 5.0, divisor=4), "divisor"),
    ]:
        with pytest.raises(PeerError, match=f"coordinator: .*{why}"):
            Aggregator(plan, 0)._state(asked)
    assert Aggregator(fixed, 0)._state(collect(2, 5.0)).divisor == 3
    assert Aggregator(adaptive, 1)._state(collect(2, 0.25)).divisor == 3
