"""DP-SGD: accounting against Opacus, clipping, planning, budget exhaustion, model checks."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from medmpc_cli import medmpc
from opacus.accountants import RDPAccountant

from medmpc.models import build_model
from medmpc.protocols.hospital import hospital_partition
from medmpc.protocols.plan import Plan
from medmpc.protocols.simulate import simulate
from medmpc.training.accountant import ORDERS, BudgetError, PrivacyAccountant, plan_noise_multiplier
from medmpc.training.checkpoint import Checkpoint
from medmpc.training.dp import DPSGD, DPConfig, DPIncompatibleModel, check_compatible
from medmpc.training.statistics import local_statistics


@pytest.mark.parametrize("sigma,q,steps", [(1.0, 0.01, 1000), (0.8, 0.05, 300), (2.0, 0.25, 40)])
def test_epsilon_matches_opacus_reference_accountant(sigma, q, steps):
    ours = PrivacyAccountant()
    ours.step(sigma, q, steps)
    ref = RDPAccountant()
    ref.history = [(sigma, q, steps)]
    # we search more Renyi orders than Opacus's default list: never looser, at most slightly tighter
    assert ours.epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5), rel=0.02)
    assert ours.epsilon(1e-5) <= ref.get_epsilon(1e-5) + 1e-9
    assert ours.epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5, alphas=ORDERS), rel=1e-9)


def test_composition_over_rounds_with_different_noise():
    ours, ref = PrivacyAccountant(), RDPAccountant()
    for sigma, q, n in [(1.0, 0.05, 100), (1.0, 0.05, 100), (1.5, 0.05, 50)]:
        ours.step(sigma, q, n)
        ref.history.append((sigma, q, n))
    assert ours.steps == 250 and len(ours.history) == 2  # equal consecutive entries merge
    assert ours.epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5), rel=0.02)
    assert PrivacyAccountant.from_dict(ours.to_dict()).epsilon(1e-5) == ours.epsilon(1e-5)


def test_planned_noise_meets_the_budget_and_impossible_plans_are_refused():
    sigma = plan_noise_multiplier(epsilon=8, delta=1e-5, sample_rate=0.04, steps=500, who="h1")
    acc = PrivacyAccountant()
    acc.step(sigma, 0.04, 500)
    assert 7.9 <= acc.epsilon(1e-5) <= 8.0
    with pytest.raises(BudgetError, match="h1"):
        plan_noise_multiplier(epsilon=0.001, delta=1e-5, sample_rate=0.5, steps=10_000, who="h1")


def test_every_per_sample_gradient_is_clipped_to_c():
    """Ghost clipping never materialises per-sample gradients; its update must equal clipping the
    per-sample gradients computed one by one, each to norm C."""
    torch.manual_seed(0)
    clip = 0.05
    x, y = torch.randn(8, 1, 32, 32) * 3, torch.randint(0, 3, (8,))
    reference = build_model("resnet18_gn", 3, seed=0)  # conv layers on both sides of the ghost/direct choice
    raw = []
    for i in range(8):
        reference.zero_grad(set_to_none=True)
        F.cross_entropy(reference(x[i : i + 1]), y[i : i + 1]).backward()
        raw.append([p.grad.clone() for p in reference.parameters()])
    norms = torch.stack([torch.cat([g.reshape(-1) for g in gs]).norm() for gs in raw])
    factors = (clip / norms).clamp(max=1.0)
    want = [sum(f * gs[k] for f, gs in zip(factors, raw)) for k in range(len(raw[0]))]

    model = build_model("resnet18_gn", 3, seed=0)
    dp = DPSGD(
        DPConfig(epsilon=10, clip=clip, noise_multiplier=0.0), n_samples=64, batch_size=8, planned_epochs=1, who="t"
    )
    wrapped, opt = dp.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1))
    opt.zero_grad(set_to_none=True)
    dp.backward(wrapped, x, y)
    assert torch.allclose(wrapped.per_sample_gradient_norms, norms, rtol=1e-3)
    for got, expected in zip((p.grad for p in model.parameters()), want):
        assert torch.allclose(got, expected, rtol=1e-3, atol=1e-6)
    dp.unwrap(wrapped)
    assert (norms > clip).all()  # clipping was active for every sample
    clipped = torch.stack([f * n for f, n in zip(factors, norms)])
    assert clipped.max() <= clip * (1 + 1e-4)


def _private_step(x: torch.Tensor, y: torch.Tensor, cfg: DPConfig) -> torch.Tensor:
    """The change one DP-SGD step (plain SGD, lr 1, expected batch 4) makes to a seeded small model."""
    model = build_model("cnn_gn", 3, seed=0)
    dp = DPSGD(cfg, n_samples=40, batch_size=4, planned_epochs=1, who="t")
    wrapped, opt = dp.wrap(model, torch.optim.SGD(model.parameters(), lr=1.0))
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    dp.backward(wrapped, x, y)
    opt.step()
    dp.unwrap(wrapped)
    return torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before)])


@pytest.mark.parametrize("physical_batch", [64, 1])
def test_dp_noise_comes_from_the_csprng_not_the_seeded_torch_generator(physical_batch):
    """Two runs from the same public seed must not get the same noise (it could be subtracted);
    a batch run in pieces gets the noise once (per piece, its spread would double here)."""
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 1])
    steps = []
    for _ in range(2):
        torch.manual_seed(0)  # what a run does with its published seed
        steps.append(_private_step(x, y, DPConfig(epsilon=8, noise_multiplier=1.0, physical_batch=physical_batch)))
    noise = (steps[0] - steps[1]) * 4 / 2**0.5  # lr 1, expected batch 4, the difference of two draws
    assert not torch.equal(steps[0], steps[1])
    assert float(noise.std()) == pytest.approx(1.0, rel=0.05)  # sigma * C = 1


def test_a_batch_in_pieces_takes_the_step_of_one_pass():
    """Ten images, three at a time: the clipped sums of the pieces add up to the one-pass step. The
    control: the last piece alone (what a step that dropped the earlier pieces would take) differs."""
    torch.manual_seed(0)
    x, y = torch.randn(10, 1, 32, 32) * 3, torch.randint(0, 3, (10,))
    quiet = DPConfig(epsilon=8, clip=0.05, noise_multiplier=0.0)
    whole = _private_step(x, y, quiet)
    pieces = _private_step(x, y, DPConfig(epsilon=8, clip=0.05, noise_multiplier=0.0, physical_batch=3))
    assert torch.allclose(pieces, whole, rtol=1e-4, atol=1e-7)
    last_only = _private_step(x[9:], y[9:], quiet)
    assert not torch.allclose(last_only, whole, rtol=0.1, atol=1e-4)


def test_a_physical_batch_below_one_is_refused():
    with pytest.raises(ValueError, match="physical batch must be at least 1 image, got 0"):
        DPConfig(epsilon=8, physical_batch=0)
    with pytest.raises(ValueError, match="physical batch must be at least 1 image"):
        Plan(dp_epsilon=8, model="cnn_gn", dp_physical_batch=0)


def test_poisson_sampling_is_secret_and_has_the_accounted_rates():
    labels = torch.tensor([0] * 600 + [1] * 400)
    weight = torch.tensor([1.0, 2.0])  # class 1 at the full rate q, class 0 at q / 2
    draws = []
    for _ in range(2):
        torch.manual_seed(0)  # a public seed must not fix which samples a step uses
        dp = DPSGD(
            DPConfig(epsilon=100, noise_multiplier=1.0), n_samples=1000, batch_size=100, planned_epochs=3, who="t"
        )
        dp.reserve(3)
        draws.append([b for _ in range(3) for b in dp.batches(labels, weight)])
    assert any(not torch.equal(a, b) for a, b in zip(*draws))
    hits = torch.zeros(1000)
    for batch in draws[0] + draws[1]:
        hits[batch] += 1
    steps = len(draws[0]) + len(draws[1])  # 60 steps at q = 0.1
    assert float(hits[600:].mean()) / steps == pytest.approx(0.1, rel=0.1)
    assert float(hits[:600].mean()) / steps == pytest.approx(0.05, rel=0.1)


def test_training_without_reserving_budget_is_refused():
    dp = DPSGD(DPConfig(epsilon=8), n_samples=100, batch_size=10, planned_epochs=2, who="h0")
    with pytest.raises(BudgetError, match="not reserved"):
        next(dp.batches(torch.zeros(100, dtype=torch.long), None))
    dp.reserve(2)
    assert 7.5 < dp.epsilon <= 8.0
    with pytest.raises(BudgetError, match="h0: privacy budget exhausted"):
        dp.reserve(1)


def test_batchnorm_model_is_refused_with_the_layer_and_the_fix():
    with pytest.raises(DPIncompatibleModel, match=r"layer '1' is BatchNorm2d.*'cnn_gn'"):
        check_compatible(build_model("cnn", 3), "cnn")
    with pytest.raises(DPIncompatibleModel, match=r"layer 'bn1' is BatchNorm2d.*'resnet18_gn'"):
        check_compatible(build_model("resnet18", 3), "resnet18")
    check_compatible(build_model("resnet18_gn", 3), "resnet18_gn")


@pytest.mark.slow
def test_federated_run_stops_cleanly_when_the_budget_is_spent(tmp_path):
    plan = Plan(
        data="synthetic:240",
        image_size=32,
        hospitals=3,
        rounds=3,
        batch_size=32,
        model="cnn_gn",
        timeout_s=60,
        dp_noise=2.0,
        dp_epsilon=1.0,
    )
    # pick a budget that one round fits and two rounds do not (the smallest hospital spends fastest)
    n_min = min(len(hospital_partition(plan, i)) for i in range(plan.hospitals))
    dp = DPSGD(DPConfig(epsilon=100, noise_multiplier=2.0), n_samples=n_min, batch_size=32, planned_epochs=1, who="x")
    one = dp.accountant.epsilon_after(2.0, dp.sample_rate, dp.steps_per_epoch, 1e-5)
    two = dp.accountant.epsilon_after(2.0, dp.sample_rate, 2 * dp.steps_per_epoch, 1e-5)
    plan.dp_epsilon = (one + two) / 2
    report = simulate(plan, tmp_path)
    assert "privacy budget exhausted" in report["stopped"] and len(report["rounds"]) == 1
    eps = report["rounds"][0]["privacy"]
    assert set(eps) == {"hospital0", "hospital1", "hospital2"}
    assert all(0 < e["epsilon"] <= plan.dp_epsilon for e in eps.values())
    info = Checkpoint.load(tmp_path / "model.pt").info
    assert info["round"] == 1 and info["privacy"]["hospital0"]["noise_multiplier"] == 2.0


@pytest.mark.slow
def test_dp_training_cli_reports_epsilon_per_epoch(tmp_path):
    common = ("train", "--data", "synthetic:240", "--image-size", 32, "--epochs", 2, "--dp-epsilon", 5)
    proc = medmpc(*common, "--model", "cnn_gn", "--out", tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    eps = [h["epsilon"] for h in report["history"]]
    assert 0 < eps[0] < eps[1] <= 5.0 and report["privacy"]["target_epsilon"] == 5.0
    assert Checkpoint.load(tmp_path / "model.pt").info["privacy"]["epsilon"] == pytest.approx(eps[1])
    assert "epsilon" in proc.stdout
    bad = medmpc(*common, "--model", "cnn", "--out", tmp_path / "x", check=False)
    assert bad.returncode == 2 and "BatchNorm2d" in bad.stderr and "cnn_gn" in bad.stderr
    pieces = medmpc(*common, "--model", "cnn_gn", "--dp-physical-batch", 7, "--out", tmp_path / "pieces")
    assert "epsilon" in pieces.stdout
    unbudgeted = medmpc(
        "train", "--data", "synthetic:240", "--dp-physical-batch", 8, "--out", tmp_path / "y", check=False
    )
    assert unbudgeted.returncode == 2 and "--dp-physical-batch need --dp-epsilon" in unbudgeted.stderr


@pytest.mark.parametrize("name", ["cnn_gn", "resnet18_gn"])
def test_every_group_norm_model_takes_a_private_step(name):
    model = build_model(name, 3, seed=0)
    check_compatible(model, name)
    dp = DPSGD(DPConfig(epsilon=8), n_samples=40, batch_size=4, planned_epochs=1, who="t")
    before = [p.detach().clone() for p in model.parameters()]
    wrapped, opt = dp.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1))
    dp.backward(wrapped, torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 1]))
    opt.step()
    dp.unwrap(wrapped)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(not torch.equal(a, b) for a, b in zip(before, model.parameters())) > 10


def test_csprng_gaussian_has_the_requested_spread():
    from medmpc.mpc.prg import gaussian

    x = gaussian(100_000, 2.5)
    assert abs(float(x.mean())) < 0.05 and float(x.std()) == pytest.approx(2.5, rel=0.02)
    assert not torch.equal(gaussian(10, 1.0), gaussian(10, 1.0))


@pytest.mark.parametrize("sigma", [0.8, 3.0, 40_000.0])
def test_discrete_gaussian_matches_its_distribution(sigma):
    from scipy import stats

    from medmpc.mpc.prg import discrete_gaussian, gaussian

    n = 200_000
    x = discrete_gaussian(n, sigma)
    assert x.dtype == torch.int64 and x.numel() == n
    assert abs(float(x.double().mean())) < 5 * sigma / n**0.5
    if sigma > 100:  # wide: the variance is sigma^2
        assert float(x.double().std()) == pytest.approx(sigma, rel=0.01)
        return
    # narrow: the probability of each integer is exp(-k^2 / 2 sigma^2) / Z (chi-square test)
    ks = torch.arange(-int(6 * sigma) - 1, int(6 * sigma) + 2)
    p = torch.exp(-(ks.double() ** 2) / (2 * sigma**2))
    p /= p.sum()
    keep = p * n > 5

    def pvalue(sample: torch.Tensor) -> float:
        observed = torch.stack([(sample == k).sum() for k in ks]).double()[keep]
        return stats.chisquare(observed, p[keep] * observed.sum() / p[keep].sum()).pvalue

    assert pvalue(x) > 1e-4
    if sigma < 1:  # the control: a rounded continuous Gaussian is a different distribution
        assert pvalue(torch.round(gaussian(n, sigma)).long()) < 1e-6


@pytest.mark.slow
def test_central_dp_noise_is_added_inside_mpc_with_the_planned_spread(tmp_path):
    """Same seeds with and without central noise: the global models differ by exactly the noise / N."""
    common = dict(
        data="synthetic:240",
        image_size=32,
        hospitals=3,
        aggregators=2,
        rounds=1,
        batch_size=32,
        model="cnn_gn",
        timeout_s=60,
        update_clip=0.5,
    )
    quiet = simulate(Plan(**common, central_dp_noise=0.0), tmp_path / "quiet")
    noisy = simulate(Plan(**common, central_dp_noise=2.0), tmp_path / "noisy")
    a = Checkpoint.load(tmp_path / "quiet" / "model.pt").state_dict
    b = Checkpoint.load(tmp_path / "noisy" / "model.pt").state_dict
    diff = torch.cat([(b[k] - a[k]).reshape(-1) for k in a if a[k].is_floating_point()])
    assert float(diff.std()) == pytest.approx(2.0 * 0.5 / 3, rel=0.05)
    assert abs(float(diff.mean())) < 0.01
    cdp = noisy["rounds"][0]["central_dp"]
    assert cdp["effective_noise_multiplier"] == pytest.approx(2.0 / 2**0.5)
    ref = PrivacyAccountant()
    ref.step(2.0 / 2**0.5, 1.0, 1)
    assert cdp["epsilon"] == pytest.approx(ref.epsilon(1e-5))
    assert quiet["rounds"][0]["central_dp"]["epsilon"] is None


@pytest.mark.slow
def test_noisy_statistics_are_released_and_accounted_with_dp_sgd(tmp_path):
    plan = Plan(
        data="synthetic:240",
        image_size=32,
        hospitals=3,
        rounds=1,
        batch_size=32,
        model="cnn_gn",
        timeout_s=60,
        dp_epsilon=8.0,
        stats_noise=4.0,
    )
    report = simulate(plan, tmp_path)
    stats = report["aggregated_statistics"]
    exact = sum(local_statistics(hospital_partition(plan, i)) for i in range(plan.hospitals))
    assert stats["pixel_mean"] != pytest.approx(float(exact[1] / exact[0]), abs=1e-4)  # noise was added
    assert stats["pixel_mean"] == pytest.approx(float(exact[1] / exact[0]), abs=0.2)  # but only noise
    released = stats["privacy"]
    assert released["noise_multiplier"] == pytest.approx(4.0 * 0.5**0.5 / 2)  # K=2: one part is known
    # each hospital's budget covers both releases: statistics first, then DP-SGD, ending at 8
    for h in report["rounds"][0]["privacy"].values():
        assert released["epsilon"] < h["epsilon"] <= 8.0
        assert h["steps"] > 1  # the statistics step plus the training steps


def test_aggregators_take_the_noise_and_divisor_from_the_plan_not_the_coordinator():
    """A coordinator asking for less noise than the plan accounts for, another divisor than the plan
    fixes, or an aggregation the plan does not have, is refused; asked right, the plan's noise is drawn."""
    from medmpc.mpc.transport import PeerError
    from medmpc.protocols.aggregator import Aggregator
    from medmpc.protocols.messages import Collect, Stats, Train

    plan = Plan(hospitals=3, aggregators=2, rounds=2, central_dp_noise=2.0, update_clip=0.5)
    agg, n, H = Aggregator(plan, 0), 4000, plan.hospital_names
    for collect, why in [
        (Collect("round1", numel=n, round=1, divisor=3, noise_std=0.0, hospitals=H, deferred=False), "noise_std"),
        (Collect("round1", numel=n, round=1, divisor=1, noise_std=1.0, hospitals=H, deferred=False), "divisor"),
        (
            Collect("round3", numel=n, round=3, divisor=3, noise_std=1.0, hospitals=H, deferred=False),
            "round3",
        ),  # past the planned rounds
        (
            Collect("bench0", numel=n, round=0, divisor=3, noise_std=0.0, hospitals=H, deferred=False),
            "bench0",
        ),  # no such aggregation
    ]:
        with pytest.raises(PeerError, match=f"coordinator: .*{why}"):
            agg._state(collect)
    planned = Collect("round1", numel=n, round=1, divisor=3, noise_std=1.0, hospitals=H, deferred=False)
    part = agg._state(planned).shared.share.double() * 2.0**-plan.fractional_bits
    assert float(part.std()) == pytest.approx(2.0 * 0.5 / 2**0.5, rel=0.1)  # this aggregator's part: variance 1/K
    agg._state(planned)  # dropped unrevealed, an aggregation may run again (fresh noise, fresh masks)
    agg.released.add("round1")  # as after its share was handed over
    with pytest.raises(PeerError, match="coordinator: .*round1.*twice"):
        agg._state(planned)
    # only the plan's hospitals, each once, and at least its quorum
    for hospitals, why in [(["hospital0", "hospital9", "hospital1"], "not the plan's"),
                           (["hospital0", "hospital0", "hospital1"], "not the plan's"),
                           (["hospital0", "hospital1"], "the plan needs 3")]:  # fmt: skip
        with pytest.raises(PeerError, match=f"coordinator: .*{why}"):
            agg._state(
                Collect("round2", numel=n, round=2, divisor=3, noise_std=1.0, hospitals=hospitals, deferred=False)
            )
    # sample-weighted rounds: the divisor is the coordinator's (it only scales the average; no noise to lose)
    weighted = Aggregator(Plan(hospitals=3, aggregators=2), 1)
    assert (
        weighted._state(
            Collect("round1", numel=8, round=1, divisor=123, noise_std=0.0, hospitals=H, deferred=False)
        ).divisor
        == 123
    )
    # nor can a training update be sent under the statistics' tag (and noise): hospitals refuse it
    from medmpc.protocols.hospital import check_tag

    def train(tag: str, round_: int) -> Train:
        return Train(tag, round=round_, mean=0.5, std=0.25, class_weight=[1.0, 1.0, 1.0])

    assert check_tag(train("round2", 2)) == "round2" and check_tag(Stats("stats")) == "stats"
    with pytest.raises(PeerError, match="coordinator: .*'stats'.*'round1'"):
        check_tag(train("stats", 1))


