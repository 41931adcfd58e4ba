import shutil

import pytest
import torch

from medmpc.imaging.dataset import CLASSES, load_dataset, load_folder, resolve_split_dir
from medmpc.imaging.images import DataError, read_image


def test_three_class_labels_come_from_folder_and_file_name(small_xray_folder):
    data = load_folder(small_xray_folder, image_size=64)
    assert data.classes == CLASSES[3]
    assert data.images.shape == (12, 1, 64, 64) and data.images.dtype == torch.uint8
    assert data.class_counts() == {"normal": 4, "bacterial": 4, "viral": 4}
    for path, label in zip(data.paths, data.labels.tolist()):
        expected = 0 if path.parent.name == "NORMAL" else (1 if "bacteria" in path.name else 2)
        assert label == expected, path


def test_two_class_option_merges_pneumonia(small_xray_folder):
    data = load_folder(small_xray_folder, image_size=32, num_classes=2)
    assert data.classes == ("normal", "pneumonia")
    assert data.class_counts() == {"normal": 4, "pneumonia": 8}


def test_full_resolution_originals_are_resized(chest_xray):
    data = load_folder(chest_xray / "val", image_size=64)
    assert len(data) == 16 and data.images.shape[1:] == (1, 64, 64)
    assert data.images.float().std() > 10  # real content, not a blank resize


def test_dataset_root_resolves_to_train_split(chest_xray):
    assert resolve_split_dir(chest_xray) == chest_xray / "train"
    assert resolve_split_dir(chest_xray, "val") == chest_xray / "val"


def test_unreadable_file_is_named_or_skipped_and_counted(small_xray_folder):
    bad = small_xray_folder / "NORMAL" / "broken.jpeg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match="broken.jpeg"):
        load_folder(small_xray_folder, image_size=32)
    data = load_folder(small_xray_folder, image_size=32, skip_unreadable=True)
    assert data.skipped == [bad] and len(data) == 12


def test_non_image_file_is_an_error_naming_it(small_xray_folder):
    (small_xray_folder / "PNEUMONIA" / "notes_bacteria.txt").write_text("hello")
    with pytest.raises(DataError, match="not an image file.*notes_bacteria.txt"):
        load_folder(small_xray_folder, image_size=32)


def test_empty_and_mislabelled_folders_are_clear_errors(small_xray_folder, tmp_path):
    shutil.rmtree(small_xray_folder / "NORMAL")
    (small_xray_folder / "NORMAL").mkdir()
    with pytest.raises(DataError, match="empty.*NORMAL"):
        load_folder(small_xray_folder, image_size=32)
    (small_xray_folder / "COVID").mkdir()
    with pytest.raises(DataError, match="COVID"):
        load_folder(small_xray_folder, image_size=32)
    with pytest.raises(DataError, match="not in the chest X-ray layout"):
        load_folder(tmp_path, image_size=32)
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path / "missing", image_size=32)


def test_pneumonia_file_without_kind_needs_two_classes(small_xray_folder):
    src = next((small_xray_folder / "PNEUMONIA").iterdir())
    shutil.copy(src, small_xray_folder / "PNEUMONIA" / "person1_unknown_1.jpeg")
    with pytest.raises(DataError, match="person1_unknown_1.jpeg"):
        load_folder(small_xray_folder, image_size=32)
    assert len(load_folder(small_xray_folder, image_size=32, num_classes=2)) == 13


def test_read_image_gives_square_greyscale(chest_xray):
    path = next((chest_xray / "val" / "NORMAL").iterdir())
    img = read_image(path, 48)
    assert img.shape == (1, 48, 48) and img.dtype == torch.uint8


def test_synthetic_dataset_is_labelled_and_reproducible():
    a = load_dataset("synthetic:300", image_size=32, seed=1)
    b = load_dataset("synthetic:300", image_size=32, seed=1)
    held = load_dataset("synthetic:300", image_size=32, seed=1, split="val")
    assert a.is_synthetic and a.source == "synthetic" and len(a) == 300
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, held.images)
    counts = a.class_counts()
    assert counts["bacterial"] > counts["normal"] > 30 and counts["viral"] > 30


def test_synthetic_classes_differ_in_the_lungs():
    from medmpc.imaging.synthetic import generate

    images, labels = generate(600, 64, seed=0)
    lungs = images[:, 0, 16:48, 8:56].float()
    mean = [lungs[labels == c].mean() for c in range(3)]
    # consolidation and haze brighten the (dark) lung fields
    assert mean[1] > mean[0] + 1 and mean[2] > mean[0] + 1
