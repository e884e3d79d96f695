"""Synthetic run folders for the report tests, built from known per-image arrays.

A synthetic run has N test images: images ``0..n_correct-1`` are classified correctly, and
at test sigma k the images ``0..survivors[k]-1`` keep their prediction, so accuracy and
robustness are known by hand (:func:`r_by_hand`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from experiments import executors, rundir
from experiments.config import RunConfig
from experiments.report import RunRecord

EPS = np.finfo(np.float64).eps
SIGMAS = np.linspace(0.0, 0.5, 5)
N = 400  # test images of the synthetic runs

RUNS = {
    # name: (method, kwargs, n_correct, survivors per sigma)
    "baseline": ("baseline", {}, 360, [400, 380, 340, 300, 260]),
    "aug2": ("augment", {"folds": 2, "sigma": 0.25}, 360, [400, 390, 370, 350, 330]),
    "aug6": ("augment", {"folds": 6, "sigma": 0.5}, 352, [400] * 5),
    "mom1": ("moment", {"alpha": 1.0, "sigma": 0.5}, 361, [400, 398, 396, 394, 392]),
    "mom5": ("moment", {"alpha": 5.0, "sigma": 2.0}, 359, [400] * 5),
}


def trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Independent reference: the trapezoid rule written out."""
    return float(sum((x[k + 1] - x[k]) * (y[k] + y[k + 1]) / 2 for k in range(len(x) - 1)))


def r_by_hand(survivors: list[int]) -> float:
    """R of a synthetic run: trapezoid weights on 5 evenly spaced sigmas are
    [1/8, 1/4, 1/4, 1/4, 1/8]."""
    return (survivors[0] / 8 + sum(survivors[1:4]) / 4 + survivors[4] / 8) / N


def cfg(method: str, dataset: str = "mnist", **kw: object) -> RunConfig:
    return RunConfig(dataset=dataset, model="lenet", method=method, epochs=3, **kw)


def results_for(config: RunConfig, n_correct: int, survivors: list[int]) -> dict[str, Any]:
    """The ``results.json`` content of a synthetic run."""
    robust = np.arange(N)[None, :] < np.asarray(survivors)[:, None]
    curve = robust.mean(axis=1)
    return {
        "config": config.to_dict(),
        "run_id": config.run_id(),
        "test_accuracy": n_correct / N,
        "robustness": {
            "sigmas": SIGMAS.tolist(),
            "curve": curve.tolist(),
            "auc": trapezoid(curve, SIGMAS) / 0.5,
            "mean": float(curve.mean()),
            "ci": [0.0, 1.0],
        },
        "epochs_run": config.epochs,
        "best_epoch": config.epochs,
        "stopped_early": False,
        "wall_time_s": 10.0 * config.folds,
        "train_time_s": 8.0 * config.folds,
        "gradient_steps": 100 * config.folds * config.epochs,
        "device": "cpu",
        "version": "test",
    }


def write_run(
    root: Path,
    config: RunConfig,
    n_correct: int,
    survivors: list[int],
    *,
    degenerate: float | None = None,
) -> Path:
    """A complete synthetic run folder; ``degenerate`` = top-class fraction to flag."""
    rdir = executors.run_dir(root, config)
    correct = np.arange(N) < n_correct
    robust = np.arange(N)[None, :] < np.asarray(survivors)[:, None]
    rundir.write_npz_atomic(rdir / rundir.PER_IMAGE_FILE, correct=correct, robust=robust)
    results = results_for(config, n_correct, survivors)
    if degenerate is not None:
        results["degenerate_predictions"] = {"flagged": True, "top_class_fraction": degenerate}
    rundir.write_json_atomic(rdir / rundir.CONFIG_FILE, config.to_dict())
    rundir.write_json_atomic(rdir / rundir.RESULTS_FILE, results)
    return rdir


def write_failed(root: Path, config: RunConfig, kind: str, epoch: int | None, error: str) -> Path:
    """A failed run folder: ``config.json`` and ``error.json``, no results."""
    rdir = executors.run_dir(root, config)
    rundir.write_json_atomic(rdir / rundir.CONFIG_FILE, config.to_dict())
    rundir.write_json_atomic(
        rdir / rundir.ERROR_FILE, {"error": error, "kind": kind, "epoch": epoch}
    )
    return rdir


def write_nan_results(root: Path, config: RunConfig) -> Path:
    """A run folder as a diverged run used to leave it: bare ``NaN`` in results.json."""
    rdir = write_run(root, config, 40, [400] * 5)
    results = results_for(config, 40, [400] * 5)
    results["test_accuracy"] = float("nan")
    (rdir / rundir.RESULTS_FILE).write_text(json.dumps(results))
    return rdir


def synthetic_runs(root: Path) -> dict[str, RunConfig]:
    """Write the five :data:`RUNS` below ``root``; their configs by name."""
    configs = {}
    for name, (method, kw, n_correct, surv) in RUNS.items():
        configs[name] = cfg(method, **kw)
        write_run(root, configs[name], n_correct, surv)
    return configs


def record(
    run_id: str,
    method: str,
    accuracy: float,
    robustness: float,
    *,
    flagged: bool = False,
    dataset: str = "mnist",
) -> RunRecord:
    """A hand-built record (no files) for the comparison rule."""
    results: dict[str, Any] = {
        "test_accuracy": accuracy,
        "robustness": {"auc": robustness, "sigmas": SIGMAS.tolist()},
    }
    if flagged:
        results["degenerate_predictions"] = {"flagged": True, "top_class_fraction": 0.97}
    config = {"dataset": dataset, "model": "lenet", "method": method, "sigma": 0.5}
    config |= {"alpha": 1.0, "folds": 2}
    return RunRecord(run_id, Path(run_id), config, results)


def certificate_json(
    sigma: float,
    label: list[int],
    prediction: list[int],
    radius: list[float],
    *,
    index: list[int] | None = None,
    n: int = 10_000,
    alpha: float = 0.001,
    summary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``certify-sigma<S>.json`` content; its summary written out by hand (loops over
    images) unless ``summary`` is given."""
    index = list(range(len(label))) if index is None else index
    images = [
        {"index": i, "label": y, "prediction": p, "radius": r, "p_lower": 0.9, "correct": p == y}
        for i, y, p, r in zip(index, label, prediction, radius, strict=True)
    ]
    if summary is None:
        count = len(images)
        acc = {}
        for level in (0.0, 0.25, 0.5, 0.75, 1.0):
            hits = 0
            for im in images:
                if im["correct"] and im["radius"] >= level:
                    hits += 1
            acc[str(level)] = hits / count
        total = 0.0
        for im in images:
            total += im["radius"] if im["correct"] else 0.0
        summary = {
            "certified_accuracy": acc,
            "acr": total / count,
            "abstain_rate": sum(im["prediction"] == -1 for im in images) / count,
            "n_images": count,
        }
    settings = {"sigma": sigma, "n0": 100, "n": n, "alpha": alpha, "seed": 0, "version": "t"}
    return {**settings, "images": images, "summary": summary}


def write_certificates(rdir: Path, sigma: float, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Write :func:`certificate_json` into ``rdir`` as the certify command names it."""
    obj = certificate_json(sigma, *args, **kwargs)
    rundir.write_json_atomic(rdir / rundir.certify_file(sigma), obj)
    return obj
