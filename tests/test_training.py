import pytest
import torch

from medmpc.imaging.dataset import load_dataset
from medmpc.imaging.transforms import Augmentation, Preprocessing
from medmpc.models import build_model
from medmpc.training.checkpoint import Checkpoint
from medmpc.training.local import TrainConfig, class_weights, predict, train
from medmpc.training.metrics import classification_metrics


def test_class_weights_balance_rare_classes():
    w = class_weights(torch.tensor([10, 30, 20]))
    assert w.tolist() == pytest.approx([2.0, 2 / 3, 1.0])
    assert class_weights(torch.tensor([2, 1, 0]))[2] == 0  # absent class gets no weight, no NaN


def test_preprocessing_normalises_and_checks_size():
    images = torch.randint(0, 256, (20, 1, 32, 32), dtype=torch.uint8)
    prep = Preprocessing.fit(images)
    x = prep(images)
    assert abs(float(x.mean())) < 1e-4 and float(x.std()) == pytest.approx(1, abs=1e-3)
    with pytest.raises(ValueError, match="32x32"):
        prep(torch.zeros(1, 1, 64, 64, dtype=torch.uint8))


def test_augmentation_without_jitter_is_identity_and_with_jitter_moves_pixels():
    x = torch.randn(4, 1, 32, 32)
    still = Augmentation(degrees=0, translate=0, scale=(1, 1))
    assert torch.allclose(still(x), x, atol=1e-5)
    moved = Augmentation()(x, torch.Generator().manual_seed(0))
    assert moved.shape == x.shape and not torch.allclose(moved, x, atol=1e-2)


def test_training_learns_synthetic_classes():
    data = load_dataset("synthetic:600", image_size=32, seed=0)
    held = load_dataset("synthetic:300", image_size=32, seed=0, split="val")
    prep = Preprocessing.fit(data.images)
    model = build_model("cnn", 3, seed=0)
    before = classification_metrics(predict(model, held.images, prep), held.labels, data.classes)
    losses = train(model, data.images, data.labels, prep, TrainConfig(epochs=4, seed=0), num_classes=3)
    after = classification_metrics(predict(model, held.images, prep), held.labels, data.classes)
    assert losses[-1] < losses[0]
    assert after["pneumonia_roc_auc"] > 0.8 > before["pneumonia_roc_auc"]


def test_checkpoint_round_trip_and_rejects_other_files(tmp_path):
    model = build_model("cnn", 2, seed=3)
    prep = Preprocessing(64, 0.5, 0.25)
    Checkpoint("cnn", ("normal", "pneumonia"), prep, model.state_dict(), {"note": "x"}).save(tmp_path / "m.pt")
    ckpt = Checkpoint.load(tmp_path / "m.pt")
    assert ckpt.preprocessing == prep and ckpt.info == {"note": "x"}
    x = torch.randn(2, 1, 64, 64)
    assert torch.equal(ckpt.build()(x), model.eval()(x))
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a medmpc checkpoint"):
        Checkpoint.load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        Checkpoint.load(tmp_path / "absent.pt")
