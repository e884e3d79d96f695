"""Collect a grid's results and compare the training methods fairly, with uncertainty.

``python -m experiments report RESULTS_DIR`` reads every ``results.json`` (and its
``per_image.npz``) below ``RESULTS_DIR`` and writes into ``--out`` (default
``RESULTS_DIR/report``): ``results.csv`` (one row per run), PNG figures and ``report.md``.

**Settings.** Runs are compared only with runs of the same *setting*: data set, model, train
and test subsets, evaluation settings, batch size, learning rate, seed and epoch cap. Each
setting is reported separately.

**Robustness** (Eq. 6) of a model is ``R = trapz(curve, sigmas) / (sigmas[-1] - sigmas[0])``
where ``curve[k]`` is the fraction of test images whose prediction is unchanged under noise
``sigmas[k]``. Since ``curve[k] = mean_i robust[k, i]``, ``R = mean_i r_i`` with the per-image
score ``r_i = sum_k w_k robust[k, i]`` and trapezoid weights ``w`` (:func:`trapezoid_weights`),
so R and accuracy are both means over test images.

**Fair comparison** (Figures 4 and 5). The reference is the baseline run of the setting (the
most accurate one if there are several). A run *qualifies* when its clean test accuracy is at
least ``acc_baseline - tolerance`` (defaults :data:`DEFAULT_TOLERANCE`: 0 for MNIST, 0.39
points for CIFAR-10, 0.75 for CIFAR-100, as in the paper). Among qualifying runs the one with
the highest R is each method's best (ties: higher accuracy, then run id). The factor is
``R(best moment) / R(best augment)``.

**Paired bootstrap.** Two models evaluated on the same test images are compared by resampling
image indices with replacement (the same indices for both models), ``n_boot`` times, and taking
percentile intervals of the accuracy difference, the robustness difference and the robustness
ratio (:func:`paired_bootstrap`). For a difference of means this interval approaches
``d +- z * sd(d_i) / sqrt(n)``; the ratio interval carries the uncertainty of a claim such as
"twice as robust". It conditions on the trained models (it does not cover seed-to-seed
variation of training).

**Training cost and matched compute.** The cost table gives wall time, training time, epochs
and gradient steps per method. Runs that a grid declared compute-matched (``matched`` in a
grid file, stored in ``RESULTS_DIR/grids/*.json``) are compared pairwise with paired intervals,
and a figure shows R against training time and against gradient steps for every run.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_TOLERANCE",
    "Interval",
    "RunRecord",
    "FairComparison",
    "collect_results",
    "results_table",
    "write_csv",
    "trapezoid_weights",
    "per_image_robustness",
    "paired_bootstrap",
    "setting_key",
    "group_by_setting",
    "fair_comparison",
    "cost_table",
    "matched_pairs",
    "write_report",
]

#: Accuracy tolerance of the fair comparison, as a fraction (0.0039 = 0.39 points).
DEFAULT_TOLERANCE: dict[str, float] = {
    "mnist": 0.0,
    "fashion-mnist": 0.0,
    "cifar10": 0.0039,
    "cifar100": 0.0075,
}
METHODS = ("baseline", "augment", "moment")
_SETTING_FIELDS = (
    "dataset",
    "model",
    "train_subset",
    "test_subset",
    "eval_sigmas",
    "eval_samples",
    "batch_size",
    "lr",
    "seed",
    "epochs",
)


def _version() -> str:
    try:
        from momentkit import __version__

        return str(__version__)
    except ImportError:
        from importlib.metadata import version

        return version("momentkit")


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RunRecord:
    """One finished run: its folder, config and ``results.json`` content."""

    run_id: str
    path: Path
    config: dict[str, Any]
    results: dict[str, Any]

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

    def label(self) -> str:
        c = self.config
        if c["method"] == "augment":
            return f"augment N~={c['folds']} sigma={c['sigma']:g}"
        if c["method"] == "moment":
            return f"moment alpha={c['alpha']:g} sigma={c['sigma']:g}"
        return "baseline"

    def per_image(self) -> tuple[np.ndarray, np.ndarray]:
        """``correct`` (n_test,) bool and ``robust`` (n_sigmas, n_test) bool from per_image.npz."""
        with np.load(self.path / "per_image.npz") as z:
            correct = np.asarray(z["correct"], dtype=bool)
            robust = np.asarray(z["robust"], dtype=bool)
        if robust.ndim != 2 or robust.shape[1] != correct.shape[0]:
            raise ValueError(
                f"{self.path}/per_image.npz: robust has shape {robust.shape}, expected "
                f"(n_sigmas, {correct.shape[0]})"
            )
        return correct, robust


def collect_results(results_dir: str | Path) -> list[RunRecord]:
    """Every complete ``results.json`` below ``results_dir`` (any depth), one per run id.

    Incomplete or unreadable result files are skipped with a warning.

    Raises:
        FileNotFoundError: ``results_dir`` does not exist.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"results directory {root} does not exist")
    records: dict[str, RunRecord] = {}
    for path in sorted(root.rglob("results.json")):
        try:
            res = json.loads(path.read_text())
            cfg = dict(res["config"])
            res["test_accuracy"], res["robustness"]["auc"]  # noqa: B018 - presence check
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warnings.warn(f"skipping {path}: incomplete or unreadable ({exc!r})", stacklevel=2)
            continue
        if not (path.parent / "per_image.npz").is_file():
            warnings.warn(f"skipping {path}: no per_image.npz beside it", stacklevel=2)
            continue
        rid = str(res.get("run_id") or path.parent.name)
        records.setdefault(rid, RunRecord(rid, path.parent, cfg, res))
    return list(records.values())


