"""Reading image files into fixed-size greyscale tensors, with errors that name the file.

Every format is first decoded to the 8-bit greyscale picture a viewer would show, whatever
its bit depth: a 16-bit PNG spans 0..65535 and is scaled onto 0..255, never clipped; a DICOM
goes through its own display pipeline (``medmpc.imaging.dicom``). Only then is the picture
resized, the same way for every format, so copies of one image in different formats give the
same model input within rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from medmpc.imaging.dicom import read_dicom

# twice the largest flat-panel X-ray detectors' (about 43 x 43 cm at 0.1 mm: 18.5 million pixels);
# decoding one costs about 25 bytes a pixel, so a small crafted file cannot take gigabytes
MAX_PIXELS = 40_000_000
# PIL's modes for greyscale of more than 8 bits, and the largest value each holds in a PNG
_DEEP_GREY = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I": 65535}


class DataError(ValueError):
    """Input data is missing, unreadable or mislabelled; the message says which and where."""


def _read_pil(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:  # before decoding: open reads only the header
                raise ValueError(f"image too large: {img.width}x{img.height} pixels, more than {MAX_PIXELS:,}")
            if img.mode in _DEEP_GREY:
                deep = np.asarray(img, dtype=np.float64)
                return np.rint(np.clip(deep / _DEEP_GREY[img.mode], 0.0, 1.0) * 255).astype(np.uint8)
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except Image.DecompressionBombError as err:
        raise ValueError(f"image too large ({err})") from err


def _read_dicom(path: Path) -> np.ndarray:
    return read_dicom(path, max_pixels=MAX_PIXELS)


_READERS: dict[str, Callable[[Path], np.ndarray]] = {
    ".png": _read_pil,
    ".jpg": _read_pil,
    ".jpeg": _read_pil,
    ".dcm": _read_dicom,
    ".dicom": _read_dicom,
}
IMAGE_SUFFIXES = tuple(_READERS)


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in _READERS


def read_image(path: str | Path, image_size: int) -> torch.Tensor:
    """Decode ``path`` to a ``(1, S, S)`` uint8 greyscale tensor (aspect ratio not kept).

    Training images were stored resized to a square without keeping the aspect
    ratio, so full-resolution originals are squashed the same way here.
    """
    path = Path(path)
    if not is_image_name(path):
        raise DataError(f"not an image file (expected {', '.join(IMAGE_SUFFIXES)}): {path}")
    try:
        picture = _READERS[path.suffix.lower()](path)
        if picture.size and picture.min() == picture.max():
            raise ValueError(f"the picture is blank: every pixel is {picture.flat[0]} (a wrong window or rescale?)")
        grey = Image.fromarray(picture).resize((image_size, image_size), Image.Resampling.BILINEAR)
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
