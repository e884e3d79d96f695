"""Tests of momentkit.certification: data-set level results of randomized smoothing."""

from __future__ import annotations

import pytest
import torch

import momentkit
from momentkit.certification import (
    average_certified_radius,
    certified_accuracy,
    certified_accuracy_curve,
    summarize_certificates,
)
from momentkit.errors import MomentInputError


def test_data_set_summaries_known_values() -> None:
    radius = torch.tensor([0.0, 0.3, 0.6, 1.2, 0.8, 0.0])
    label = torch.tensor([0, 1, 2, 3, 4, 5])
    prediction = torch.tensor([0, 1, 2, 3, 9, -1])  # image 4 wrong, image 5 abstains
    correct = prediction == label
    acc = certified_accuracy(radius, correct, (0.0, 0.25, 0.5, 0.75, 1.0, 2.0))
    assert acc.tolist() == pytest.approx([4 / 6, 3 / 6, 2 / 6, 1 / 6, 1 / 6, 0.0])
    assert average_certified_radius(radius, correct) == pytest.approx(2.1 / 6)
    radii, curve = certified_accuracy_curve(radius, correct)
    assert radii.tolist() == pytest.approx([0.0, 0.3, 0.6, 1.2])
    area = float((curve[1:] * radii.diff()).sum())
    assert area == pytest.approx(average_certified_radius(radius, correct), rel=1e-12)
    summary = summarize_certificates(prediction, label, radius)
    assert summary.abstain_rate == pytest.approx(1 / 6) and summary.n_images == 6
    assert summary.certified_accuracy[0.5] == pytest.approx(2 / 6)
    assert momentkit.certified_accuracy is certified_accuracy


@pytest.mark.parametrize(
    ("radius", "correct", "what"),
    [
        ([0.1, -0.2], [True, True], "radius must be non-negative"),
        ([0.1, float("inf")], [True, True], "radius contains inf"),
        ([0.1], [True, False], "radius and correct must be non-empty and of equal length"),
        ([], [], "radius and correct must be non-empty"),
    ],
)
def test_bad_certificates_are_refused(radius: list, correct: list, what: str) -> None:
    with pytest.raises(MomentInputError, match=f"certified_accuracy: {what}"):
        certified_accuracy(torch.tensor(radius), torch.tensor(correct, dtype=torch.bool))
