"""Normalisation and training-only augmentation on uint8 image batches.

Augmentation acts on pixel intensities in [0, 1], before normalisation: a small affine jitter
(position and size of the chest), and, against acquisition shift (another X-ray machine,
exposure or post-processing), random contrast, brightness, gamma, blur and noise. Each image
draws its own parameters from the generator, so a seeded run repeats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from medmpc.imaging.images import read_image

MIN_IMAGE_SIZE = 16  # the models' four 2x poolings need at least this


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to turn an image file into model input; stored in checkpoints."""

    image_size: int
    mean: float
    std: float

    def __post_init__(self) -> None:
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {self.image_size}")
        if not self.std > 0:
            raise ValueError(f"normalisation std must be positive, got {self.std}")

    @classmethod
    def fit(cls, images: torch.Tensor) -> Preprocessing:
        """Pixel mean/std of a uint8 batch (compute on training images only)."""
        x = images.double() / 255
        return cls(int(images.shape[-1]), float(x.mean()), float(x.std()))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalise(self.pixels(images))

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """A uint8 batch as intensities in [0, 1], refused unless it has the model's size."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(
                f"images are {tuple(images.shape[-2:])}, the model expects {self.image_size}x{self.image_size}"
            )
        return images.float() / 255

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """Intensities in [0, 1] as model input."""
        return (pixels - self.mean) / self.std

    def valid_range(self) -> tuple[float, float]:
        """The smallest and largest value an input element can take (black and white pixels)."""
        return (0 - self.mean) / self.std, (1 - self.mean) / self.std

    def read(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """Image files as model input: greyscale, resized, normalised (a batch)."""
        return self(torch.stack([read_image(p, self.image_size) for p in paths]))

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class Augmentation:
    """Random affine jitter, then intensity changes; every one is off at zero. Flips are off by
    default (anatomy is not mirror-symmetric).

    ``contrast`` c and ``brightness`` b: ``(x - mean) * U(1-c, 1+c) + mean + U(-b, b)``; ``gamma`` g:
    ``x ** exp(U(-g, g))`` on [0, 1]; ``blur``: a Gaussian of standard deviation ``U(0, blur)``
    pixels; ``noise``: Gaussian noise of standard deviation ``U(0, noise)``."""

    degrees: float = 10.0
    translate: float = 0.06
    scale: tuple[float, float] = (0.9, 1.1)
    hflip: bool = False
    contrast: float = 0.0
    brightness: float = 0.0
    gamma: float = 0.0
    blur: float = 0.0
    noise: float = 0.0

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n = x.shape[0]

        def u(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=generator)

        angle = u(-self.degrees, self.degrees) * math.pi / 180
        s = u(*self.scale)
        sx = s * (torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if self.hflip else 1)
        tx, ty = u(-self.translate, self.translate) * 2, u(-self.translate, self.translate) * 2
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([cos / sx, -sin / s, tx], 1), torch.stack([sin / sx, cos / s, ty], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        # pad with the image's own darkest value so borders look like background
        fill = x.amin(dim=(1, 2, 3), keepdim=True)
        out = F.grid_sample(x - fill, grid, padding_mode="zeros", align_corners=False) + fill
        return self._intensity(out, u, generator)

    def _intensity(
        self, x: torch.Tensor, u: Callable[[float, float], torch.Tensor], generator: torch.Generator | None
    ) -> torch.Tensor:
        if not (self.gamma or self.contrast or self.brightness or self.blur or self.noise):
            return x
        each = (-1, 1, 1, 1)
        if self.gamma:
            x = x.clamp(0, 1) ** torch.exp(u(-self.gamma, self.gamma)).view(each)
        if self.contrast or self.brightness:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            c = u(1 - self.contrast, 1 + self.contrast).view(each)
            x = (x - mean) * c + mean + u(-self.brightness, self.brightness).view(each)
        if self.blur:
            x = _gaussian_blur(x, u(0, self.blur))
        if self.noise:
            x = x + u(0, self.noise).view(each) * torch.randn(x.shape, generator=generator)
        return x.clamp(0, 1)  # what an image can hold


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image of ``x`` (N, 1, H, W) blurred with its own standard deviation (pixels), separably."""
    n = x.shape[0]
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-(offsets**2) / (2 * sigma.clamp(min=1e-3).view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(x.dtype)  # (N, K)
    rows = F.conv2d(
        F.pad(x.transpose(0, 1), (radius, radius, 0, 0), mode="replicate"), kernel.view(n, 1, 1, -1), groups=n
    )
    cols = F.conv2d(F.pad(rows, (0, 0, radius, radius), mode="replicate"), kernel.view(n, 1, -1, 1), groups=n)
    return cols.transpose(0, 1)


# named augmentations: a plan and a checkpoint record the name
AUGMENTATIONS: dict[str, Augmentation | None] = {
    "none": None,
    "affine": Augmentation(),
    "shift": Augmentation(contrast=0.3, brightness=0.1, gamma=0.4, blur=1.0, noise=0.03),
}


def augmentation(name: str) -> Augmentation | None:
    """The augmentation called ``name``; a clear error for any other name."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; choose one of {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[name]
