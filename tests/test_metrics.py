import math

import pytest
import torch
from sklearn.metrics import roc_auc_score

from medmpc.training.metrics import classification_metrics

CLASSES = ("normal", "bacterial", "viral")


def test_perfect_predictions():
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    logits = torch.nn.functional.one_hot(labels, 3).float() * 10
    m = classification_metrics(logits, labels, CLASSES)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "mcc", "roc_auc", "pneumonia_roc_auc"):
        assert m[key] == pytest.approx(1.0), key
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]


def test_hand_computed_confusion_counts():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    pred = torch.tensor([0, 1, 0, 1, 2, 2, 0, 2])
    m = classification_metrics(torch.nn.functional.one_hot(pred, 3).float(), labels, CLASSES)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 2]]
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["sensitivity_per_class"] == pytest.approx([2 / 3, 1 / 2, 2 / 3])
    assert m["specificity_per_class"] == pytest.approx([4 / 5, 5 / 6, 4 / 5])
    # pneumonia = any non-normal class: 5 true pneumonia, 4 called pneumonia; 3 normal, 2 called normal
    assert m["pneumonia_sensitivity"] == pytest.approx(4 / 5)
    assert m["pneumonia_specificity"] == pytest.approx(2 / 3)


def test_auc_is_one_vs_rest_on_softmax_and_pneumonia_uses_p_normal():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (200,), generator=g)
    logits = torch.randn(200, 3, generator=g) + torch.nn.functional.one_hot(labels, 3)
    m = classification_metrics(logits, labels, CLASSES)
    probs = torch.softmax(logits.double(), 1).numpy()
    y = labels.numpy()
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    assert m["pneumonia_roc_auc"] == pytest.approx(roc_auc_score(y > 0, 1 - probs[:, 0]))
    # AUC must use probabilities, not hard predictions
    assert m["roc_auc"] != pytest.approx(
        classification_metrics(logits.argmax(1, keepdim=True).eq(torch.arange(3)).float() * 50, labels, CLASSES)[
            "roc_auc"
        ]
    )


def test_class_absent_from_labels_has_no_auc():
    labels = torch.tensor([0, 0, 1, 1])  # no viral images, like the official val/ folder
    logits = torch.tensor([[2.0, 0, 0], [1, 0.5, 0], [0, 2, 1], [0, 1, 2]])
    m = classification_metrics(logits, labels, CLASSES)
    assert m["roc_auc_per_class"][2] is None
    assert m["roc_auc"] == pytest.approx((m["roc_auc_per_class"][0] + m["roc_auc_per_class"][1]) / 2)
    assert m["sensitivity_per_class"][2] is None and not math.isnan(m["mcc"])


def test_empty_input_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        classification_metrics(torch.empty(0, 3), torch.empty(0, dtype=torch.long), CLASSES)
