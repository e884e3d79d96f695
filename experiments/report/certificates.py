"""Randomized-smoothing certificates of a run folder, read for the report.

``python -m experiments certify --run DIR --sigma S`` writes ``DIR/certify-sigma<S>.json``
(:func:`experiments.rundir.certify_file`): the settings ``sigma, n0, n, alpha, seed,
version``, one entry ``{index, label, prediction, radius, p_lower, correct}`` per certified
test image (``prediction == -1``: the smoothed classifier abstains, radius 0) and a
``summary``. A run may hold one file per certification sigma.

The report never trusts the stored summary: :class:`Certificate` recomputes it from the
per-image list (Cohen, Rosenfeld and Kolter 2019; Zhai et al. 2020 for the ACR):

* an image is *certified correct at radius r* when ``prediction == label`` and
  ``radius >= r``; the certified accuracy at ``r`` is the fraction of images certified
  correct at ``r`` (a non-increasing step function of ``r``, :meth:`Certificate.curve`);
* ``ACR = mean_i radius_i * [prediction_i == label_i]`` (0 for a wrong or abstained image),
  which is also the area under the certified-accuracy curve;
* the abstention rate is the fraction of images with ``prediction == -1``.

A stored summary that disagrees with the recomputation (beyond :data:`SUMMARY_RTOL`), or a
stored ``correct`` that is not ``prediction == label``, gives a warning; the recomputed
values are used. An unreadable or malformed file is skipped with a warning.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from experiments import rundir

__all__ = [
    "CERTIFIED_RADII",
    "SUMMARY_RTOL",
    "Certificate",
    "certificate_from_json",
    "load_certificates",
]

CERTIFIED_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Radii at which the report gives the certified accuracy (those of the certify command)."""

SUMMARY_RTOL = 1e-9
"""Relative tolerance of the stored summary against the recomputed one. JSON round-trips a
float exactly, so the two differ only by summation order: at most ``n * eps`` relative for n
images, 2e-11 at n = 1e5. A real disagreement (one image more or less) changes a certified
accuracy by ``1 / n``, at least 1e-6 for a million images: far above 1e-9."""

_KEYS = ("index", "label", "prediction", "radius", "p_lower", "correct")


@dataclass(frozen=True, eq=False)
class Certificate:
    """The certificates of one run at one sigma, sorted by test-image index.

    Arrays are ``(n_images,)``: ``index``, ``label``, ``prediction`` (int64, -1 = abstain),
    ``radius``, ``p_lower`` (float64) and ``correct`` (bool, ``prediction == label``).
    """

    path: Path
    sigma: float
    n0: int
    n: int
    alpha: float
    seed: int | None
    version: str | None
    index: np.ndarray
    label: np.ndarray
    prediction: np.ndarray
    radius: np.ndarray
    p_lower: np.ndarray
    correct: np.ndarray

    @property
    def n_images(self) -> int:
        return int(self.index.shape[0])

    @property
    def certified_radius(self) -> np.ndarray:
        """Per-image ``radius_i * [correct_i]``: its mean is the ACR."""
        return np.where(self.correct, self.radius, 0.0)

    def curve(self, radii: Sequence[float] | np.ndarray) -> np.ndarray:
        """Certified accuracy at each of ``radii``: ``mean_i [correct_i and radius_i >= r]``.

        Exact (a count over images, by binary search in the sorted radii of the correct
        images); 0 for no images. ``radii`` and the result have the same shape.
        """
        r = np.asarray(radii, dtype=np.float64)
        if self.n_images == 0:
            return np.zeros_like(r)
        good = np.sort(self.radius[self.correct])
        above = good.size - np.searchsorted(good, r, side="left")  # count of radius >= r
        return above / self.n_images

    @property
    def acr(self) -> float:
        """Average certified radius ``mean_i radius_i * [correct_i]`` (0 for no images)."""
        return float(self.certified_radius.mean()) if self.n_images else 0.0

    @property
    def abstain_rate(self) -> float:
        return float((self.prediction == -1).mean()) if self.n_images else 0.0

    def summary(self) -> dict[str, Any]:
        """The summary recomputed from the per-image list, in the certify command's layout."""
        acc = self.curve(CERTIFIED_RADII).tolist()
        return {
            "certified_accuracy": dict(zip(map(str, CERTIFIED_RADII), acc, strict=True)),
            "acr": self.acr,
            "abstain_rate": self.abstain_rate,
            "n_images": self.n_images,
        }

    def settings(self) -> tuple[float, int, float]:
        """``(sigma, n, alpha)``: certificates are comparable only when these agree."""
        return (self.sigma, self.n, self.alpha)