def test_dp_sgd_noise_is_drawn_in_float64_so_its_tails_are_not_cut(monkeypatch):
    """Box-Muller's largest output is sqrt(-2 ln u) at the smallest uniform u: 5.77 sigma for 24-bit
    uniforms (float32), a cut that adds to delta, and 8.57 sigma for 53-bit ones."""
    from medmpc.mpc import prg
    from medmpc.training.dp_noise import CSPRNGNoiseOptimizer

    param = torch.nn.Parameter(torch.zeros(8))
    opt = CSPRNGNoiseOptimizer(
        torch.optim.SGD([param], lr=1.0), noise_multiplier=1.5, max_grad_norm=2.0, expected_batch_size=1
    )
    param.summed_grad = torch.zeros(8)
    # every stream word the smallest int64: every uniform is then the smallest one reachable
    monkeypatch.setattr(prg, "random_ring", lambda n: torch.full((n,), -(2**63), dtype=torch.int64))
    opt.add_noise()
    assert param.grad.dtype == torch.float32
    peak = float(param.grad.abs().max()) / (1.5 * 2.0)
    assert peak == pytest.approx(math.sqrt(-2 * math.log(2.0**-53)), rel=1e-5)


def test_a_fixed_noise_multiplier_may_not_exceed_the_budget_at_all():
    def dp_sgd(cfg: DPConfig) -> DPSGD:
        return DPSGD(cfg, n_samples=100, batch_size=10, planned_epochs=1, who="h0")

    probe = dp_sgd(DPConfig(epsilon=100, noise_multiplier=1.0))
    one_epoch = probe.accountant.epsilon_after(1.0, probe.sample_rate, probe.steps_per_epoch, 1e-5)
    capped = dp_sgd(DPConfig(epsilon=one_epoch / 1.005, noise_multiplier=1.0))  # 0.5 % short
    with pytest.raises(BudgetError, match="h0: privacy budget exhausted"):
        capped.reserve(1)
    assert capped.epsilon == 0.0
    planned = dp_sgd(DPConfig(epsilon=one_epoch))  # the planner lands at or below the target, never above
    planned.reserve(1)
    assert 0.99 * one_epoch < planned.epsilon <= one_epoch