_CONFIG_COLUMNS = ("dataset", "model", "method", "sigma", "alpha", "folds", "epochs", "seed")
_CONFIG_COLUMNS += ("train_subset", "test_subset")
_RESULT_COLUMNS = ("epochs_run", "best_epoch", "stopped_early", "wall_time_s", "train_time_s")
_RESULT_COLUMNS += ("gradient_steps", "device", "version")
_ROBUSTNESS_COLUMNS = ("robustness_auc", "robustness_mean", "robustness_ci_low")
_ROBUSTNESS_COLUMNS += ("robustness_ci_high",)
TABLE_COLUMNS = (
    ("run_id",) + _CONFIG_COLUMNS + ("test_accuracy",) + _ROBUSTNESS_COLUMNS + _RESULT_COLUMNS
)


def results_table(records: Iterable[RunRecord]) -> list[dict[str, Any]]:
    """One row (a dict over :data:`TABLE_COLUMNS`) per run, sorted by setting, method, sigma."""
    rows = []
    for r in records:
        rob = r.results["robustness"]
        ci = rob.get("ci") or [None, None]
        robustness = (rob["auc"], rob.get("mean"), ci[0], ci[1])
        rows.append(
            {
                "run_id": r.run_id,
                **{k: r.config.get(k) for k in _CONFIG_COLUMNS},
                "test_accuracy": r.results["test_accuracy"],
                **dict(zip(_ROBUSTNESS_COLUMNS, robustness, strict=True)),
                **{k: r.results.get(k) for k in _RESULT_COLUMNS},
            }
        )

    def order(row: Mapping[str, Any]) -> tuple:
        return (
            str(row["dataset"]),
            str(row["model"]),
            int(row["epochs"] or 0),
            METHODS.index(row["method"]) if row["method"] in METHODS else 9,
            float(row["alpha"] or 0) + float(row["folds"] or 0),
            float(row["sigma"] or 0),
            str(row["run_id"]),
        )

    return sorted(rows, key=order)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path, header: Sequence[str]) -> None:
    """CSV with ``# ``-prefixed header lines (read with ``pandas.read_csv(comment='#')``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        for line in header:
            fh.write(f"# {line}\n")
        writer = csv.DictWriter(fh, fieldnames=list(TABLE_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------------------- statistics


def trapezoid_weights(sigmas: np.ndarray) -> np.ndarray:
    """``w`` with ``w @ curve == trapz(curve, sigmas) / (sigmas[-1] - sigmas[0])``.

    Raises:
        ValueError: fewer than two sigmas or a zero-width range.
    """
    s = np.asarray(sigmas, dtype=np.float64)
    if s.ndim != 1 or s.size < 2 or s[-1] == s[0]:
        raise ValueError(f"sigmas must be a 1-d range of at least 2 distinct values, got {s}")
    d = np.diff(s)
    w = np.zeros_like(s)
    w[:-1] += d / 2
    w[1:] += d / 2
    return w / (s[-1] - s[0])


def per_image_robustness(robust: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Per-image score ``r_i = sum_k w_k robust[k, i]``; its mean over images is R (Eq. 6)."""
    return trapezoid_weights(sigmas) @ np.asarray(robust, dtype=np.float64)


