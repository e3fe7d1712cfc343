"""Two models compared: hand-checked agreement and right/wrong table, and a filter matching that undoes a shuffle."""

from __future__ import annotations

import pytest
import torch

from models.compare import compare_png, compare_predictions, cosine_matrix, match_filters, predict_labels
from models.errors import InvalidArgument
from models.resnet import build_model
from models.visual import filters

CLASSES = ["cat", "dog", "frog"]


def test_agreement_table_and_classes_by_hand() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    a = torch.tensor([0, 1, 1, 1, 2, 0])  # right: 0, 2, 3, 4
    b = torch.tensor([0, 0, 1, 2, 2, 0])  # right: 0, 1, 2, 4; same answer as a at 0, 2, 4, 5
    r = compare_predictions(labels, a, b, CLASSES)
    assert r["n"] == 6 and r["accuracy"] == {"a": 4 / 6, "b": 4 / 6}
    assert r["agreement"] == pytest.approx(4 / 6)
    assert r["table"] == {"both_right": 3, "a_right_b_wrong": 1, "a_wrong_b_right": 1, "both_wrong": 1}
    assert r["per_class"] == [
        {"class": "cat", "a": 0.5, "b": 1.0},
        {"class": "dog", "a": 1.0, "b": 0.5},
        {"class": "frog", "a": 0.5, "b": 0.5},
    ]
    # frog: same accuracy and the same answers: it differs least; cat and dog each differ on one image of two.
    assert [d["class"] for d in r["differ_most"]] == ["cat", "dog", "frog"]
    assert r["differ_most"][0] == {"class": "cat", "disagreement": 0.5, "acc_a": 0.5, "acc_b": 1.0, "delta": 0.5}
    assert r["differ_most"][2]["disagreement"] == 0.0
    with pytest.raises(InvalidArgument):
        compare_predictions(labels, a[:3], b, CLASSES)


def test_matching_recovers_a_permutation_of_filters() -> None:
    g = torch.Generator().manual_seed(0)
    wa = torch.randn(64, 3, 7, 7, generator=g)
    perm = torch.randperm(64, generator=g)
    # b holds a's filters shuffled, rescaled and slightly noisy: b[j] ~ a[perm[j]], so a's filter i is b's inv[i].
    wb = wa[perm] * 3.0 + 0.05 * torch.randn(64, 3, 7, 7, generator=g)
    inv = torch.argsort(perm)
    m = match_filters(wa, wb)
    assert m["b_for_a"] == inv.tolist()
    assert min(m["similarity"]) > 0.99
    # Negative control: in their given order the filters are unrelated (random filters are near-orthogonal).
    assert abs(m["unmatched_mean_similarity"]) < 0.2 < m["mean_similarity"]
    sim = cosine_matrix(wa, wb)
    assert m["similarity"][5] == pytest.approx(float(sim[5, inv[5]]), abs=1e-6)
    with pytest.raises(InvalidArgument):
        match_filters(wa, wb[:, :, :3, :3])


def test_a_model_with_itself_agrees_everywhere_and_another_does_not() -> None:
    torch.manual_seed(0)
    m1, m2 = build_model("resnet18", 3).eval(), build_model("resnet18", 3).eval()
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 3, (16,))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    p1 = predict_labels(m1, images, mean, std, batch_size=6)
    assert p1.shape == (16,) and p1.dtype == torch.int64
    same = compare_predictions(labels, p1, predict_labels(m1, images, mean, std), CLASSES)
    assert same["agreement"] == 1.0 and same["table"]["a_right_b_wrong"] == same["table"]["a_wrong_b_right"] == 0
    w1 = filters(m1, "conv1")
    self_match = match_filters(w1, w1)
    assert self_match["b_for_a"] == list(range(64)) and min(self_match["similarity"]) == pytest.approx(1.0)
    other = compare_predictions(labels, p1, predict_labels(m2, images, mean, std), CLASSES)
    report = {**other, "filters": match_filters(w1, filters(m2, "conv1"))}
    report |= {"models": {"a": "m1", "b": "m2"}, "split": "synthetic"}
    png = compare_png(report, w1, filters(m2, "conv1"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_models_of_different_stems_compare_without_a_filter_matching() -> None:
    """The seed stem's 7x7 conv1 and the CIFAR stem's 3x3 cannot be matched: the figure says so, and still draws."""
    torch.manual_seed(0)
    seed, cifar = build_model("resnet18", 3).eval(), build_model("resnet18-cifar", 3).eval()
    wa, wb = filters(seed, "conv1"), filters(cifar, "conv1")
    with pytest.raises(InvalidArgument, match="cannot be matched") as e:
        match_filters(wa, wb)
    labels = torch.tensor([0, 1, 2, 0])
    report = compare_predictions(labels, labels, torch.tensor([0, 1, 1, 0]), CLASSES)
    report |= {"filters": {"note": str(e.value)}, "models": {"a": "seed", "b": "cifar"}, "split": "synthetic"}
    png = compare_png(report, wa, wb)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
