"""Normalisation statistics and class counts: what a training run learns from its data before
training, and how they are released privately.

A data set's statistics are the sums s = [n, sum_i mean(x_i), sum_i mean(x_i^2), count of each
class] over its images x_i (pixels in [0, 1]). Sums add up over hospitals, and every image has
the same size, so mean = s_1 / n and std = sqrt(s_2 / n - mean^2) are the exact pixel mean and
std over every pixel. One image moves n, s_1, s_2 and one class count by at most 1 each: L2
sensitivity 2. With Gaussian noise of standard deviation S on each sum, of which a fraction c of
the variance is unknown to any observer, the release is one Gaussian mechanism of noise
multiplier S sqrt(c) / 2, accounted like one DP-SGD step of sample rate 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from medmpc.imaging.dataset import ImageSet

STATS_SENSITIVITY = 2.0


def local_statistics(data: ImageSet) -> torch.Tensor:
    """[n, sum of per-image pixel means, sum of per-image mean squares, count per class] (float64)."""
    x = data.images.double() / 255
    counts = torch.bincount(data.labels, minlength=len(data.classes)).double()
    return torch.cat([torch.tensor([len(data), x.mean((1, 2, 3)).sum(), (x**2).mean((1, 2, 3)).sum()]), counts])


@dataclass(frozen=True)
class Statistics:
    """The estimates a run uses, from (possibly noisy) sums."""

    n_images: int
    pixel_mean: float
    pixel_std: float
    class_counts: torch.Tensor

    @classmethod
    def from_sums(cls, sums: torch.Tensor) -> Statistics:
        """Noise can push the estimates outside their ranges: they are clamped back (post-processing)."""
        sums = sums.double()
        n = max(1, int(round(float(sums[0]))))
        mean = float((sums[1] / n).clamp(0.0, 1.0))
        std = float((sums[2] / n - mean**2).clamp(min=1e-12).sqrt())
        return cls(n, mean, std, sums[3:].round().clamp(min=0))

    def to_dict(self, classes: tuple[str, ...]) -> dict[str, Any]:
        return {
            "n_images": self.n_images,
            "pixel_mean": self.pixel_mean,
            "pixel_std": self.pixel_std,
            "class_counts": dict(zip(classes, self.class_counts.long().tolist())),
        }


def release_history(noise_std: float | None, *, counted: float = 1.0) -> list[tuple[float, float, int]]:
    """The release as accountant history: one Gaussian mechanism (noise multiplier, sample rate 1,
    one step), or nothing without noise. ``counted``: the fraction of the noise variance that no
    single observer knows (in a secure run each of K aggregators knows its own part: (K-1)/K)."""
    if noise_std is None:
        return []
    return [(noise_std * counted**0.5 / STATS_SENSITIVITY, 1.0, 1)]


def release_privacy(
    history: list[tuple[float, float, int]], *, noise_std: float | None, delta: float
) -> dict[str, Any] | None:
    """The release on its own, for a report: its noise, noise multiplier and epsilon."""
    if not history:
        return None
    from medmpc.training.accountant import PrivacyAccountant  # Opacus: not for every reader of a plan

    return {
        "noise_std": noise_std,
        "noise_multiplier": history[0][0],
        "delta": delta,
        "epsilon": PrivacyAccountant(history).epsilon(delta),
    }