@dataclass(frozen=True)
class Interval:
    """A point estimate and a percentile-bootstrap confidence interval."""

    estimate: float
    low: float
    high: float
    level: float

    def fmt(self, digits: int = 4, pct: bool = False) -> str:
        k = 100.0 if pct else 1.0
        e, lo, hi = k * self.estimate, k * self.low, k * self.high
        return f"{e:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

    def excludes(self, value: float) -> bool:
        return not (self.low <= value <= self.high)


def paired_bootstrap(
    correct_a: np.ndarray,
    score_a: np.ndarray,
    correct_b: np.ndarray,
    score_b: np.ndarray,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    chunk: int = 250,
) -> dict[str, Interval]:
    """Paired percentile bootstrap over test images for models ``a`` and ``b``.

    Args:
        correct_a, correct_b: (n,) clean correctness of each model on the same n images.
        score_a, score_b: (n,) per-image robustness scores (:func:`per_image_robustness`).
        n_boot: bootstrap resamples; the Monte Carlo error of an interval end is of order
            ``sd / sqrt(n * n_boot)`` of the statistic's scale.
        level: two-sided confidence level.
        seed: seed of the numpy generator that draws the resampling counts.

    Returns:
        Intervals for ``accuracy_a``, ``accuracy_b``, ``accuracy_diff`` (a - b),
        ``robustness_a``, ``robustness_b``, ``robustness_diff`` (a - b) and
        ``robustness_ratio`` (a / b; nan where R_b = 0 in a resample).

    Raises:
        ValueError: arrays of different or zero length, ``n_boot < 10``, level outside (0, 1).
    """
    arrays = [np.asarray(x, dtype=np.float64) for x in (correct_a, score_a, correct_b, score_b)]
    n = arrays[0].shape[0]
    if n == 0 or any(x.shape != (n,) for x in arrays):
        raise ValueError(
            f"paired_bootstrap needs four (n,) arrays, got {[x.shape for x in arrays]}"
        )
    if n_boot < 10:
        raise ValueError(f"n_boot must be >= 10, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    data = np.stack(arrays)  # (4, n)
    rng = np.random.default_rng(seed)
    means = np.empty((n_boot, 4))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=b)  # (b, n) resample counts
        means[start : start + b] = counts @ data.T / n
    full = data.mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(means[:, 3] > 0, means[:, 1] / means[:, 3], np.nan)
    stats = {
        "accuracy_a": (full[0], means[:, 0]),
        "accuracy_b": (full[2], means[:, 2]),
        "accuracy_diff": (full[0] - full[2], means[:, 0] - means[:, 2]),
        "robustness_a": (full[1], means[:, 1]),
        "robustness_b": (full[3], means[:, 3]),
        "robustness_diff": (full[1] - full[3], means[:, 1] - means[:, 3]),
        "robustness_ratio": (full[1] / full[3] if full[3] > 0 else math.nan, ratio),
    }
    q = [(1 - level) / 2, (1 + level) / 2]
    out = {}
    for name, (est, samples) in stats.items():
        finite = samples[np.isfinite(samples)]
        lo, hi = np.quantile(finite, q) if finite.size else (math.nan, math.nan)
        out[name] = Interval(float(est), float(lo), float(hi), level)
    return out


def compare_records(
    a: RunRecord, b: RunRecord, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, Interval]:
    """:func:`paired_bootstrap` of two finished runs from their ``per_image.npz``.

    Raises:
        ValueError: the runs were not evaluated on the same test images and sigmas.
    """
    ca, ra = a.per_image()
    cb, rb = b.per_image()
    if ca.shape != cb.shape or not np.array_equal(a.sigmas, b.sigmas):
        raise ValueError(
            f"runs {a.run_id} and {b.run_id} were not evaluated on the same test images/sigmas"
        )
    return paired_bootstrap(
        ca,
        per_image_robustness(ra, a.sigmas),
        cb,
        per_image_robustness(rb, b.sigmas),
        n_boot=n_boot,
        level=level,
        seed=seed,
    )


