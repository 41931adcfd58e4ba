"""Reading image files into fixed-size greyscale tensors, with errors that name the file."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


class DataError(ValueError):
    """Input data is missing, unreadable or mislabelled; the message says which and where."""


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def read_image(path: str | Path, image_size: int) -> torch.Tensor:
    """Decode ``path`` to a ``(1, S, S)`` uint8 greyscale tensor (aspect ratio not kept).

    Training images were stored resized to a square without keeping the aspect
    ratio, so full-resolution originals are squashed the same way here.
    """
    path = Path(path)
    if not is_image_name(path):
        raise DataError(f"not an image file (expected {', '.join(IMAGE_SUFFIXES)}): {path}")
    try:
        with Image.open(path) as img:
            grey = img.convert("L").resize((image_size, image_size), Image.Resampling.BILINEAR)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err
    return torch.from_numpy(np.asarray(grey, dtype=np.uint8).copy()).unsqueeze(0)


def read_images(
    paths: list[Path], image_size: int, *, skip_unreadable: bool = False, desc: str = "images"
) -> tuple[torch.Tensor, list[int], list[Path]]:
    """Read many files in parallel.

    Returns the stacked images, the indices (into ``paths``) that were read, and
    the files skipped (only non-empty with ``skip_unreadable``).
    """

    def one(path: Path) -> torch.Tensor | DataError:
        try:
            return read_image(path, image_size)
        except DataError as err:
            return err

    kept: list[torch.Tensor] = []
    index: list[int] = []
    skipped: list[Path] = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = pool.map(one, paths)
        for i, (path, res) in enumerate(
            zip(paths, tqdm(results, total=len(paths), desc=desc, unit="img", leave=False))
        ):
            if isinstance(res, DataError):
                if not skip_unreadable:
                    raise res
                skipped.append(path)
                continue
            kept.append(res)
            index.append(i)
    images = torch.stack(kept) if kept else torch.empty(0, 1, image_size, image_size, dtype=torch.uint8)
    return images, index, skipped
