"""Privacy accounting for DP-SGD: a plain class, Renyi DP of the subsampled Gaussian mechanism.

The RDP analysis itself is Opacus's (``opacus.accountants.analysis.rdp``); this
class keeps one hospital's history of (noise multiplier, sample rate, steps)
across every local step of every round, and can be saved and restored as a
plain dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Opacus's default orders, extended upwards: small sample rates and few steps need large orders.
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 128, 256, 512, 1024]
MAX_NOISE_MULTIPLIER = 50.0


class BudgetError(ValueError):
    """The privacy budget cannot be met by the plan, or it is spent."""


@dataclass
class PrivacyAccountant:
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        if steps <= 0:
            return
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, q, n = self.history[-1]
            self.history[-1] = (sigma, q, n + steps)
        else:
            self.history.append((noise_multiplier, sample_rate, steps))

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float) -> float:
        if not self.history:
            return 0.0
        # imported here: the opacus package costs every process that imports it over a second
        # (torch.distributed, scipy.stats), and most parties never account for anything
        from opacus.accountants.analysis import rdp as rdp_analysis

        rdp = sum(
            rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=n, orders=ORDERS)
            for sigma, q, n in self.history
        )
        eps, _ = rdp_analysis.get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
        return float(eps)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """What epsilon would be after ``steps`` more steps (nothing is recorded)."""
        trial = PrivacyAccountant(list(self.history))
        trial.step(noise_multiplier, sample_rate, steps)
        return trial.epsilon(delta)

    def to_dict(self) -> dict[str, list[list[float]]]:
        return {"history": [list(h) for h in self.history]}

    @classmethod
    def from_dict(cls, d: dict[str, list[list[float]]]) -> PrivacyAccountant:
        return cls([(float(s), float(q), int(n)) for s, q, n in d["history"]])


def plan_noise_multiplier(
    *, epsilon: float, delta: float, sample_rate: float, steps: int, who: str, prior: PrivacyAccountant | None = None
) -> float:
    """The noise multiplier that makes ``steps`` steps at ``sample_rate`` end at ``epsilon`` or just
    below (never above: budgets are enforced without slack), after what ``prior`` already spent
    (e.g. the noisy statistics release).

    Refuses (BudgetError naming ``who``) a plan that cannot meet the budget with a
    noise multiplier below MAX_NOISE_MULTIPLIER (training would be pure noise).
    """
    if not epsilon > 0 or not 0 < delta < 1:
        raise BudgetError(f"{who}: need epsilon > 0 and 0 < delta < 1, got epsilon={epsilon}, delta={delta}")
    if not 0 < sample_rate <= 1:
        raise BudgetError(f"{who}: sample rate must be in (0, 1], got {sample_rate}")
    base = prior or PrivacyAccountant()

    def spent(sigma: float) -> float:
        return base.epsilon_after(sigma, sample_rate, steps, delta)

    if spent(MAX_NOISE_MULTIPLIER) > epsilon:
        already = f" (of which {base.epsilon(delta):.2f} spent before training)" if base.history else ""
        raise BudgetError(
            f"{who}: epsilon={epsilon} at delta={delta} over {steps} steps (sample rate {sample_rate:.3g}) "
            f"needs noise multiplier > {MAX_NOISE_MULTIPLIER}{already}; raise the budget or train fewer steps"
        )
    # epsilon falls as sigma grows: bisect for the smallest that fits; hi always fits
    lo, hi = 0.0, MAX_NOISE_MULTIPLIER
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if spent(mid) <= epsilon else (mid, hi)
    return float(hi)
