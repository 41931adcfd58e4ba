"""Normalisation and training-only augmentation on uint8 image batches."""

from __future__ import annotations

import math
from collections.abc import Sequence
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
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(
                f"images are {tuple(images.shape[-2:])}, the model expects {self.image_size}x{self.image_size}"
            )
        return (images.float() / 255 - self.mean) / self.std

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
    """Random affine jitter; flips are off by default (anatomy is not mirror-symmetric)."""

    degrees: float = 10.0
    translate: float = 0.06
    scale: tuple[float, float] = (0.9, 1.1)
    hflip: bool = False

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
        out = F.grid_sample(x - fill, grid, padding_mode="zeros", align_corners=False)
        return out + fill
