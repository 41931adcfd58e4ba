"""Labelled image sets from the Kaggle chest X-ray layout or the synthetic generator.

Layout: ``ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*.{jpeg,png,dcm}``. Three classes by
default: normal, bacterial and viral, the last two read from the file name
(``personN_bacteria_K.jpeg``, ``personN_virus_K.jpeg``); two classes (normal,
pneumonia) as an option.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from medmpc.imaging.images import DataError, read_images
from medmpc.imaging.splits import stratified_split

CLASSES = {
    3: ("normal", "bacterial", "viral"),
    2: ("normal", "pneumonia"),
}
CLASS_FOLDERS = ("NORMAL", "PNEUMONIA")
SYNTHETIC = "synthetic"


@dataclass
class ImageSet:
    """Images as ``(N, 1, S, S)`` uint8 with integer labels indexing ``classes``."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    source: str
    paths: list[Path] | None = None
    skipped: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def is_synthetic(self) -> bool:
        return self.source == SYNTHETIC

    def subset(self, index: torch.Tensor | list[int]) -> ImageSet:
        index = torch.as_tensor(index, dtype=torch.long)
        paths = [self.paths[i] for i in index.tolist()] if self.paths is not None else None
        return ImageSet(self.images[index], self.labels[index], self.classes, self.source, paths)

    def held_out(self, fraction: float, *, seed: int) -> tuple[ImageSet, ImageSet]:
        """This set split into (training part, validation part), stratified by class: the
        validation part is ``fraction`` of every class, the same for the same ``seed``."""
        train_idx, val_idx = stratified_split(self.labels, fraction, seed=seed)
        return self.subset(train_idx), self.subset(val_idx)

    def class_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.labels, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, counts))


def label_of(path: Path, folder: str, num_classes: int) -> int:
    """Class index of one file, from its class folder and (for 3 classes) its name."""
    if folder == "NORMAL":
        return 0
    if num_classes == 2:
        return 1
    name = path.name.lower()
    bacterial, viral = "bacteria" in name, "virus" in name
    if bacterial == viral:
        raise DataError(
            f"cannot tell bacterial from viral pneumonia for {path}: the file name must contain "
            "exactly one of 'bacteria' or 'virus' (or use 2 classes)"
        )
    return 1 if bacterial else 2


def resolve_split_dir(root: Path, prefer: str = "train") -> Path:
    """Accept either a split folder (holding NORMAL/, PNEUMONIA/) or a dataset root."""
    if not root.is_dir():
        raise DataError(f"data folder does not exist: {root}")
    if any((root / c).is_dir() for c in CLASS_FOLDERS):
        return root
    if (root / prefer).is_dir():
        return root / prefer
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    raise DataError(
        f"{root} is not in the chest X-ray layout: expected class folders "
        f"{'/'.join(CLASS_FOLDERS)} or a '{prefer}/' split folder, found {found or 'no folders'}"
    )


def scan_folder(split_dir: Path, num_classes: int) -> tuple[list[Path], list[int]]:
    """List every file under the class folders with its label; unknown folders are errors."""
    unknown = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name not in CLASS_FOLDERS)
    if unknown:
        raise DataError(f"unexpected class folder(s) {unknown} in {split_dir}; expected only {list(CLASS_FOLDERS)}")
    paths: list[Path] = []
    labels: list[int] = []
    for folder in CLASS_FOLDERS:
        class_dir = split_dir / folder
        if not class_dir.is_dir():
            continue
        files = sorted(p for p in class_dir.iterdir() if p.is_file())
        if not files:
            raise DataError(f"class folder is empty: {class_dir}")
        for path in files:
            paths.append(path)
            labels.append(label_of(path, folder, num_classes))
    if not paths:
        raise DataError(f"no class folders ({'/'.join(CLASS_FOLDERS)}) in {split_dir}")
    return paths, labels


def load_folder(
    root: str | Path,
    *,
    image_size: int,
    num_classes: int = 3,
    split: str = "train",
    skip_unreadable: bool = False,
) -> ImageSet:
    if num_classes not in CLASSES:
        raise ValueError(f"num_classes must be 2 or 3, got {num_classes}")
    split_dir = resolve_split_dir(Path(root), split)
    paths, labels = scan_folder(split_dir, num_classes)
    images, kept, skipped = read_images(
        paths, image_size, skip_unreadable=skip_unreadable, desc=f"reading {split_dir.name}"
    )
    if not kept:
        raise DataError(f"no readable images in {split_dir} ({len(skipped)} skipped)")
    return ImageSet(
        images=images,
        labels=torch.tensor([labels[i] for i in kept], dtype=torch.long),
        classes=CLASSES[num_classes],
        source=str(split_dir),
        paths=[paths[i] for i in kept],
        skipped=skipped,
    )


def load_dataset(
    spec: str,
    *,
    image_size: int,
    num_classes: int = 3,
    split: str = "train",
    skip_unreadable: bool = False,
    synthetic_count: int = 1200,
    seed: int = 0,
) -> ImageSet:
    """``spec`` is a folder or ``synthetic`` (optionally ``synthetic:N`` images).

    Synthetic ``train`` and held-out (any other split) sets use disjoint seeds.
    """
    name, _, count = spec.partition(":")
    if name == SYNTHETIC:
        from medmpc.imaging.synthetic import generate

        n = int(count) if count else synthetic_count
        split_seed = seed if split == "train" else seed + 7_919
        images, labels = generate(n, image_size, seed=split_seed, num_classes=num_classes)
        return ImageSet(images, labels, CLASSES[num_classes], SYNTHETIC)
    return load_folder(
        spec,
        image_size=image_size,
        num_classes=num_classes,
        split=split,
        skip_unreadable=skip_unreadable,
    )
