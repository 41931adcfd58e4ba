"""The training recipe: augmentation against acquisition shift, MixUp, the learning rate across
rounds, model selection by validation MCC, and bfloat16 training."""

import pytest
import torch

from medmpc.imaging.dataset import load_dataset
from medmpc.imaging.transforms import AUGMENTATIONS, Augmentation, Preprocessing, augmentation
from medmpc.models.registry import build_model
from medmpc.models.vector import to_vector
from medmpc.protocols.plan import Plan
from medmpc.training.centralised import train_centralised
from medmpc.training.checkpoint import Checkpoint
from medmpc.training.dp import DPConfig
from medmpc.training.evaluation import Selection
from medmpc.training.local import TrainConfig, _forward, _layout, predict, train
from medmpc.training.metrics import classification_metrics

STILL = dict(degrees=0, translate=0, scale=(1, 1))


def _pixels(n: int = 6, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ramp = torch.linspace(0.1, 0.9, size).view(1, 1, 1, size).expand(n, 1, size, size)
    return (ramp + 0.05 * torch.randn(n, 1, size, size, generator=g)).clamp(0, 1)


@pytest.mark.parametrize(
    "setting, changes",
    [
        ({"gamma": 0.5}, lambda x, y: not torch.allclose(x.mean((1, 2, 3)), y.mean((1, 2, 3)), atol=1e-3)),
        ({"contrast": 0.5}, lambda x, y: not torch.allclose(x.std((1, 2, 3)), y.std((1, 2, 3)), atol=1e-3)),
        ({"brightness": 0.2}, lambda x, y: not torch.allclose(x.mean((1, 2, 3)), y.mean((1, 2, 3)), atol=1e-3)),
        # blur removes pixel-to-pixel noise: neighbouring pixels differ less
        ({"blur": 2.0}, lambda x, y: (y.diff(dim=-1).abs().mean() < 0.8 * x.diff(dim=-1).abs().mean()).item()),
        ({"noise": 0.1}, lambda x, y: (y - x).abs().mean().item() > 0.005),
    ],
)
def test_each_intensity_change_acts_and_keeps_pixels_in_range(setting, changes):
    x = _pixels()
    y = Augmentation(**STILL, **setting)(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and changes(x, y)
    assert 0 <= float(y.min()) and float(y.max()) <= 1  # what an image can hold
    # the control: the same augmentation with that change off leaves the image alone
    assert torch.allclose(Augmentation(**STILL)(x), x, atol=1e-5)


def test_shift_augmentation_is_reproducible_and_differs_per_image():
    x = _pixels()
    shift = augmentation("shift")
    assert shift is not None
    a, b = shift(x, torch.Generator().manual_seed(3)), shift(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    change = (a - x).mean((1, 2, 3))
    assert change.unique().numel() == len(x)  # every image draws its own parameters
    assert augmentation("none") is None and set(AUGMENTATIONS) == {"none", "affine", "shift"}
    with pytest.raises(ValueError, match="unknown augmentation 'sharpen'.*none, affine, shift"):
        augmentation("sharpen")
    with pytest.raises(ValueError, match="unknown augmentation"):
        TrainConfig(augment="sharpen")


def test_mixup_is_refused_with_dp_before_anything_trains(tmp_path):
    with pytest.raises(ValueError, match="MixUp makes each training example from two patients"):
        Plan(mixup=0.2, dp_epsilon=8.0, model="cnn_gn")
    data = load_dataset("synthetic:60", image_size=32)
    with pytest.raises(ValueError, match="MixUp"):
        train_centralised(
            data, model_name="cnn_gn", cfg=TrainConfig(epochs=1, mixup=0.2), out=tmp_path, dp=DPConfig(8.0, 1e-5, 1.0)
        )
    assert not (tmp_path / "model.pt").exists()
    with pytest.raises(ValueError, match="mixup must be at least 0"):
        Plan(mixup=-0.1)


def test_cosine_decay_runs_from_lr_to_a_tenth_across_rounds():
    plan = Plan(rounds=5, lr=1e-3, lr_decay="cosine")
    lrs = [plan.round_lr(r) for r in range(1, 6)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert Plan(rounds=5, lr=1e-3).round_lr(5) == 1e-3  # "none": constant
    with pytest.raises(ValueError, match="unknown lr_decay 'step'; choose one of none, cosine"):
        Plan(lr_decay="step")


def test_selection_keeps_the_first_of_the_best():
    best = Selection()
    assert [best.offer(at, {"mcc": m}) for at, m in enumerate([0.2, 0.5, 0.5, 0.4, 0.6], 1)] == [
        True,
        True,
        False,
        False,
        True,
    ]
    assert best.summary("round") == {"round": 5, "by": "validation MCC", "mcc": 0.6}


def test_centralised_training_keeps_the_epoch_with_the_best_validation_mcc(tmp_path):
    data = load_dataset("synthetic:240", image_size=32)
    cfg = TrainConfig(epochs=4, batch_size=32, lr=5e-3, augment="shift", mixup=0.2)
    report = train_centralised(
        data, model_name="cnn", cfg=cfg, out=tmp_path, shift=load_dataset("synthetic:30", image_size=32, split="val")
    )
    mccs = [h["mcc"] for h in report["history"]]
    chosen = report["selected"]["epoch"]
    assert chosen == 1 + mccs.index(max(mccs))
    # the checkpoint is that epoch's model: its validation MCC, recomputed, is that epoch's
    ckpt = Checkpoint.load(tmp_path)
    _, val = data.held_out(0.15, seed=0)
    again = classification_metrics(predict(ckpt.build(), val.images, ckpt.preprocessing), val.labels, val.classes)
    assert again["mcc"] == pytest.approx(mccs[chosen - 1]) == pytest.approx(report["validation"]["mcc"])
    assert report["config"]["augment"] == "shift" and report["config"]["mixup"] == 0.2
    assert ckpt.info["config"]["augment"] == "shift" and ckpt.info["selected"]["epoch"] == chosen
    assert report["shift_check"]["n_images"] == 30 and ckpt.info["shift_check"]["source"] == "synthetic"


def test_bf16_trains_in_bfloat16_and_hands_back_a_float32_model_in_the_default_layout():
    data = load_dataset("synthetic:48", image_size=32)
    model = build_model("cnn", 3, seed=0)
    before = to_vector(model).clone()
    during, between = [], []

    def conv(module, inputs, output):
        channels_last = module.weight.is_contiguous(memory_format=torch.channels_last)
        during.append((output.dtype, channels_last and not module.weight.is_contiguous()))

    def on_epoch(epoch, loss):
        between.append(all(p.is_contiguous() and p.dtype == torch.float32 for p in model.parameters()))

    model[4].register_forward_hook(conv)  # 16 channels in: there the two layouts differ
    cfg = TrainConfig(epochs=2, batch_size=16, lr=1e-3, precision="bf16")
    losses = train(
        model, data.images, data.labels, Preprocessing.fit(data.images), cfg, num_classes=3, on_epoch=on_epoch
    )
    assert len(during) == 6 and set(during) == {(torch.bfloat16, True)}  # 3 batches x 2 epochs
    assert between == [True, True]  # what reads the model between epochs sees it as always
    after = to_vector(model)
    assert torch.isfinite(after).all() and not torch.equal(after, before)
    assert all(torch.isfinite(torch.tensor(loss)) for loss in losses)
    # the control: fp32 convolves in float32
    during.clear()
    train(model, data.images, data.labels, Preprocessing.fit(data.images), TrainConfig(epochs=1), num_classes=3)
    assert set(during) == {(torch.float32, False)}


def test_bf16_gradients_point_where_fp32_gradients_point():
    data = load_dataset("synthetic:64", image_size=64)
    x, y = Preprocessing.fit(data.images)(data.images), data.labels
    model = build_model("cnn", 3, seed=0)

    def gradient(precision, batch):
        model.zero_grad()
        with _layout(model, precision):
            torch.nn.functional.cross_entropy(_forward(model, x[batch], precision), y[batch]).backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    first, second = slice(0, 32), slice(32, 64)
    fp32 = gradient("fp32", first)
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(fp32, gradient("bf16", first), dim=0) > 0.98
    # the control: another batch's gradient is far from this one's, so the bound above means something
    assert cosine(fp32, gradient("fp32", second), dim=0) < 0.5


def test_unknown_precision_and_bf16_with_dp_are_refused_before_anything_trains(tmp_path):
    with pytest.raises(ValueError, match="unknown training precision 'fp16'; choose one of fp32, bf16"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="unknown training precision 'fp16'"):
        Plan(precision="fp16")
    with pytest.raises(ValueError, match="precision bf16 with DP: per-sample gradient norms"):
        Plan(precision="bf16", dp_epsilon=8.0, model="cnn_gn")
    data = load_dataset("synthetic:60", image_size=32)
    with pytest.raises(ValueError, match="precision bf16 with DP"):
        train_centralised(
            data,
            model_name="cnn_gn",
            cfg=TrainConfig(epochs=1, precision="bf16"),
            out=tmp_path,
            dp=DPConfig(8.0, 1e-5, 1.0),
        )
    assert not (tmp_path / "model.pt").exists()
