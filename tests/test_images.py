"""Every image format gives the model the picture a viewer shows: DICOM through its display
pipeline (modality LUT, window, MONOCHROME1 inversion, 8 to 16 bits), PNG at every bit depth.
DICOM copies of real X-rays are made here with pydicom and must match the original within rounding."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from dicoms import write_dicom
from medmpc_cli import medmpc
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML

from medmpc.imaging.dataset import load_folder
from medmpc.imaging.images import DataError, read_image, read_images

SIZE = 64


@pytest.fixture
def xray(chest_xray: Path, tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A real X-ray, made small, saved as an 8-bit PNG: the reference every copy is compared to."""
    source = sorted((chest_xray / "val" / "PNEUMONIA").iterdir())[0]
    with Image.open(source) as img:
        grey = img.convert("L").resize((160, 128))
    grey.save(tmp_path / "xray.png")
    return tmp_path / "xray.png", np.asarray(grey)


def _differ(a: Path, b: Path) -> int:
    return int((read_image(a, SIZE).int() - read_image(b, SIZE).int()).abs().max())


@pytest.mark.parametrize(
    ("name", "copy"),
    [
        ("8-bit", lambda g: dict(stored=g, bits=8)),
        ("8-bit MONOCHROME1", lambda g: dict(stored=255 - g, bits=8, photometric="MONOCHROME1")),
        ("12-bit", lambda g: dict(stored=np.rint(g.astype(np.float64) * 4095 / 255), bits=12)),
        ("16-bit", lambda g: dict(stored=g.astype(np.uint32) * 257, bits=16)),
        (
            "16-bit MONOCHROME1",
            lambda g: dict(stored=65535 - g.astype(np.uint32) * 257, bits=16, photometric="MONOCHROME1"),
        ),
        # stored values 1000..3040 of 4095, a window exactly over them (DICOM's LINEAR: c - 0.5, w - 1)
        ("12-bit windowed", lambda g: dict(stored=1000 + 8 * g.astype(np.uint32), bits=12, window=(2020.5, 2041))),
        ("16-bit rescaled", lambda g: dict(stored=g.astype(np.uint32) * 257, bits=16, rescale=(2.0, -1000.0))),
        ("8-bit RLE compressed", lambda g: dict(stored=g, bits=8, compress=True)),
    ],
)
def test_a_dicom_copy_gives_the_model_the_pngs_input(xray, tmp_path, name, copy):
    png, grey = xray
    dicom = write_dicom(tmp_path / "copy.dcm", **copy(grey))
    assert _differ(dicom, png) <= 1


def test_the_window_is_applied_and_monochrome1_inverted(xray, tmp_path):
    """Controls for the cases above: ignoring either would give a different picture."""
    png, grey = xray
    unwindowed = write_dicom(tmp_path / "plain.dcm", 1000 + 8 * grey.astype(np.uint32), bits=12)
    assert _differ(unwindowed, png) > 30  # the window stretches a dim range onto the full one
    as_monochrome2 = write_dicom(tmp_path / "m2.dcm", 255 - grey, bits=8)
    assert _differ(as_monochrome2, png) > 100


def test_a_16_bit_png_is_scaled_not_clipped(xray, tmp_path):
    png, grey = xray
    deep = tmp_path / "deep.png"
    Image.fromarray(grey.astype(np.uint16) * 257).save(deep)
    with Image.open(deep) as img:
        assert img.mode.startswith("I")  # a 16-bit greyscale PNG indeed
        clipped = np.asarray(img.convert("L"))  # control: how it was read before
    assert (clipped == 255).mean() > 0.5
    assert _differ(deep, png) == 0


def test_dicom_that_is_not_one_greyscale_image_is_refused_naming_the_file(xray, tmp_path):
    _, grey = xray
    cases = {}
    ds_path = write_dicom(tmp_path / "frames.dcm", np.concatenate([grey, grey]), bits=8)
    _edit(ds_path, NumberOfFrames=2, Rows=grey.shape[0])
    cases[ds_path] = "one frame, this one has 2"
    rgb = write_dicom(tmp_path / "rgb.dcm", grey, bits=8)
    _edit(rgb, PhotometricInterpretation="RGB")
    cases[rgb] = "greyscale"
    empty = write_dicom(tmp_path / "empty.dcm", grey, bits=8)
    _edit(empty, PixelData=None)
    cases[empty] = "no pixel data"
    video = write_dicom(tmp_path / "video.dcm", grey, bits=8)
    _edit(video, TransferSyntaxUID=MPEG2MPML)
    cases[video] = "MPEG2"
    junk = tmp_path / "junk.dcm"
    junk.write_text("not a scan")
    cases[junk] = "not a DICOM file"
    for path, reason in cases.items():
        with pytest.raises(DataError, match=reason) as err:
            read_image(path, SIZE)
        assert path.name in str(err.value)


def _edit(path: Path, **changes: object) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        if key == "TransferSyntaxUID":  # a compressed syntax: its (here meaningless) frame, encapsulated
            ds.file_meta.TransferSyntaxUID = value
            ds.PixelData = encapsulate([bytes(64)])
            ds["PixelData"].VR = "OB"
        elif value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path)


def test_a_decompression_bomb_is_a_clear_error_and_can_be_skipped(xray, tmp_path):
    png, _ = xray
    data = bytearray(png.read_bytes())
    # IHDR is the first chunk: claim 14000 x 14000 pixels (and fix its checksum)
    data[16:24] = struct.pack(">II", 14000, 14000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bytes(data))
    with pytest.raises(DataError, match="bomb.png.*too large"):
        read_image(bomb, SIZE)
    images, kept, skipped = read_images([png, bomb], SIZE, skip_unreadable=True)
    assert kept == [0] and skipped == [bomb] and images.shape == (1, 1, SIZE, SIZE)


def test_evaluate_gives_the_same_metrics_on_dicom_and_16_bit_png_copies(chest_xray, tmp_path, trained_checkpoint):
    """The official validation images at full resolution, as DICOM (both photometric interpretations,
    8 and 16 bits) and as 16-bit PNG."""
    val = chest_xray / "val"
    copies = {"dicom": tmp_path / "dicom", "png16": tmp_path / "png16"}
    originals = sorted(val.rglob("*.jpeg"))
    assert len(originals) == 16
    for i, original in enumerate(originals):
        with Image.open(original) as img:
            grey = np.asarray(img.convert("L"))
        relative = original.relative_to(val)
        for root in copies.values():
            (root / relative.parent).mkdir(parents=True, exist_ok=True)
        if i % 2:
            write_dicom(copies["dicom"] / relative.with_suffix(".dcm"), 255 - grey, bits=8, photometric="MONOCHROME1")
        else:
            write_dicom(copies["dicom"] / relative.with_suffix(".dcm"), grey.astype(np.uint32) * 257, bits=16)
        Image.fromarray(grey.astype(np.uint16) * 257).save(copies["png16"] / relative.with_suffix(".png"))
    reference = load_folder(val, image_size=32)
    for root in copies.values():
        assert torch.equal(load_folder(root, image_size=32).images, reference.images)

    def metrics(folder: Path) -> dict[str, object]:
        proc = medmpc("evaluate", "--model", trained_checkpoint, "--data", folder, "--json")
        return {k: v for k, v in json.loads(proc.stdout).items() if k not in ("data", "dataset")}

    on_jpeg = metrics(val)
    assert on_jpeg["n_images"] == 16 and metrics(copies["dicom"]) == on_jpeg == metrics(copies["png16"])
