import pytest
import torch
from torch import nn

from medmpc.models import build_model, model_names


@pytest.mark.parametrize("name", ["resnet18", "resnet18_gn", "cnn", "cnn_gn"])
@pytest.mark.parametrize("classes", [2, 3])
def test_models_take_one_channel_and_give_class_logits(name, classes):
    model = build_model(name, classes, seed=0).eval()
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, classes)


@pytest.mark.parametrize("name", ["resnet18_gn", "cnn_gn"])
def test_group_norm_variants_have_no_batch_norm(name):
    modules = list(build_model(name, 3).modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules)
    assert any(isinstance(m, nn.GroupNorm) for m in modules)


def test_seed_makes_weights_reproducible():
    a, b, c = (build_model("cnn", 3, seed=s).state_dict() for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="resnet18"):
        build_model("vgg", 3)
    assert {"resnet18", "resnet18_gn", "cnn"} <= set(model_names())