def _close(stored: Any, value: float) -> bool:
    try:
        s = float(stored)
    except (TypeError, ValueError):
        return False
    return abs(s - value) <= SUMMARY_RTOL * max(1.0, abs(value))


def _radius_key(key: Any) -> float | None:
    try:
        return float(key)
    except (TypeError, ValueError):
        return None


def _summary_mismatches(stored: Any, fresh: dict[str, Any]) -> list[str]:
    """Human-readable differences of a stored summary from the recomputed one."""
    if not isinstance(stored, dict):
        return ["no summary"]
    out = []
    acc = stored.get("certified_accuracy")
    acc = {_radius_key(k): v for k, v in acc.items()} if isinstance(acc, dict) else {}
    for r in CERTIFIED_RADII:
        value = fresh["certified_accuracy"][str(r)]
        if not _close(acc.get(r), value):
            out.append(f"certified accuracy at {r:g}: stored {acc.get(r)!r}, recomputed {value}")
    for key in ("acr", "abstain_rate", "n_images"):
        if not _close(stored.get(key), fresh[key]):
            out.append(f"{key}: stored {stored.get(key)!r}, recomputed {fresh[key]}")
    return out


def certificate_from_json(obj: dict[str, Any], path: Path) -> Certificate:
    """A :class:`Certificate` from a certify file's content; warns on a mismatched summary.

    Raises:
        ValueError: missing keys, a non-finite or negative sigma or radius, a duplicated
            image index.
    """
    images = obj.get("images")
    missing = [k for k in ("sigma", "n0", "n", "alpha") if k not in obj]
    if not isinstance(images, list) or missing:
        raise ValueError(f"no images list or missing settings {missing}")
    try:
        cols = {k: [im[k] for im in images] for k in _KEYS}
    except (KeyError, TypeError) as exc:
        raise ValueError(f"an image entry lacks {exc}") from None
    index = np.asarray(cols["index"], dtype=np.int64).reshape(-1)
    order = np.argsort(index, kind="stable")
    arr = {k: np.asarray(cols[k]).reshape(-1)[order] for k in _KEYS}
    radius = arr["radius"].astype(np.float64)
    sigma = float(obj["sigma"])
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma {obj['sigma']!r} is not a positive number")
    if not np.all(np.isfinite(radius)) or np.any(radius < 0):
        raise ValueError("a radius is negative or not finite")
    if np.unique(index).size != index.size:
        raise ValueError("an image index appears twice")
    prediction = arr["prediction"].astype(np.int64)
    label = arr["label"].astype(np.int64)
    cert = Certificate(
        path=path,
        sigma=sigma,
        n0=int(obj["n0"]),
        n=int(obj["n"]),
        alpha=float(obj["alpha"]),
        seed=None if obj.get("seed") is None else int(obj["seed"]),
        version=None if obj.get("version") is None else str(obj["version"]),
        index=index[order],
        label=label,
        prediction=prediction,
        radius=radius,
        p_lower=arr["p_lower"].astype(np.float64),
        correct=prediction == label,
    )
    problems = _summary_mismatches(obj.get("summary"), cert.summary())
    stored_correct = arr["correct"].astype(bool)
    if not np.array_equal(stored_correct, cert.correct):
        wrong = int((stored_correct != cert.correct).sum())
        problems.append(f"'correct' is not prediction == label for {wrong} images")
    if problems:
        warnings.warn(
            f"{path}: the stored summary disagrees with the per-image certificates "
            f"({'; '.join(problems)}); the report uses the values recomputed from the images",
            stacklevel=3,
        )
    return cert


def load_certificates(rdir: str | Path) -> tuple[Certificate, ...]:
    """Every ``certify-sigma*.json`` of a run folder, sorted by sigma (``()`` when none).

    Files are read with :func:`experiments.rundir.read_json`; an unreadable or malformed
    one is skipped with a warning, as is a second file with the same sigma.
    """
    out: dict[float, Certificate] = {}
    for path in sorted(Path(rdir).glob(rundir.CERTIFY_PATTERN)):
        obj = rundir.read_json(path)
        try:
            if obj is None:
                raise ValueError("unreadable JSON")
            cert = certificate_from_json(obj, path)
        except (ValueError, TypeError) as exc:
            warnings.warn(f"skipping certificates {path}: {exc}", stacklevel=2)
            continue
        if cert.sigma in out:
            warnings.warn(
                f"skipping certificates {path}: sigma {cert.sigma:g} already read from "
                f"{out[cert.sigma].path.name}",
                stacklevel=2,
            )
            continue
        out[cert.sigma] = cert
    return tuple(out[s] for s in sorted(out))
