"""Evaluation of a trained model: clean accuracy, Eq. 6 robustness, degenerate predictions.

:func:`evaluate_model` measures a model on test images: its clean accuracy, the
robustness curve of paper Eq. 6 (through :func:`momentkit.robustness.gaussian_robustness`,
with a fixed noise seed so every run is measured with the same noise) and how
concentrated its predictions are. Eq. 6 counts the test images whose prediction does not
change under noise, so a model that predicts one class everywhere (a diverged or dead
network) scores a perfect robustness of 1; :func:`degenerate_predictions` flags such a
model so that its robustness is never read as a result.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from experiments import rundir
from experiments.data import ImageSet, iterate_batches

EVAL_SEED = 0
"""Seed of the robustness noise: fixed, so all runs are measured with the same noise."""
EVAL_BATCH_SIZE = 1000
DEFAULT_EVAL_SIGMA_MAX = 0.5
DEGENERATE_FRACTION = 0.9
"""A model whose most frequent predicted class takes at least this fraction of the test
predictions is flagged as degenerate (the test sets are balanced, about 0.1 per class
for ten classes, so a trained model is far below it)."""


def default_sigmas(n: int = 30) -> torch.Tensor:
    """``linspace(0, 0.5, n)``: the paper's robustness sigmas (Eq. 6), float64 ``(n,)``."""
    return torch.linspace(0.0, DEFAULT_EVAL_SIGMA_MAX, n, dtype=torch.float64)


class _BatchSet(torch.utils.data.Dataset):
    """A map-style data set whose item ``i`` is the ``i``-th batch ``(x, y)`` of an ImageSet."""

    def __init__(self, data: ImageSet, batch_size: int) -> None:
        self.data, self.batch_size = data, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.data) / self.batch_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.batch_size
        stop = min(start + self.batch_size, len(self.data))
        return self.data.batch(torch.arange(start, stop))


def batch_loader(
    data: ImageSet, batch_size: int = EVAL_BATCH_SIZE
) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` of float batches ``(x, y)`` over ``data`` in order (no per-item work)."""
    return torch.utils.data.DataLoader(_BatchSet(data, batch_size), batch_size=None)


def degenerate_predictions(predictions: np.ndarray) -> dict[str, Any]:
    """``{"flagged": bool, "top_class_fraction": float}`` of integer predictions ``(n,)``.

    ``top_class_fraction`` is the share of the most frequent predicted class; ``flagged``
    is ``top_class_fraction >= DEGENERATE_FRACTION``. Empty predictions give fraction 0.
    """
    predictions = np.asarray(predictions).reshape(-1)
    if predictions.size == 0:
        return {"flagged": False, "top_class_fraction": 0.0}
    fraction = float(np.bincount(predictions.astype(np.int64)).max() / predictions.size)
    return {"flagged": fraction >= DEGENERATE_FRACTION, "top_class_fraction": fraction}


def _floats(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.astype(float).tolist()
    if isinstance(value, tuple | list):
        return [_floats(v) for v in value]
    return float(value)


def evaluate_model(
    model: nn.Module,
    test: ImageSet,
    *,
    sigmas: torch.Tensor | None = None,
    samples: int = 1,
    seed: int = EVAL_SEED,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Clean accuracy and Eq. 6 robustness of ``model`` on ``test``.

    Returns ``{"test_accuracy", "n_test", "robustness": {"sigmas", "curve", "auc",
    "mean", "ci"}, "degenerate_predictions": {"flagged", "top_class_fraction"},
    "correct": bool array (n_test,), "robust": bool array (n_sigmas, n_test)}``.
    ``sigmas`` defaults to :func:`default_sigmas`; the noise is drawn by
    :func:`momentkit.robustness.gaussian_robustness` with ``seed`` and ``samples`` noise
    vectors per image and sigma.
    """
    from momentkit.robustness import gaussian_robustness

    model = model.to(device).eval()
    test = test.to(device)
    predictions = []
    with torch.no_grad():
        for x, _ in iterate_batches(test, EVAL_BATCH_SIZE):
            predictions.append(model(x).argmax(1).cpu())
    predicted = torch.cat(predictions).numpy()
    correct_arr = predicted == test.labels.cpu().numpy()
    sigmas = default_sigmas() if sigmas is None else sigmas
    result = gaussian_robustness(
        model, batch_loader(test), sigmas=sigmas, samples=samples, seed=seed, device=device
    )
    per_image = result.per_image
    if isinstance(per_image, torch.Tensor):
        per_image = per_image.detach().cpu().numpy()
    return {
        "test_accuracy": float(correct_arr.mean()),
        "n_test": int(correct_arr.shape[0]),
        "robustness": {
            "sigmas": _floats(result.sigmas),
            "curve": _floats(result.curve),
            "auc": float(result.auc),
            "mean": float(result.mean),
            "ci": _floats(result.ci),
        },
        "degenerate_predictions": degenerate_predictions(predicted),
        "correct": correct_arr.astype(bool),
        "robust": np.asarray(per_image, dtype=bool),
    }


def degenerate_warning(evaluation: dict[str, Any]) -> str | None:
    """A one-line warning when an evaluation's predictions are degenerate, else ``None``."""
    flag = evaluation.get("degenerate_predictions") or {}
    if not flag.get("flagged"):
        return None
    return (
        f"warning: {flag['top_class_fraction']:.0%} of the test predictions are one class; "
        "the model is degenerate and its robustness (Eq. 6 rewards a constant classifier) "
        "means nothing"
    )


def write_evaluation(out_dir: str | os.PathLike[str], evaluation: dict[str, Any]) -> None:
    """Write ``per_image.npz`` (``correct``, ``robust``) of an :func:`evaluate_model` result."""
    rundir.write_npz_atomic(
        Path(out_dir) / rundir.PER_IMAGE_FILE,
        correct=evaluation["correct"],
        robust=evaluation["robust"],
    )
