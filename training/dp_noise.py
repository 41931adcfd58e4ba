"""The noise step of DP-SGD: Opacus's optimizer, its Gaussian noise drawn from the CSPRNG."""

from __future__ import annotations

from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from medmpc.mpc import prg


class CSPRNGNoiseOptimizer(DPOptimizerFastGradientClipping):
    """Opacus's optimizer with its Gaussian noise drawn from the OS-seeded ChaCha20 stream,
    in float64 (tails to 8.57 sigma).

    Opacus draws from torch's default generator, which starts from a fixed seed and which
    our runs seed from the plan (published in report.json): anyone could regenerate the
    noise and subtract it from the released model.
    """

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            # drawn in float64 whatever the gradient's dtype: float32 Box-Muller cuts the tails (mpc.prg.gaussian)
            noise = prg.gaussian(p.summed_grad.numel(), std).to(p.summed_grad.dtype).view_as(p.summed_grad)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)
