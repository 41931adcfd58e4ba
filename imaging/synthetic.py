"""Chest-X-ray-like synthetic images, so every job runs on a machine without data.

Each image has a body silhouette, two dark lung fields with rib shadows, a
spine and a heart. Bacterial pneumonia adds one dense focal consolidation
(sometimes faint); viral pneumonia adds a diffuse, bilateral, patchy haze
(sometimes weak). Anatomy, contrast and noise vary, so the classes are
learnable but overlap. Class frequencies follow the real training data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Coordinate = float | torch.Tensor  # one value, or one per image (broadcast)

# normal, bacterial, viral frequencies of the real train/ folder
CLASS_FREQUENCIES = (1341, 2530, 1345)


def _u(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, 1, 1, generator=g)


def _ellipse(
    x: torch.Tensor,
    y: torch.Tensor,
    cx: Coordinate,
    cy: Coordinate,
    rx: Coordinate,
    ry: Coordinate,
    softness: float = 0.08,
) -> torch.Tensor:
    d = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
    return torch.sigmoid((1 - d) / softness)


def _smooth_noise(g: torch.Generator, n: int, size: int, cells: int) -> torch.Tensor:
    coarse = torch.rand(n, 1, cells, cells, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[:, 0]


def generate(n: int, image_size: int, *, seed: int = 0, num_classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(n, 1, S, S)`` uint8 images and labels (0 normal, 1 bacterial, 2 viral).

    With ``num_classes=2`` both pneumonia kinds are labelled 1.
    """
    if n < 1 or image_size < 16:
        raise ValueError(f"need n >= 1 and image_size >= 16, got n={n}, image_size={image_size}")
    g = torch.Generator().manual_seed(seed)
    freq = torch.tensor(CLASS_FREQUENCIES, dtype=torch.float)
    kind = torch.multinomial(freq / freq.sum(), n, replacement=True, generator=g)

    lin = torch.linspace(-1, 1, image_size)
    y, x = torch.meshgrid(lin, lin, indexing="ij")
    x, y = x.expand(n, -1, -1), y.expand(n, -1, -1)
    x = x + _u(g, n, -0.06, 0.06)
    y = y + _u(g, n, -0.06, 0.06)

    body = _ellipse(x, y, 0, 0.1, _u(g, n, 0.78, 0.92), _u(g, n, 0.95, 1.1))
    lung_rx, lung_ry = _u(g, n, 0.24, 0.3), _u(g, n, 0.4, 0.5)
    lung_cx, lung_cy = _u(g, n, 0.3, 0.38), _u(g, n, -0.12, 0.0)
    left = _ellipse(x, y, -lung_cx, lung_cy, lung_rx, lung_ry)
    right = _ellipse(x, y, lung_cx, lung_cy, lung_rx, lung_ry)
    lungs = torch.maximum(left, right)
    ribs = 0.5 + 0.5 * torch.sin(y * _u(g, n, 16, 22) + x.abs() * 4 + _u(g, n, 0, 6.3))
    spine = torch.exp(-((x / 0.06) ** 2)) * body
    heart = _ellipse(x, y, -0.1, 0.3, _u(g, n, 0.18, 0.26), _u(g, n, 0.16, 0.22), 0.15)

    img = 0.08 + 0.5 * body - 0.32 * lungs + 0.06 * ribs * lungs + 0.25 * spine + 0.15 * heart
    img = img + 0.06 * (_smooth_noise(g, n, image_size, 6) - 0.5) * lungs  # benign texture

    # Bacterial: one lobar consolidation in a random lung, sometimes faint.
    side = torch.where(torch.rand(n, 1, 1, generator=g) < 0.5, -1.0, 1.0)
    bx = side * lung_cx + _u(g, n, -0.1, 0.1)
    by = lung_cy + _u(g, n, -0.25, 0.3)
    sigma = _u(g, n, 0.08, 0.16)
    focal = torch.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * sigma**2)) * lungs
    img = img + (kind == 1).view(n, 1, 1) * _u(g, n, 0.1, 0.35) * focal

    # Viral: patchy haze over both lungs, strongest near the hila, sometimes weak.
    patches = _smooth_noise(g, n, image_size, 10).clamp(0.35, 1) - 0.35
    perihilar = torch.exp(-((x.abs() - 0.15) ** 2) / 0.15)
    haze = patches * perihilar * lungs
    img = img + (kind == 2).view(n, 1, 1) * _u(g, n, 0.15, 0.45) * haze

    img = (img - 0.3) * _u(g, n, 0.8, 1.25) + 0.3 + _u(g, n, -0.06, 0.06)
    img = img + _u(g, n, 0.02, 0.05) * torch.randn(img.shape, generator=g)
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8).unsqueeze(1)
    labels = kind if num_classes == 3 else (kind > 0).long()
    return images, labels