# --------------------------------------------------------------------------- comparisons


def setting_key(config: Mapping[str, Any], *, with_epochs: bool = True) -> tuple:
    """The fields that must agree for two runs to be compared (see module docstring)."""
    fields = _SETTING_FIELDS if with_epochs else _SETTING_FIELDS[:-1]
    return tuple((f, config.get(f)) for f in fields)


def group_by_setting(
    records: Iterable[RunRecord], *, with_epochs: bool = True
) -> dict[tuple, list[RunRecord]]:
    groups: dict[tuple, list[RunRecord]] = {}
    for r in records:
        groups.setdefault(setting_key(r.config, with_epochs=with_epochs), []).append(r)
    return groups


def _best(records: Iterable[RunRecord]) -> RunRecord | None:
    ranked = sorted(records, key=lambda r: (-r.robustness, -r.accuracy, r.run_id))
    return ranked[0] if ranked else None


@dataclass
class FairComparison:
    """The fair comparison of one setting (Figures 4 and 5 of the paper)."""

    setting: dict[str, Any]
    baseline: RunRecord
    tolerance: float
    threshold: float
    qualifying: dict[str, list[RunRecord]]
    best: dict[str, RunRecord | None]
    comparisons: dict[str, dict[str, Interval]] = field(default_factory=dict)

    @property
    def factor(self) -> float:
        """R(best moment) / R(best augment); nan when either method has no qualifying run."""
        m, a = self.best.get("moment"), self.best.get("augment")
        if m is None or a is None or a.robustness == 0:
            return math.nan
        return m.robustness / a.robustness


