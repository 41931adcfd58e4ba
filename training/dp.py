"""Differentially private local training (DP-SGD with Opacus), with its budget and accounting.

Per-sample gradients are clipped to norm C, Gaussian noise of standard deviation
sigma*C is added to their sum, and batches are Poisson-sampled (each sample
joins each step independently with probability at most q = batch_size / n). The noise
multiplier sigma is planned so that every step of every planned round together
ends at the target epsilon (RDP accounting, training.accountant).

Clipping is "book-keeping" (training.bookkeeping): one backward pass, per-sample
gradient norms without per-sample gradients, then the clipped sum; Opacus adds the
noise (training.dp_noise) and does the accounting analysis. Same update
as Opacus's per-sample-gradient clipping, several times cheaper on ResNet-18
(benchmarks/test_dp_step.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from medmpc.mpc import prg
from medmpc.training.accountant import BudgetError, PrivacyAccountant, plan_noise_multiplier

if TYPE_CHECKING:
    from medmpc.training.bookkeeping import BookKeepingModule
    from medmpc.training.dp_noise import CSPRNGNoiseOptimizer


class DPIncompatibleModel(ValueError):
    """The model has a layer DP-SGD cannot train; the message names it and the fix."""


@dataclass(frozen=True)
class DPConfig:
    epsilon: float
    delta: float = 1e-5
    clip: float = 1.0
    # fixed noise multiplier instead of a planned one; epsilon is then only the cap
    noise_multiplier: float | None = None
    # images per forward and backward pass: a larger Poisson batch runs in pieces of this size
    # and takes one noisy step, so memory stays bounded whatever the batch (the update is the same)
    physical_batch: int = 64

    def __post_init__(self) -> None:
        if not self.clip > 0:
            raise ValueError(f"clipping norm must be positive, got {self.clip}")
        if self.physical_batch < 1:
            raise ValueError(f"physical batch must be at least 1 image, got {self.physical_batch}")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError(f"noise multiplier must be >= 0, got {self.noise_multiplier}")


def check_compatible(model: nn.Module, model_name: str) -> None:
    from opacus.validators import ModuleValidator  # see wrap()

    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            fix = f"'{model_name}_gn'" if not model_name.endswith("_gn") else "a GroupNorm variant"
            raise DPIncompatibleModel(
                f"model {model_name!r}: layer {name!r} is {type(module).__name__}, which mixes samples "
                f"within a batch, so per-sample gradients (and DP) do not exist for it; use {fix} "
                "(GroupNorm instead of BatchNorm)"
            )
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise DPIncompatibleModel(f"model {model_name!r} cannot be trained with DP-SGD: {errors[0]}")


class DPSGD:
    """One data holder's private training across rounds (implements training.local.PrivateTraining)."""

    def __init__(
        self,
        cfg: DPConfig,
        *,
        n_samples: int,
        batch_size: int,
        planned_epochs: int,
        who: str,
        prior: PrivacyAccountant | None = None,
    ) -> None:
        """``prior``: what this data holder's data already spent before training (the noisy
        statistics release); the noise is planned so that both together end at the budget."""
        if n_samples < 1:
            raise ValueError(f"{who}: no training samples")
        self.cfg, self.who = cfg, who
        self.sample_rate = min(1.0, batch_size / n_samples)
        self.steps_per_epoch = math.ceil(n_samples / batch_size)
        self.expected_batch_size = self.sample_rate * n_samples
        self.accountant = PrivacyAccountant(list(prior.history)) if prior else PrivacyAccountant()
        if cfg.noise_multiplier is not None:
            self.noise_multiplier = cfg.noise_multiplier
        else:
            self.noise_multiplier = plan_noise_multiplier(
                epsilon=cfg.epsilon,
                delta=cfg.delta,
                sample_rate=self.sample_rate,
                steps=planned_epochs * self.steps_per_epoch,
                who=who,
                prior=self.accountant,
            )
        self._reserved_epochs = 0
        self._optimizer: CSPRNGNoiseOptimizer | None = None
        self._module: BookKeepingModule | None = None

    @property
    def epsilon(self) -> float:
        return self.accountant.epsilon(self.cfg.delta)

    def reserve(self, epochs: int) -> None:
        """Account for ``epochs`` epochs about to run; refuse (BudgetError) if they would exceed the budget.

        No slack, for fixed noise as for planned: the planner's noise multiplier ends at or below
        the budget after all planned epochs (training.accountant.plan_noise_multiplier)."""
        steps = epochs * self.steps_per_epoch
        after = self.accountant.epsilon_after(self.noise_multiplier, self.sample_rate, steps, self.cfg.delta)
        if after > self.cfg.epsilon:
            raise BudgetError(
                f"{self.who}: privacy budget exhausted: {steps} more steps would reach epsilon={after:.2f} "
                f"> {self.cfg.epsilon} (delta={self.cfg.delta}; spent so far {self.epsilon:.2f})"
            )
        self.accountant.step(self.noise_multiplier, self.sample_rate, steps)
        self._reserved_epochs += epochs

    # -- training.local.PrivateTraining --------------------------------------
    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        # Opacus is imported where DP-SGD starts: the package costs every process that imports
        # it over a second (torch.distributed, scipy.stats), and most parties never train privately
        from medmpc.training.bookkeeping import BookKeepingModule
        from medmpc.training.dp_noise import CSPRNGNoiseOptimizer

        for module in model.modules():
            if isinstance(module, nn.ReLU):  # an in-place ReLU would overwrite a conv output whose gradient is recorded
                module.inplace = False
        private_model = BookKeepingModule(model, max_grad_norm=self.cfg.clip)
        private_opt = CSPRNGNoiseOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.cfg.clip,
            expected_batch_size=round(self.expected_batch_size),
            loss_reduction="mean",
        )
        self._optimizer, self._module = private_opt, private_model
        return private_model, private_opt

    def backward(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> float:
        """Forward and backward passes over one Poisson batch, ``physical_batch`` images at a time;
        returns its mean loss. The optimizer's next ``step()`` noises the sum of every piece's
        clipped per-sample gradients once: per-sample clipping makes the pieces independent, so
        the step is the one a single pass would take."""
        if self._module is None or self._optimizer is None or model is not self._module:
            raise RuntimeError(f"{self.who}: backward() on a model wrap() did not return")
        from medmpc.training.bookkeeping import clipped_cross_entropy

        total = 0.0
        pieces = zip(x.split(self.cfg.physical_batch), targets.split(self.cfg.physical_batch))
        for k, (xs, ts) in enumerate(pieces):
            if k:  # Opacus's skipped step: keeps the previous piece's clipped sum, no noise, no update
                self._optimizer.signal_skip_step(do_skip=True)
                self._optimizer.step()
                self._optimizer.zero_grad(set_to_none=True)
            loss = clipped_cross_entropy(self._module, model(xs), ts)
            loss.backward()
            total += loss.item() * len(ts)
        return total / len(targets)

    def batches(self, labels: torch.Tensor, weight: torch.Tensor | None) -> Iterator[torch.Tensor]:
        """Poisson sampling; with class weights, sample i joins with rate q * w_i / max(w) <= q.

        Weighting the loss instead would not survive clipping (every per-sample
        gradient is cut to norm C whatever its weight); weighting the sampling
        rates does, and no sample's rate exceeds the accounted q. The draws come from
        the CSPRNG: the accounting's amplification by subsampling assumes nobody knows
        which samples a step used, and the run's seed is public.
        """
        # no private step runs without having been accounted for first
        if self._reserved_epochs <= 0:
            raise BudgetError(f"{self.who}: training epoch not reserved with the accountant")
        self._reserved_epochs -= 1
        rates = torch.full(labels.shape, self.sample_rate)
        if weight is not None:
            rates = rates * weight[labels] / weight.max()
        if self._optimizer is not None:
            self._optimizer.expected_batch_size = max(1, round(float(rates.sum())))
        return self._poisson(rates)

    def _poisson(self, rates: torch.Tensor) -> Iterator[torch.Tensor]:
        for _ in range(self.steps_per_epoch):
            yield torch.nonzero(prg.uniform(len(rates)) <= rates).reshape(-1)

    def unwrap(self, model: nn.Module) -> None:
        if self._module is not model:
            raise RuntimeError(f"{self.who}: unwrap() of a model wrap() did not return")
        self._module.remove_hooks()
        self._optimizer = self._module = None


def privacy_summary(dp: DPSGD) -> dict[str, float | int | str | None]:
    """What a report or checkpoint states about one data holder's privacy."""
    return {
        "epsilon": dp.epsilon,
        "delta": dp.cfg.delta,
        "clip": dp.cfg.clip,
        "target_epsilon": dp.cfg.epsilon,
        "noise_multiplier": dp.noise_multiplier,
        "sample_rate": dp.sample_rate,
        "steps": dp.accountant.steps,
        "accountant": "RDP (subsampled Gaussian, Poisson sampling)",
    }
