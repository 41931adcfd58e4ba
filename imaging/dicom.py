"""A single-frame greyscale DICOM image as the 8-bit picture a radiologist's viewer shows.

The stored values go through the modality LUT (rescale slope and intercept) and then the VOI
transform (the VOI LUT, else the window centre and width, else none), exactly as DICOM PS3.3
C.11 orders them; the result is scaled from the range that pipeline can output (not from the
image's own minimum and maximum, which would stretch a dark image) onto 0..255, and
MONOCHROME1 (where 0 is white) is inverted. An 8-bit MONOCHROME2 image with no window is read
unchanged, so a DICOM copy of a PNG gives the PNG's pixels.

Compressed transfer syntaxes are decoded where a decoder is installed (RLE by pydicom itself,
JPEG, JPEG-LS and JPEG 2000 by pylibjpeg's plugins) and refused by name otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

GREYSCALE = ("MONOCHROME1", "MONOCHROME2")


def _output_range(ds: Dataset) -> tuple[float, float]:
    """The smallest and largest value the modality and VOI transforms can give for ``ds``."""
    if ds.get("VOILUTSequence"):
        return 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.BitsStored)
    lo, hi = (0, 2**bits - 1) if int(ds.PixelRepresentation) == 0 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
    ends = sorted((lo * slope + intercept, hi * slope + intercept))
    return ends[0], ends[1]


def _check(ds: Dataset) -> None:
    if "PixelData" not in ds:
        raise ValueError("the DICOM file has no pixel data (not an image)")
    missing = [k for k in ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation") if k not in ds]
    if missing:
        raise ValueError(f"the DICOM image lacks {', '.join(missing)}")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ValueError(f"a DICOM image must have one frame, this one has {frames}")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if int(ds.get("SamplesPerPixel", 1)) != 1 or photometric not in GREYSCALE:
        raise ValueError(f"a DICOM image must be greyscale ({' or '.join(GREYSCALE)}), this one is {photometric!r}")
    if not 1 <= int(ds.BitsStored) <= 16:
        raise ValueError(f"DICOM pixel data of {ds.BitsStored} bits stored is not supported (1 to 16 are)")


def _pixels(ds: Dataset) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array)
    except (NotImplementedError, RuntimeError) as err:
        syntax = ds.file_meta.TransferSyntaxUID
        raise ValueError(f"cannot decode its transfer syntax {syntax.name} ({syntax}): {err}") from err


def read_dicom(path: Path, *, max_pixels: int) -> np.ndarray:
    """The image in ``path`` as 8-bit greyscale (rows x columns); ValueError saying what is wrong."""
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as err:
        raise ValueError(f"not a DICOM file: {err}") from err
    except (AttributeError, KeyError, TypeError, EOFError) as err:  # pydicom on a damaged file
        raise ValueError(f"a damaged DICOM file ({type(err).__name__}: {err})") from err
    _check(ds)
    if int(ds.Rows) * int(ds.Columns) > max_pixels:
        raise ValueError(f"image too large: {ds.Columns}x{ds.Rows} pixels, more than {max_pixels}")
    with np.errstate(all="ignore"):  # a zero slope or a broken LUT shows up as what is checked next
        values = apply_voi_lut(apply_modality_lut(_pixels(ds), ds), ds).astype(np.float64)
    lo, hi = _output_range(ds)
    if not (np.isfinite(values).all() and np.isfinite([lo, hi]).all() and hi > lo):
        raise ValueError(f"its rescale or VOI LUT gives no picture (range {lo:g}..{hi:g}, or values not finite)")
    scaled = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.rint(scaled * 255).astype(np.uint8)