def fair_comparison(
    records: Sequence[RunRecord],
    *,
    tolerance: float | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> FairComparison | None:
    """Fair comparison of one setting's runs; None when the setting has no baseline run.

    ``tolerance`` (a fraction) defaults to :data:`DEFAULT_TOLERANCE` of the data set.
    The comparisons are keyed ``"moment vs augment"``, ``"moment vs baseline"`` and
    ``"augment vs baseline"`` (only those whose runs exist).
    """
    baselines = [r for r in records if r.method == "baseline"]
    if not baselines:
        return None
    baseline = max(baselines, key=lambda r: (r.accuracy, r.run_id))
    if tolerance is None:
        tolerance = DEFAULT_TOLERANCE.get(str(baseline.config["dataset"]), 0.0)
    # a hair of slack so that an accuracy equal to the threshold in decimal still qualifies
    threshold = baseline.accuracy - tolerance - 1e-12
    qualifying = {
        m: [r for r in records if r.method == m and r.accuracy >= threshold]
        for m in ("augment", "moment")
    }
    best = {m: _best(qualifying[m]) for m in qualifying}
    fc = FairComparison(
        setting=dict(setting_key(baseline.config)),
        baseline=baseline,
        tolerance=tolerance,
        threshold=baseline.accuracy - tolerance,
        qualifying=qualifying,
        best=best,
    )
    pairs = [
        ("moment vs augment", best["moment"], best["augment"]),
        ("moment vs baseline", best["moment"], baseline),
        ("augment vs baseline", best["augment"], baseline),
    ]
    for name, a, b in pairs:
        if a is not None and b is not None:
            fc.comparisons[name] = compare_records(a, b, n_boot=n_boot, level=level, seed=seed)
    return fc


def cost_table(records: Iterable[RunRecord]) -> list[dict[str, Any]]:
    """Per method: number of runs and the median wall time, training time, epochs, steps."""
    by_method: dict[str, list[RunRecord]] = {}
    for r in records:
        by_method.setdefault(r.method, []).append(r)
    rows = []
    for method in sorted(by_method, key=lambda m: METHODS.index(m) if m in METHODS else 9):
        rs = by_method[method]

        def med(key: str, rs: list[RunRecord] = rs) -> float:
            vals = [float(r.results[key]) for r in rs if r.results.get(key) is not None]
            return statistics.median(vals) if vals else math.nan

        rows.append(
            {
                "method": method,
                "runs": len(rs),
                "wall_time_s": med("wall_time_s"),
                "train_time_s": med("train_time_s"),
                "epochs_run": med("epochs_run"),
                "gradient_steps": med("gradient_steps"),
                "total_wall_time_s": sum(float(r.results.get("wall_time_s") or 0) for r in rs),
            }
        )
    return rows


def read_matched(results_dir: str | Path) -> list[dict[str, Any]]:
    """The matched-compute pairs declared by the grid manifests below ``results_dir``."""
    pairs: list[dict[str, Any]] = []
    for manifest in sorted(Path(results_dir).rglob("grids/*.json")):
        try:
            pairs += list(json.loads(manifest.read_text()).get("matched", []))
        except (OSError, ValueError) as exc:
            warnings.warn(f"skipping manifest {manifest}: {exc!r}", stacklevel=2)
    return pairs


def matched_pairs(
    records: Sequence[RunRecord],
    declared: Sequence[Mapping[str, Any]],
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> list[tuple[RunRecord, RunRecord, Mapping[str, Any], dict[str, Interval]]]:
    """(run, reference, declaration, paired intervals) for each declared pair with results."""
    by_id = {r.run_id: r for r in records}
    out = []
    seen = set()
    for d in declared:
        key = (d["run_id"], d["reference_run_id"])
        a, b = by_id.get(key[0]), by_id.get(key[1])
        if a is None or b is None or key in seen:
            continue
        seen.add(key)
        out.append((a, b, d, compare_records(a, b, n_boot=n_boot, level=level, seed=seed)))
    return out


# --------------------------------------------------------------------------- figures

_COLORS = {"baseline": "black", "augment": "tab:blue", "moment": "tab:red"}


def _slug(setting: Mapping[str, Any]) -> str:
    parts = [str(setting["model"]), str(setting["dataset"])]
    if setting.get("train_subset"):
        parts.append(f"n{setting['train_subset']}")
    if setting.get("epochs") is not None:
        parts.append(f"e{setting['epochs']}")
    parts.append(f"s{setting.get('seed', 0)}")
    return "-".join(parts)


def _shade(cmap_name: str, i: int, n: int) -> Any:
    from matplotlib import colormaps

    return colormaps[cmap_name](0.45 + 0.55 * (i + 1) / max(n, 1))


def plot_accuracy_robustness(records: Sequence[RunRecord], path: Path, title: str) -> Path:
    """Figure 3: clean accuracy and robustness R against training sigma, one line per
    augmentation level / regularizer alpha; the baseline as a dashed horizontal line."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    lines: dict[tuple[str, float], list[RunRecord]] = {}
    for r in records:
        if r.method == "augment":
            lines.setdefault(("augment", float(r.config["folds"])), []).append(r)
        elif r.method == "moment":
            lines.setdefault(("moment", float(r.config["alpha"])), []).append(r)
    aug_keys = sorted(k for k in lines if k[0] == "augment")
    mom_keys = sorted(k for k in lines if k[0] == "moment")
    for ax, attr, ylabel in (
        (axes[0], "accuracy", "clean test accuracy"),
        (axes[1], "robustness", "robustness R (Eq. 6)"),
    ):
        for keys, cmap, marker, name in (
            (aug_keys, "Blues", "o", "augment N~"),
            (mom_keys, "Reds", "s", "moment alpha"),
        ):
            for i, key in enumerate(keys):
                rs = sorted(lines[key], key=lambda r: float(r.config["sigma"]))
                ax.plot(
                    [float(r.config["sigma"]) for r in rs],
                    [getattr(r, attr) for r in rs],
                    marker=marker,
                    color=_shade(cmap, i, len(keys)),
                    label=f"{name}={key[1]:g}",
                )
        for r in records:
            if r.method == "baseline":
                ax.axhline(getattr(r, attr), color="black", ls="--", lw=1, label="baseline")
        ax.set_xscale("log")
        train_sigmas = sorted({float(r.config["sigma"]) for r in records if r.method != "baseline"})
        if train_sigmas:
            ax.set_xticks(train_sigmas, [f"{s:g}" for s in train_sigmas])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training sigma_x")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path


def plot_fair(fc: FairComparison, path: Path, title: str) -> Path:
    """Figures 4/5: robustness curves of the baseline and each method's best qualifying run,
    and their R with 95% bootstrap intervals."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_curve, ax_bar = fig.subplots(1, 2)
    entries = [("baseline", fc.baseline)] + [(m, fc.best[m]) for m in ("augment", "moment")]
    names, values, errs, colors = [], [], [[], []], []
    for method, rec in entries:
        if rec is None:
            continue
        ax_curve.plot(
            rec.sigmas,
            rec.results["robustness"]["curve"],
            color=_COLORS[method],
            label=f"{rec.label()} (acc {rec.accuracy:.4f}, R {rec.robustness:.3f})",
        )
        ci = _single_ci(fc, method)
        names.append(method if method == "baseline" else rec.label().replace(" sigma", "\nsigma"))
        values.append(rec.robustness)
        errs[0].append(rec.robustness - ci.low if ci else 0.0)
        errs[1].append(ci.high - rec.robustness if ci else 0.0)
        colors.append(_COLORS[method])
    ax_curve.set_xlabel("test noise sigma")
    ax_curve.set_ylabel("fraction of predictions unchanged")
    ax_curve.legend(fontsize=7)
    ax_curve.grid(alpha=0.3)
    ax_bar.bar(range(len(values)), values, yerr=errs, color=colors, capsize=6)
    ax_bar.set_xticks(range(len(values)), names, fontsize=7)
    ax_bar.set_ylabel("robustness R, 95% paired-bootstrap CI")
    ax_bar.set_ylim(0, 1.05)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path


def _single_ci(fc: FairComparison, method: str) -> Interval | None:
    for name, ivs in fc.comparisons.items():
        a, _, b = name.split(" ")
        if a == method:
            return ivs["robustness_a"]
        if b == method:
            return ivs["robustness_b"]
    return None


def plot_compute(
    records: Sequence[RunRecord], threshold: float | None, path: Path, title: str
) -> Path:
    """Robustness R against training time and against gradient steps, per method; hollow
    markers: runs below the fair-comparison accuracy threshold."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, xlabel in (
        (axes[0], "train_time_s", "training time (s)"),
        (axes[1], "gradient_steps", "gradient steps"),
    ):
        for method in METHODS:
            rs = [r for r in records if r.method == method and r.results.get(key)]
            ok = [r for r in rs if threshold is None or r.accuracy >= threshold - 1e-12]
            bad = [r for r in rs if r not in ok]
            ax.scatter(
                [r.results[key] for r in ok],
                [r.robustness for r in ok],
                color=_COLORS[method],
                label=method,
            )
            ax.scatter(
                [r.results[key] for r in bad],
                [r.robustness for r in bad],
                facecolors="none",
                edgecolors=_COLORS[method],
                label=f"{method} (below accuracy threshold)" if bad else None,
            )
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("robustness R")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path


# --------------------------------------------------------------------------- markdown


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _run_row(r: RunRecord) -> list[Any]:
    res = r.results
    return [
        r.label(),
        f"{r.accuracy:.4f}",
        f"{r.robustness:.4f}",
        res.get("epochs_run"),
        res.get("gradient_steps"),
        f"{float(res.get('train_time_s') or math.nan):.1f}",
        r.run_id,
    ]


def _get(r: RunRecord, key: str) -> Any:
    v = r.results.get(key)
    if key == "train_time_s":
        return float(v) if v is not None else math.nan
    return v


_RUN_HEADER = ("run", "accuracy", "R", "epochs run", "grad. steps", "train s", "run id")


def _comparison_lines(name: str, iv: Mapping[str, Interval]) -> list[str]:
    pct = iv["accuracy_diff"]
    return [
        f"- **{name}**: robustness difference {iv['robustness_diff'].fmt(4)}, "
        f"ratio {iv['robustness_ratio'].fmt(3)}, accuracy difference "
        f"{pct.fmt(2, pct=True)} points "
        f"({int(round(100 * iv['robustness_ratio'].level))}% paired bootstrap over test images)",
    ]


def _against_baseline(
    fc: FairComparison, records: Sequence[RunRecord], *, n_boot: int, level: float, seed: int
) -> str:
    """Markdown table: each run's accuracy and robustness differences to the baseline."""
    rows = []
    others = [r for r in records if r.run_id != fc.baseline.run_id]
    for r in sorted(others, key=lambda r: (METHODS.index(r.method), r.label())):
        iv = compare_records(r, fc.baseline, n_boot=n_boot, level=level, seed=seed)
        rows.append(
            [
                r.label(),
                f"{r.accuracy:.4f}",
                iv["accuracy_diff"].fmt(2, pct=True),
                f"{r.robustness:.4f}",
                iv["robustness_diff"].fmt(4),
                iv["robustness_ratio"].fmt(3),
                "yes" if r.accuracy >= fc.threshold - 1e-12 else "no",
            ]
        )
    header = ("run", "accuracy", "acc. - baseline (points)", "R", "R - baseline", "R / baseline")
    return _md_table(header + ("qualifies",), rows)


def write_report(
    results_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    tolerances: Mapping[str, float] | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Path:
    """Write ``results.csv``, the figures and ``report.md`` for every run below ``results_dir``.

    Returns the path of ``report.md``.

    Raises:
        FileNotFoundError: ``results_dir`` missing.
        ValueError: no finished run below it.
    """
    root = Path(results_dir)
    out = Path(out_dir) if out_dir is not None else root / "report"
    records = collect_results(root)
    if not records:
        raise ValueError(f"no finished run (results.json + per_image.npz) below {root}")
    out.mkdir(parents=True, exist_ok=True)
    tol = {**DEFAULT_TOLERANCE, **(tolerances or {})}
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    header = [
        f"momentkit {_version()} report of {root} at {stamp}",
        f"{len(records)} runs; tolerances {tol}; bootstrap n={n_boot} level={level} seed={seed}",
    ]
    write_csv(results_table(records), out / "results.csv", header)
    md = [
        "# Robustness comparison report",
        "",
        f"Generated by `python -m experiments report {root}` (momentkit {_version()}, {stamp}).",
        f"{len(records)} finished runs; full table: [results.csv](results.csv).",
        "Robustness R is the area under the Eq. 6 curve divided by the sigma range; intervals are "
        f"{int(round(100 * level))}% paired bootstrap intervals over test images ({n_boot} "
        "resamples). They reflect test-set sampling only, not training seed variation.",
        "",
    ]
    declared = read_matched(root)
    summary: dict[str, Any] = {"header": header, "settings": []}
    for key, recs in group_by_setting(records).items():
        setting = dict(key)
        slug = _slug(setting)
        title = (
            f"{setting['model']} on {setting['dataset']} (train subset {setting['train_subset']}, "
            f"test subset {setting['test_subset']}, epochs {setting['epochs']}, "
            f"seed {setting['seed']})"
        )
        md += [f"## {title}", ""]
        fig3 = plot_accuracy_robustness(recs, out / f"accuracy_robustness_{slug}.png", title)
        md += [
            "### Accuracy and robustness against training sigma (Figure 3)",
            "",
            f"![accuracy and robustness]({fig3.name})",
            "",
            _md_table(
                _RUN_HEADER,
                (
                    _run_row(r)
                    for r in sorted(recs, key=lambda r: (METHODS.index(r.method), r.label()))
                ),
            ),
            "",
        ]
        fc = fair_comparison(
            recs,
            tolerance=tol.get(str(setting["dataset"]), 0.0),
            n_boot=n_boot,
            level=level,
            seed=seed,
        )
        md += ["### Fair comparison (Figures 4 and 5)", ""]
        if fc is None:
            md += ["No baseline run in this setting: no fair comparison.", ""]
        else:
            fig4 = plot_fair(fc, out / f"fair_{slug}.png", title)
            md += [
                f"Baseline accuracy {fc.baseline.accuracy:.4f}, tolerance "
                f"{100 * fc.tolerance:.2f} points: runs with accuracy >= {fc.threshold:.4f} "
                f"qualify ({len(fc.qualifying['augment'])} augmentation, "
                f"{len(fc.qualifying['moment'])} regularizer).",
                "",
                f"![fair comparison]({fig4.name})",
                "",
                _md_table(
                    ("method",) + _RUN_HEADER,
                    [["baseline"] + _run_row(fc.baseline)]
                    + [
                        [f"best {m}"] + (_run_row(r) if r else ["none qualifies"] + [""] * 6)
                        for m, r in fc.best.items()
                    ],
                ),
                "",
                f"Factor R(best moment) / R(best augment) = {fc.factor:.4f}.",
                "",
            ]
            for name, iv in fc.comparisons.items():
                md += _comparison_lines(name, iv)
            md += ["", "Every run against the baseline (paired intervals):", ""]
            md += [_against_baseline(fc, recs, n_boot=n_boot, level=level, seed=seed), ""]
            summary["settings"].append(
                {
                    "setting": setting,
                    "baseline": fc.baseline.run_id,
                    "threshold": fc.threshold,
                    "best": {m: (r.run_id if r else None) for m, r in fc.best.items()},
                    "factor": fc.factor,
                    "comparisons": {
                        n: {k: vars(v) for k, v in iv.items()} for n, iv in fc.comparisons.items()
                    },
                }
            )
        md += [
            "### Training cost per method",
            "",
            _md_table(
                (
                    "method",
                    "runs",
                    "median wall s",
                    "median train s",
                    "median epochs",
                    "median grad. steps",
                    "total wall s",
                ),
                (
                    [
                        c["method"],
                        c["runs"],
                        c["wall_time_s"],
                        c["train_time_s"],
                        c["epochs_run"],
                        c["gradient_steps"],
                        c["total_wall_time_s"],
                    ]
                    for c in cost_table(recs)
                ),
            ),
            "",
        ]
    # compute comparisons across epoch caps (matched-compute runs differ in epochs)
    for key, recs in group_by_setting(records, with_epochs=False).items():
        setting = dict(key)
        pairs = matched_pairs(recs, declared, n_boot=n_boot, level=level, seed=seed)
        base = [r for r in recs if r.method == "baseline"]
        threshold = None
        if base:
            best_base = max(base, key=lambda r: r.accuracy)
            threshold = best_base.accuracy - tol.get(str(setting["dataset"]), 0.0)
        slug = _slug({**setting, "epochs": None})
        title = f"{setting['model']} on {setting['dataset']}: robustness against compute"
        fig = plot_compute(recs, threshold, out / f"compute_{slug}.png", title)
        md += [
            f"## Matched compute: {setting['model']} on {setting['dataset']} (all epoch caps)",
            "",
        ]
        md += [f"![robustness against compute]({fig.name})", ""]
        if pairs:
            md += [
                _md_table(
                    (
                        "run",
                        "reference",
                        "matched by",
                        "acc run / ref",
                        "R run / ref",
                        "grad. steps run / ref",
                        "train s run / ref",
                    ),
                    (
                        [
                            f"{a.label()} ({a.config['epochs']} ep)",
                            f"{b.label()} ({b.config['epochs']} ep)",
                            d["by"],
                            f"{a.accuracy:.4f} / {b.accuracy:.4f}",
                            f"{a.robustness:.4f} / {b.robustness:.4f}",
                            f"{_get(a, 'gradient_steps')} / {_get(b, 'gradient_steps')}",
                            f"{_get(a, 'train_time_s'):.1f} / {_get(b, 'train_time_s'):.1f}",
                        ]
                        for a, b, d, _ in pairs
                    ),
                ),
                "",
            ]
            for a, b, _, iv in pairs:
                md += _comparison_lines(f"{a.label()} vs {b.label()} (matched compute)", iv)
            md.append("")
        else:
            md += ["No matched-compute pairs declared for this setting.", ""]
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


# --------------------------------------------------------------------------- command line


def _parse_tolerances(items: Sequence[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(
                f"--tolerance expects DATASET=FRACTION (e.g. cifar10=0.0039), got {item!r}"
            ) from None
    return out


def add_report_parser(subparsers: Any) -> None:
    """Register ``report RESULTS_DIR`` on an argparse subparsers object."""
    p = subparsers.add_parser("report", help="tables, fair comparison, figures and report.md")
    p.add_argument("results_dir", help="directory holding run folders (searched recursively)")
    p.add_argument("--out", default=None, help="default: RESULTS_DIR/report")
    p.add_argument(
        "--tolerance",
        action="append",
        default=[],
        metavar="DATASET=FRACTION",
        help="accuracy tolerance of the fair comparison (default mnist=0, cifar10=0.0039, "
        "cifar100=0.0075)",
    )
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--level", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    from experiments.cli import add_runtime_args

    add_runtime_args(p, device=False, data_root=False)
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: Any) -> int:
    path = write_report(
        args.results_dir,
        args.out,
        tolerances=_parse_tolerances(args.tolerance),
        n_boot=args.bootstrap,
        level=args.level,
        seed=args.seed,
    )
    print(f"wrote {path}")
    return 0
