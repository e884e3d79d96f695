"""Data-set level results of randomized smoothing: certified accuracy, its curve, ACR.

Given per-image certificates (from :func:`momentkit.smoothing.certify`): the *certified
accuracy at radius r* is the fraction of images certified correct with radius at least
``r``; the *average certified radius* (ACR) is the mean radius over all images, 0 for
abstained or wrong ones; the *abstention rate* is the fraction of images with prediction
``-1``. The curve ``r -> certified accuracy`` is a non-increasing step function whose
area is the ACR.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from momentkit._validate import check_finite, check_nonnegative
from momentkit.errors import MomentInputError

__all__ = [
    "DEFAULT_RADII",
    "CertificationSummary",
    "average_certified_radius",
    "certified_accuracy",
    "certified_accuracy_curve",
    "summarize_certificates",
]

#: Radii at which :func:`summarize_certificates` reports certified accuracy.
DEFAULT_RADII: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class CertificationSummary:
    """Data-set level certification numbers (:func:`summarize_certificates`).

    Attributes:
        certified_accuracy: ``{radius: fraction}`` at the requested radii.
        acr: average certified radius (0 for abstained or wrong images).
        abstain_rate: fraction of images with prediction ``-1``.
        n_images: number of images.
        curve_radii, curve_accuracy: the curve of :func:`certified_accuracy_curve`.
    """

    certified_accuracy: dict[float, float]
    acr: float
    abstain_rate: float
    n_images: int
    curve_radii: torch.Tensor
    curve_accuracy: torch.Tensor


def _radius_correct(radius: torch.Tensor, correct: torch.Tensor, fn: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.as_tensor(radius, dtype=torch.float64).reshape(-1).cpu()
    c = torch.as_tensor(correct).reshape(-1).cpu().bool()
    if r.shape != c.shape or r.numel() == 0:
        raise MomentInputError(
            f"{fn}: radius and correct must be non-empty and of equal length, got "
            f"{r.numel()} and {c.numel()}")
    check_finite(r, "radius", fn)
    check_nonnegative(r, "radius", fn)
    return r, c


def certified_accuracy(
    radius: torch.Tensor | Sequence[float],
    correct: torch.Tensor | Sequence[bool],
    radii: Sequence[float] = DEFAULT_RADII,
) -> torch.Tensor:
    """Certified accuracy at each of ``radii``: ``mean_i [correct_i and radius_i >= r]``.

    ``radius``, ``correct``: ``(N,)`` per image (``correct`` is False for abstained
    images, whose prediction ``-1`` matches no label). Returns float64 ``(len(radii),)``.
    Raises :class:`MomentInputError` for unequal or empty inputs or negative radii.
    """
    r, c = _radius_correct(radius, correct, "certified_accuracy")
    levels = torch.as_tensor(list(radii), dtype=torch.float64)
    return ((r[None, :] >= levels[:, None]) & c[None, :]).double().mean(dim=1)


def average_certified_radius(
    radius: torch.Tensor | Sequence[float], correct: torch.Tensor | Sequence[bool]
) -> float:
    """ACR: ``mean_i radius_i * correct_i`` (0 for abstained or wrong images)."""
    r, c = _radius_correct(radius, correct, "average_certified_radius")
    return float((r * c.double()).mean())


def certified_accuracy_curve(
    radius: torch.Tensor | Sequence[float], correct: torch.Tensor | Sequence[bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole curve ``r -> certified accuracy at r``, a non-increasing step function.

    Returns ``(radii, accuracy)``, float64 ``(K,)``: ``radii`` starts at 0 and holds the
    distinct radii of correct images in increasing order; the certified accuracy is
    ``accuracy[k]`` on ``(radii[k-1], radii[k]]`` and 0 beyond ``radii[-1]``. Its area,
    ``sum_k accuracy[k] (radii[k] - radii[k-1])``, is the ACR.
    """
    r, c = _radius_correct(radius, correct, "certified_accuracy_curve")
    levels = torch.unique(torch.cat([torch.zeros(1, dtype=torch.float64), r[c]]))
    return levels, certified_accuracy(r, c, levels.tolist())


def summarize_certificates(
    prediction: torch.Tensor | Sequence[int],
    label: torch.Tensor | Sequence[int],
    radius: torch.Tensor | Sequence[float],
    radii: Sequence[float] = DEFAULT_RADII,
) -> CertificationSummary:
    """Certified accuracy at ``radii``, the curve, ACR and abstention rate of a data set.

    ``prediction`` (``-1`` = abstain), ``label``, ``radius``: ``(N,)`` per image, e.g.
    from :func:`momentkit.smoothing.certify`. An image counts as correct when
    ``prediction == label``.
    """
    pred = torch.as_tensor(prediction).reshape(-1).cpu()
    lab = torch.as_tensor(label).reshape(-1).cpu()
    if pred.shape != lab.shape:
        raise MomentInputError(
            f"summarize_certificates: prediction and label lengths differ "
            f"({pred.numel()} and {lab.numel()})")
    correct = pred == lab
    acc = certified_accuracy(radius, correct, radii)
    curve_r, curve_acc = certified_accuracy_curve(radius, correct)
    return CertificationSummary(
        certified_accuracy={float(r): float(a) for r, a in zip(radii, acc.tolist(), strict=True)},
        acr=average_certified_radius(radius, correct),
        abstain_rate=float((pred == -1).double().mean()),
        n_images=int(pred.numel()),
        curve_radii=curve_r,
        curve_accuracy=curve_acc,
    )
