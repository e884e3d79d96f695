"""Is one trained run more robust than another? Paired bootstrap intervals over test images.

What you learn: the difference in Gaussian robustness (paper Eq. 6) between two complete
run folders, with a confidence interval that accounts for the finite test set: at each
noise level (the robustness curve) and for the area under the curve, plus the difference
in clean accuracy. Both runs must have been evaluated on the same test images at the
same noise levels, so the comparison is paired: each image's difference is resampled as
a unit (``scipy.stats.bootstrap`` with ``paired=True``), which gives a much narrower
interval than comparing two independent intervals. An interval that excludes 0 says the
test set resolves the difference; it says nothing about the spread over training seeds
(compare several seeds for that).

Run folders are read with :func:`experiments.rundir.read_results` and their
``per_image.npz`` (``correct`` ``(N,)``, ``robust`` ``(S, N)``)::

    python examples/compare_robustness_runs.py RUN_A RUN_B
    python examples/compare_robustness_runs.py \\
        docs/results/reduced-cpu/run_results/41a7d9f67b9b \\
        docs/results/reduced-cpu/run_results/70650c500e47

Each image's robustness is the area under its own 0/1 curve
(:func:`momentkit.robustness.area_under_curve`, computed on ``--device``), whose mean
over images is the run's ``auc``. ``--seed`` seeds the bootstrap.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from experiments.rundir import PER_IMAGE_FILE, read_results
from momentkit.robustness import area_under_curve


class RunMismatchError(ValueError):
    """The two runs cannot be compared image by image."""


def load_run(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(results, per_image)`` of a complete run folder.

    Raises:
        RunMismatchError: the folder holds no complete run.
    """
    results = read_results(path)
    if results is None:
        raise RunMismatchError(f"{path}: not a complete run (no results.json / per_image.npz)")
    with np.load(Path(path) / PER_IMAGE_FILE) as npz:
        per_image = {key: npz[key] for key in npz.files}
    return results, per_image


def paired_interval(
    a: np.ndarray, b: np.ndarray, seed: int, confidence: float = 0.95, n_resamples: int = 9999
) -> tuple[float, float, float]:
    """``mean(b) - mean(a)`` and its paired percentile bootstrap interval ``(low, high)``.

    When every pair has the same difference there is nothing to resample and the
    interval is that difference itself.
    """
    diff = b.astype(np.float64) - a.astype(np.float64)
    estimate = float(diff.mean())
    if np.all(diff == diff[0]):
        return estimate, estimate, estimate
    result = stats.bootstrap(
        (a.astype(np.float64), b.astype(np.float64)),
        lambda x, y, axis: np.mean(y, axis=axis) - np.mean(x, axis=axis),
        paired=True,
        vectorized=True,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return estimate, float(result.confidence_interval.low), float(result.confidence_interval.high)


def compare_runs(
    run_a: str | Path, run_b: str | Path, seed: int = 0, device: str = "cpu",
    n_resamples: int = 9999,
) -> dict[str, Any]:
    """Per-sigma, area and accuracy differences ``B - A`` with 95% paired intervals.

    Returns a dict with ``sigmas`` (list), ``curve`` (one ``(a, b, diff, low, high)``
    per sigma), ``auc`` and ``accuracy`` (each ``(a, b, diff, low, high)``),
    ``recorded_auc`` (the ``auc`` each ``results.json`` holds), ``n_images`` and
    ``runs`` (a one-line description of each).

    Raises:
        RunMismatchError: a folder is not a complete run, or the two runs were not
            evaluated on the same images at the same noise levels.
    """
    res_a, img_a = load_run(run_a)
    res_b, img_b = load_run(run_b)
    sigmas_a = np.asarray(res_a["robustness"]["sigmas"], dtype=np.float64)
    sigmas_b = np.asarray(res_b["robustness"]["sigmas"], dtype=np.float64)
    if sigmas_a.shape != sigmas_b.shape or not np.allclose(sigmas_a, sigmas_b):
        raise RunMismatchError("the runs were evaluated at different noise levels")
    same_set = all(
        res_a["config"].get(k) == res_b["config"].get(k) for k in ("dataset", "test_subset")
    )
    if not same_set or img_a["robust"].shape != img_b["robust"].shape:
        raise RunMismatchError(
            "the runs were evaluated on different test images (dataset, test_subset or "
            "number of images differ); a paired comparison needs the same images"
        )
    sigmas = torch.as_tensor(sigmas_a, device=device)
    areas = [
        area_under_curve(torch.as_tensor(img["robust"], device=device), sigmas).cpu().numpy()
        for img in (img_a, img_b)
    ]

    def row(a: np.ndarray, b: np.ndarray, k: int) -> tuple[float, ...]:
        diff, low, high = paired_interval(a, b, seed + k, n_resamples=n_resamples)
        return float(a.mean()), float(b.mean()), diff, low, high

    curve = [
        row(img_a["robust"][k], img_b["robust"][k], k) for k in range(len(sigmas_a))
    ]
    return {
        "sigmas": sigmas_a.tolist(),
        "curve": curve,
        "auc": row(areas[0], areas[1], len(sigmas_a)),
        "accuracy": row(img_a["correct"], img_b["correct"], len(sigmas_a) + 1),
        "recorded_auc": (res_a["robustness"]["auc"], res_b["robustness"]["auc"]),
        "n_images": int(img_a["robust"].shape[1]),
        "runs": (_describe(res_a), _describe(res_b)),
    }


def _describe(results: dict[str, Any]) -> str:
    c = results["config"]
    return f"{results.get('run_id', '?')}: {c.get('method')} sigma={c.get('sigma')} " + (
        f"alpha={c.get('alpha')} folds={c.get('folds')}"
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, print the comparison, return :func:`compare_runs`'s dict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", help="run folder A (the reference)")
    parser.add_argument("run_b", help="run folder B (reported as B - A)")
    parser.add_argument("--device", default="cpu", help="torch device of the per-image areas")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--resamples", type=int, default=9999, help="bootstrap resamples")
    args = parser.parse_args(argv)
    try:
        out = compare_runs(args.run_a, args.run_b, args.seed, args.device, args.resamples)
    except RunMismatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc

    print(f"A = {out['runs'][0]}")
    print(f"B = {out['runs'][1]}")
    print(f"{out['n_images']} test images; B - A with 95% paired bootstrap intervals")
    print(f"{'sigma':>8} {'A':>7} {'B':>7} {'B - A':>8}  95% interval")
    for s, (a, b, d, lo, hi) in zip(out["sigmas"], out["curve"], strict=True):
        print(f"{s:>8.3f} {a:>7.4f} {b:>7.4f} {d:>+8.4f}  [{lo:+.4f}, {hi:+.4f}]")
    for name in ("auc", "accuracy"):
        a, b, d, lo, hi = out[name]
        print(f"{name:>8} {a:>7.4f} {b:>7.4f} {d:>+8.4f}  [{lo:+.4f}, {hi:+.4f}]")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
