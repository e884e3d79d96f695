"""Loading run folders into records, and the flat table of runs (``results.csv``).

Every file of a run folder is read through :mod:`experiments.rundir`. Below a results
directory, each folder holding a ``results.json`` or an ``error.json`` is a run folder, and
it becomes one of:

* a :class:`RunRecord`: the run is complete (:func:`experiments.rundir.read_results`) and
  its accuracy and robustness are finite numbers;
* a :class:`LeftOutRun`: the run failed or diverged (an ``error.json`` and no complete
  results), or its results hold a non-finite accuracy or robustness. Left-out runs are in
  no table and no comparison; the report lists them with the reason.

A folder with neither complete results nor an ``error.json`` (a run still in progress, a
half-copied folder) is skipped with a warning.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from experiments import rundir
from experiments.config import METHODS
from experiments.report.certificates import CERTIFIED_RADII, Certificate, load_certificates

__all__ = [
    "CERTIFIED_COLUMNS",
    "LeftOutRun",
    "RunRecord",
    "TABLE_COLUMNS",
    "certified_row",
    "collect_results",
    "collect_runs",
    "method_order",
    "results_table",
    "write_csv",
]


def method_order(method: str) -> int:
    """Sort key of a method: its position in :data:`experiments.config.METHODS`."""
    return METHODS.index(method) if method in METHODS else len(METHODS)


def surrogate_of(config: Mapping[str, Any]) -> str:
    """The moments a regularizer run was trained with: ``"network"`` (the output mean of
    ``network_moments``) or ``"first_relu"`` (the paper's surrogate, the default)."""
    return str(config.get("moments") or "first_relu")


def run_label(config: Mapping[str, Any]) -> str:
    """Short human name of a run's method and hyper-parameters, e.g. ``augment N~=6 sigma=0.5``."""
    method = config.get("method")
    sigma = float(config.get("sigma") or 0)
    if method == "augment":
        return f"augment N~={config.get('folds')} sigma={sigma:g}"
    if method == "moment":
        surrogate = " network" if surrogate_of(config) == "network" else ""
        return f"moment{surrogate} alpha={float(config.get('alpha') or 0):g} sigma={sigma:g}"
    if method == "gaussian":
        return f"gaussian sigma={sigma:g}"
    return str(method)


@dataclass(frozen=True)
class RunRecord:
    """One complete run: its folder, config, ``results.json`` content and its
    randomized-smoothing certificates (one per certification sigma, sorted by sigma; empty
    when the run was not certified)."""

    run_id: str
    path: Path
    config: dict[str, Any]
    results: dict[str, Any]
    certificates: tuple[Certificate, ...] = field(default=(), compare=False)

    @property
    def method(self) -> str:
        return str(self.config["method"])

    @property
    def accuracy(self) -> float:
        return float(self.results["test_accuracy"])

    @property
    def robustness(self) -> float:
        return float(self.results["robustness"]["auc"])

    @property
    def sigmas(self) -> np.ndarray:
        return np.asarray(self.results["robustness"]["sigmas"], dtype=np.float64)

    @property
    def degenerate(self) -> bool:
        """True when the run's results flag (nearly) constant test predictions.

        Eq. 6 scores a constant classifier as perfectly robust, so such a run is marked in
        every table and never chosen by the fair comparison.
        """
        flag = self.results.get("degenerate_predictions")
        return bool(isinstance(flag, Mapping) and flag.get("flagged"))

    @property
    def top_class_fraction(self) -> float | None:
        """Fraction of test predictions in the most frequent class (``None`` if not recorded)."""
        flag = self.results.get("degenerate_predictions")
        value = flag.get("top_class_fraction") if isinstance(flag, Mapping) else None
        return float(value) if value is not None else None

    def label(self) -> str:
        return run_label(self.config)

    def certificate(self, sigma: float) -> Certificate | None:
        """The certificates at certification noise ``sigma`` (``None`` when there are none)."""
        return next((c for c in self.certificates if c.sigma == float(sigma)), None)

    def per_image(self) -> tuple[np.ndarray, np.ndarray]:
        """``correct`` (n_test,) bool and ``robust`` (n_sigmas, n_test) bool from per_image.npz."""
        with np.load(self.path / rundir.PER_IMAGE_FILE) as z:
            correct = np.asarray(z["correct"], dtype=bool)
            robust = np.asarray(z["robust"], dtype=bool)
        if robust.ndim != 2 or robust.shape[1] != correct.shape[0]:
            raise ValueError(
                f"{self.path}/{rundir.PER_IMAGE_FILE}: robust has shape {robust.shape}, "
                f"expected (n_sigmas, {correct.shape[0]})"
            )
        return correct, robust


@dataclass(frozen=True)
class LeftOutRun:
    """A run folder left out of the report: a failed or diverged run, or invalid results.

    ``kind`` is the ``error.json`` kind (``"diverged"``, ``"exception"``) or
    ``"invalid results"``; ``epoch`` the epoch it stopped in (``None`` when unknown).
    """

    run_id: str
    path: Path
    label: str
    kind: str
    epoch: int | None
    error: str


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _record_or_reason(rdir: Path, res: dict[str, Any]) -> RunRecord | str:
    """The record of complete results, or why they cannot be used."""
    config, rob = res.get("config"), res.get("robustness")
    if not isinstance(config, dict) or "method" not in config:
        return "results.json has no config with a method"
    if not isinstance(rob, dict) or "auc" not in rob or "sigmas" not in rob:
        return "results.json has no robustness auc and sigmas"
    if not (_finite(res["test_accuracy"]) and _finite(rob["auc"])):
        return (
            f"non-finite results: test accuracy {res['test_accuracy']!r}, "
            f"robustness {rob['auc']!r}"
        )
    rid = str(res.get("run_id") or rdir.name)
    return RunRecord(rid, rdir, dict(config), res, load_certificates(rdir))


def _left_out(
    rdir: Path, kind: str, epoch: Any, error: str, run_id: Any = None
) -> LeftOutRun:
    config = rundir.read_json(rdir / rundir.CONFIG_FILE) or {}
    return LeftOutRun(
        run_id=str(run_id or rdir.name),
        path=rdir,
        label=run_label(config) if "method" in config else "?",
        kind=kind,
        epoch=int(epoch) if isinstance(epoch, int | float) and _finite(epoch) else None,
        error=" ".join(str(error).split()),
    )


def collect_runs(results_dir: str | Path) -> tuple[list[RunRecord], list[LeftOutRun]]:
    """The complete runs below ``results_dir`` (any depth, one per run id) and the left-out ones.

    See the module docstring for which folder becomes which. Of two complete folders with
    the same run id, the first in path order is kept; a left-out folder whose run id (from
    its ``error.json``, else the folder name) is complete elsewhere is dropped.

    Raises:
        FileNotFoundError: ``results_dir`` does not exist.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"results directory {root} does not exist")
    folders = sorted(
        {p.parent for name in (rundir.RESULTS_FILE, rundir.ERROR_FILE) for p in root.rglob(name)}
    )
    records: dict[str, RunRecord] = {}
    left_out: list[LeftOutRun] = []
    for rdir in folders:
        res = rundir.read_results(rdir)
        err = rundir.read_error(rdir)
        if res is not None:
            got = _record_or_reason(rdir, res)
            if isinstance(got, RunRecord):
                records.setdefault(got.run_id, got)
            else:
                left_out.append(_left_out(rdir, "invalid results", None, got, res.get("run_id")))
        elif err is not None:
            left_out.append(
                _left_out(
                    rdir,
                    str(err.get("kind") or "exception"),
                    err.get("epoch"),
                    str(err.get("error", "")),
                    err.get("run_id"),
                )
            )
        else:
            warnings.warn(
                f"skipping {rdir}: incomplete or unreadable results (no complete "
                f"{rundir.RESULTS_FILE} with {rundir.PER_IMAGE_FILE}, no {rundir.ERROR_FILE})",
                stacklevel=2,
            )
    # a run id complete in another folder (an exported copy, a retry) is not left out
    return list(records.values()), [r for r in left_out if r.run_id not in records]


def collect_results(results_dir: str | Path) -> list[RunRecord]:
    """The complete runs below ``results_dir``: :func:`collect_runs` without the left-out ones."""
    return collect_runs(results_dir)[0]


_CONFIG_COLUMNS = ("dataset", "model", "method", "sigma", "alpha", "folds", "epochs", "seed")
_CONFIG_COLUMNS += ("train_subset", "test_subset")
_RESULT_COLUMNS = ("epochs_run", "best_epoch", "stopped_early", "wall_time_s", "train_time_s")
_RESULT_COLUMNS += ("gradient_steps", "device", "version")
_ROBUSTNESS_COLUMNS = ("robustness_auc", "robustness_mean", "robustness_ci_low")
_ROBUSTNESS_COLUMNS += ("robustness_ci_high",)
_FLAG_COLUMNS = ("degenerate_predictions", "top_class_fraction")
CERTIFIED_COLUMNS = ("certify_sigma", "certify_n0", "certify_n", "certify_alpha")
CERTIFIED_COLUMNS += ("certified_images",)
CERTIFIED_COLUMNS += tuple(f"certified_accuracy_r{r:g}" for r in CERTIFIED_RADII)
CERTIFIED_COLUMNS += ("acr", "abstain_rate")
"""Certificate columns of :func:`results_table`: the certification sigma, ``n0``, ``n`` and
``alpha``, the number of certified images, the certified accuracy at each radius of
:data:`~experiments.report.certificates.CERTIFIED_RADII`, the ACR and the abstention rate,
all recomputed from the per-image certificates."""
TABLE_COLUMNS = (
    ("run_id",)
    + _CONFIG_COLUMNS
    + ("test_accuracy",)
    + _ROBUSTNESS_COLUMNS
    + _FLAG_COLUMNS
    + _RESULT_COLUMNS
    + CERTIFIED_COLUMNS
)
"""Columns of :func:`results_table` and ``results.csv``."""


def certified_row(cert: Certificate | None) -> dict[str, Any]:
    """The :data:`CERTIFIED_COLUMNS` of one certificate (all ``None`` for ``None``)."""
    if cert is None:
        return dict.fromkeys(CERTIFIED_COLUMNS)
    values = (cert.sigma, cert.n0, cert.n, cert.alpha, cert.n_images)
    values += tuple(float(a) for a in cert.curve(CERTIFIED_RADII))
    values += (cert.acr, cert.abstain_rate)
    return dict(zip(CERTIFIED_COLUMNS, values, strict=True))


def results_table(records: Iterable[RunRecord]) -> list[dict[str, Any]]:
    """One row (a dict over :data:`TABLE_COLUMNS`) per run and certification sigma, sorted
    by setting, method, sigma, run id and certification sigma.

    A run without certificates has one row, its :data:`CERTIFIED_COLUMNS` ``None``; a run
    certified at k sigmas has k rows, equal but for those columns.
    ``degenerate_predictions`` is True for a run whose results flag (nearly) constant
    predictions (:attr:`RunRecord.degenerate`).
    """
    rows = []
    for r in records:
        rob = r.results["robustness"]
        ci = rob.get("ci") or [None, None]
        robustness = (rob["auc"], rob.get("mean"), ci[0], ci[1])
        row = {
            "run_id": r.run_id,
            **{k: r.config.get(k) for k in _CONFIG_COLUMNS},
            "test_accuracy": r.results["test_accuracy"],
            **dict(zip(_ROBUSTNESS_COLUMNS, robustness, strict=True)),
            "degenerate_predictions": r.degenerate,
            "top_class_fraction": r.top_class_fraction,
            **{k: r.results.get(k) for k in _RESULT_COLUMNS},
        }
        rows += [row | certified_row(c) for c in r.certificates or (None,)]

    def order(row: Mapping[str, Any]) -> tuple:
        return (
            str(row["dataset"]),
            str(row["model"]),
            int(row["epochs"] or 0),
            method_order(str(row["method"])),
            float(row["alpha"] or 0) + float(row["folds"] or 0),
            float(row["sigma"] or 0),
            str(row["run_id"]),
            float(row["certify_sigma"] or 0),
        )

    return sorted(rows, key=order)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path, header: Sequence[str]) -> None:
    """CSV with ``# ``-prefixed header lines (read with ``pandas.read_csv(comment='#')``).

    Written atomically (:func:`experiments.rundir.write_text_atomic`).
    """
    buffer = io.StringIO(newline="")
    for line in header:
        buffer.write(f"# {line}\n")
    writer = csv.DictWriter(
        buffer, fieldnames=list(TABLE_COLUMNS), extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(rows)
    rundir.write_text_atomic(path, buffer.getvalue())
