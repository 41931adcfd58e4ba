from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from checkpoints import trained_cnn

from medmpc.imaging.dataset import load_dataset
from medmpc.mpc import crypten_compat

crypten_compat.install()  # this process is a party too where a test shares or sums in-process

REPO = Path(__file__).resolve().parents[1]
CHEST_XRAY = REPO.parent / "shared" / "data" / "chest_xray"


@pytest.fixture(scope="session")
def chest_xray() -> Path:
    if not (CHEST_XRAY / "train").is_dir():
        pytest.skip(f"real data not found at {CHEST_XRAY}")
    return CHEST_XRAY


def _pick(folder: Path, contains: str, n: int) -> list[Path]:
    return sorted(p for p in folder.iterdir() if contains in p.name)[:n]


@pytest.fixture
def small_xray_folder(chest_xray: Path, tmp_path: Path) -> Path:
    """A Kaggle-layout split folder with 4 real images of each class."""
    root = tmp_path / "mini"
    for folder, contains in (("NORMAL", ""), ("PNEUMONIA", "bacteria"), ("PNEUMONIA", "virus")):
        dst = root / folder
        dst.mkdir(parents=True, exist_ok=True)
        for p in _pick(chest_xray / "train" / folder, contains, 4):
            shutil.copy(p, dst / p.name)
    return root


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CNN (32 px) trained for two epochs on synthetic images."""
    data = load_dataset("synthetic:300", image_size=32, seed=0)
    return trained_cnn(data, epochs=2, path=tmp_path_factory.mktemp("ckpt") / "model.pt")