def test_centralised_dp_releases_noisy_statistics_inside_its_epsilon(tmp_path):
    """The pixel mean/std and class counts of the training data: without --stats-noise the report says
    no epsilon covers them; with it they are released with noise, in the same budget."""
    from medmpc.imaging.dataset import load_dataset
    from medmpc.imaging.splits import stratified_split
    from medmpc.training.centralised import train_centralised
    from medmpc.training.local import TrainConfig

    data = load_dataset("synthetic:120", image_size=32, seed=0)
    cfg = TrainConfig(epochs=1, batch_size=32)
    run = dict(model_name="cnn_gn", cfg=cfg, dp=DPConfig(epsilon=8.0), log=lambda _: None)
    exact = train_centralised(data, out=tmp_path / "exact", **run)["privacy"]
    assert any("class counts" in s and "exact" in s for s in exact["not_covered"])
    assert not any("statistics" in s for s in exact["covers"])

    report = train_centralised(data, out=tmp_path / "noisy", stats_noise=4.0, **run)
    ckpt = Checkpoint.load(tmp_path / "noisy" / "model.pt")
    train_idx, _ = stratified_split(data.labels, 0.15, seed=0)
    sums = local_statistics(data.subset(train_idx))
    assert ckpt.preprocessing.mean != pytest.approx(float(sums[1] / sums[0]), abs=1e-6)  # noise was added
    assert ckpt.preprocessing.mean == pytest.approx(float(sums[1] / sums[0]), abs=0.3)  # but only noise
    privacy = ckpt.info["privacy"]
    assert privacy["statistics"]["noise_multiplier"] == 4.0 / 2  # sensitivity 2, all the noise counts
    assert any("statistics" in s for s in privacy["covers"])
    assert not any("class counts" in s for s in privacy["not_covered"])
    ref = PrivacyAccountant([(2.0, 1.0, 1)])
    ref.step(privacy["noise_multiplier"], privacy["sample_rate"], privacy["steps"] - 1)
    assert privacy["epsilon"] == pytest.approx(ref.epsilon(1e-5)) and privacy["epsilon"] <= 8.0
    assert privacy["epsilon"] > privacy["statistics"]["epsilon"] > 0
    # the exact counts stay out of what is written
    assert "class_counts" not in ckpt.info["dataset"] and "train" not in report["split"]
