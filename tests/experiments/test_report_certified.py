"""Tests of the report's randomized-smoothing part: certificates read from run folders
(experiments.report.certificates), their columns, the certified-accuracy curve, the paired
ACR comparison and the report section."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from experiments import executors, rundir
from experiments.report import (
    CERTIFIED_COLUMNS,
    TABLE_COLUMNS,
    collect_runs,
    compare_certificates,
    fair_choice,
    load_certificates,
    results_table,
    setting_key,
    write_report,
)
from experiments.report.certificates import Certificate
from experiments.report.figures import certified_curve_points
from experiments.report.records import write_csv
from experiments.report.smoothing import certified_section
from tests.experiments.report_runs import (
    EPS,
    RUNS,
    certificate_json,
    synthetic_runs,
    write_certificates,
)

# Ten images of class 0, by hand: correct (prediction 0) with radii 0.1, 0.25, 0.3, 0.5,
# 0.75, 1.2 and 0.0; one wrong (class 1, radius 0.9); two abstentions (-1, radius 0).
LABEL = [0] * 10
PRED = [0, 0, 0, 0, 0, 0, 1, -1, -1, 0]
RADIUS = [0.1, 0.25, 0.3, 0.5, 0.75, 1.2, 0.9, 0.0, 0.0, 0.0]
# certified accuracy at 0, 0.25, 0.5, 0.75, 1.0 counted by hand: 7, 5, 3, 2, 1 of 10
BY_HAND = {0.0: 0.7, 0.25: 0.5, 0.5: 0.3, 0.75: 0.2, 1.0: 0.1}
ACR_BY_HAND = (0.1 + 0.25 + 0.3 + 0.5 + 0.75 + 1.2) / 10  # 0.31; the wrong 0.9 counts 0


def _strict(text: str) -> dict:
    def refuse(token: str) -> None:
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def _load_one(rdir: Path) -> Certificate:
    (cert,) = load_certificates(rdir)
    return cert


def test_certified_accuracy_acr_and_abstention_at_known_radii(tmp_path: Path) -> None:
    """Counts are exact (ratios k / 10), so equality; the ACR is a sum of 10 floats, so a
    few ulps (4 eps relative)."""
    order = [3, 7, 0, 9, 5, 1, 8, 2, 6, 4]  # the file lists images out of order
    write_certificates(
        tmp_path,
        0.25,
        [LABEL[i] for i in order],
        [PRED[i] for i in order],
        [RADIUS[i] for i in order],
        index=order,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the hand-written summary agrees: no warning
        cert = _load_one(tmp_path)
    assert cert.index.tolist() == list(range(10)) and cert.radius.tolist() == RADIUS
    assert (cert.sigma, cert.n, cert.alpha, cert.n_images) == (0.25, 10_000, 0.001, 10)
    assert cert.curve(list(BY_HAND)).tolist() == list(BY_HAND.values())
    # the curve is left-continuous: at a radius the image still counts, just above it not
    assert cert.curve([1.2, np.nextafter(1.2, 2), 0.3, np.nextafter(0.3, 1)]).tolist() == [
        0.1,
        0.0,
        0.4,
        0.3,
    ]
    assert abs(cert.acr - ACR_BY_HAND) <= 4 * EPS * ACR_BY_HAND
    assert cert.abstain_rate == 0.2
    summary = cert.summary()
    assert summary["certified_accuracy"] == {str(r): a for r, a in BY_HAND.items()}
    assert summary["n_images"] == 10


def test_the_drawn_curve_is_exact_and_its_area_is_the_acr() -> None:
    """On random certificates the curve's points equal a brute-force count, and the area of
    the steps-pre drawing equals the ACR (both exact up to summation rounding, 1e-12)."""
    rng = np.random.default_rng(0)
    n = 500
    label = rng.integers(0, 3, n)
    pred = np.where(rng.random(n) < 0.1, -1, rng.integers(0, 3, n))
    radius = np.where(pred == -1, 0.0, np.round(rng.exponential(0.4, n), 3))  # ties included
    obj = certificate_json(0.5, label.tolist(), pred.tolist(), radius.tolist())
    from experiments.report.certificates import certificate_from_json

    cert = certificate_from_json(obj, Path("x.json"))
    x, y = certified_curve_points(cert)
    brute = np.array([np.mean((pred == label) & (radius >= r)) for r in x])
    np.testing.assert_array_equal(y, brute)
    area = float(np.sum(np.diff(x) * y[1:]))  # steps-pre: y[k] on (x[k-1], x[k]]
    assert abs(area - cert.acr) <= 1e-12
    assert y[-1] == 0.0 and y[0] == np.mean(pred == label)


def test_a_mismatched_summary_warns_and_the_recomputed_values_are_used(tmp_path: Path) -> None:
    obj = write_certificates(tmp_path, 0.25, LABEL, PRED, RADIUS)
    obj["summary"]["acr"] = 0.5
    obj["summary"]["certified_accuracy"]["0.5"] = 0.4
    rundir.write_json_atomic(tmp_path / rundir.certify_file(0.25), obj)
    with pytest.warns(UserWarning, match="disagrees") as caught:
        cert = _load_one(tmp_path)
    message = str(caught[0].message)
    assert "acr: stored 0.5" in message and "certified accuracy at 0.5: stored 0.4" in message
    assert "abstain_rate" not in message  # only what differs is named
    assert abs(cert.acr - ACR_BY_HAND) <= 4 * EPS * ACR_BY_HAND
    # a stored 'correct' that is not prediction == label is a disagreement too
    obj = certificate_json(0.25, LABEL, PRED, RADIUS)
    obj["images"][6]["correct"] = True
    rundir.write_json_atomic(tmp_path / rundir.certify_file(0.25), obj)
    with pytest.warns(UserWarning, match="'correct' is not prediction == label for 1 images"):
        assert _load_one(tmp_path).curve([0.0]).tolist() == [0.7]


def test_malformed_certificate_files_are_skipped_with_a_warning(tmp_path: Path) -> None:
    write_certificates(tmp_path, 0.25, LABEL, PRED, RADIUS)
    (tmp_path / rundir.certify_file(0.5)).write_text("{not json")
    dup = certificate_json(1.0, LABEL, PRED, RADIUS, index=[0] * 10)
    rundir.write_json_atomic(tmp_path / rundir.certify_file(1.0), dup)
    neg = certificate_json(2.0, LABEL, PRED, [-0.1] + RADIUS[1:])
    rundir.write_json_atomic(tmp_path / rundir.certify_file(2.0), neg)
    with pytest.warns(UserWarning, match="skipping certificates") as caught:
        certs = load_certificates(tmp_path)
    assert [c.sigma for c in certs] == [0.25]
    text = " ".join(str(w.message) for w in caught)
    assert "unreadable JSON" in text and "appears twice" in text and "negative" in text
    assert load_certificates(tmp_path / "nowhere") == ()


def _certified_runs(root: Path) -> dict[str, Path]:
    """The five synthetic runs; mom1 certified at 0.25 and 0.5, aug2 at 0.25, the rest not.
    The images are those of the hand-counted example, aug2 with every radius halved."""
    configs = synthetic_runs(root)
    dirs = {name: executors.run_dir(root, c) for name, c in configs.items()}
    write_certificates(dirs["mom1"], 0.25, LABEL, PRED, RADIUS)
    write_certificates(dirs["mom1"], 0.5, LABEL, PRED, [2 * r for r in RADIUS])
    write_certificates(dirs["aug2"], 0.25, LABEL, PRED, [r / 2 for r in RADIUS])
    return dirs


def test_certificates_are_attached_to_records_and_columns(tmp_path: Path) -> None:
    dirs = _certified_runs(tmp_path)
    records, _ = collect_runs(tmp_path)
    by_path = {r.path: r for r in records}
    mom1, aug2, base = by_path[dirs["mom1"]], by_path[dirs["aug2"]], by_path[dirs["baseline"]]
    assert [c.sigma for c in mom1.certificates] == [0.25, 0.5]
    assert mom1.certificate(0.5).curve([1.0]).tolist() == [0.3]  # radii doubled
    assert base.certificates == () and base.certificate(0.25) is None
    rows = results_table(records)
    assert len(rows) == len(RUNS) + 1  # one row per run and certification sigma
    assert set(CERTIFIED_COLUMNS) <= set(TABLE_COLUMNS)
    mom_rows = [r for r in rows if r["run_id"] == mom1.run_id]
    assert [r["certify_sigma"] for r in mom_rows] == [0.25, 0.5]
    first = mom_rows[0]
    assert [first[f"certified_accuracy_r{r:g}"] for r in BY_HAND] == list(BY_HAND.values())
    assert abs(first["acr"] - ACR_BY_HAND) <= 4 * EPS * ACR_BY_HAND
    assert (first["abstain_rate"], first["certified_images"], first["certify_n"]) == (0.2, 10, 1e4)
    assert first["test_accuracy"] == mom_rows[1]["test_accuracy"] == 361 / 400
    aug_row = next(r for r in rows if r["run_id"] == aug2.run_id)
    assert aug_row["certified_accuracy_r0.5"] == 0.1  # halved radii: only 1.2 / 2 left
    base_row = next(r for r in rows if r["run_id"] == base.run_id)
    assert all(base_row[k] is None for k in CERTIFIED_COLUMNS)
    path = tmp_path / "t.csv"
    write_csv(rows, path, [])
    parsed = list(csv.DictReader(path.read_text().splitlines()))
    by_id = {(r["run_id"], r["certify_sigma"]): r for r in parsed}
    assert by_id[(mom1.run_id, "0.5")]["certified_accuracy_r1"] == "0.3"
    assert by_id[(base.run_id, "")]["acr"] == ""


@pytest.mark.slow
def test_report_section_figures_and_strict_summary(tmp_path: Path) -> None:
    """The section, one figure per certification sigma and summary.json (strict JSON) on the
    synthetic runs; a report without certificates is checked in test_report_markdown."""
    dirs = _certified_runs(tmp_path)
    out = tmp_path / "report"
    write_report(tmp_path, n_boot=50)
    text = (out / "report.md").read_text()
    assert "No paired comparison at sigma 0.5: no two of the fair comparison's" in text
    # aug2 certified at 0.5 on only 5 of the images: said, not compared
    write_certificates(dirs["aug2"], 0.5, LABEL[:5], PRED[:5], RADIUS[:5])
    write_report(tmp_path, n_boot=50)
    text = (out / "report.md").read_text()
    assert "- **moment vs augment** at sigma 0.5: not compared (the runs were not" in text
    section = text.split("### Certified robustness (randomized smoothing)")[1].split("###")[0]
    mom = "| moment alpha=1 sigma=0.5 | 0.25 | 10 | 10000 | 0.001 | "
    assert mom + "0.7000 | 0.5000 | 0.3000 | 0.2000 | 0.1000 | 0.3100 | 0.2000 | 0.9025 |" in (
        section
    )
    assert section.count("| augment N~=2 sigma=0.25 | 0.25 |") == 1
    assert "baseline" not in section.split("![")[0]  # only certified runs in the table
    # the chosen runs (mom1, aug2) certified the same images at 0.25: one paired comparison;
    # the per-image certified radii differ by r / 2, so the ACR difference is 0.155
    assert "- **moment vs augment** at sigma 0.25: ACR difference 0.1550 [" in section
    for sigma in ("0.25", "0.5"):
        assert (out / f"certified_lenet-mnist-e3-s0-cs{sigma}.png").stat().st_size > 1000
    summary = _strict((out / "summary.json").read_text())
    (entry,) = summary["certified"]
    assert len(entry["runs"]) == 4 and len(entry["figures"]) == 2
    runs = {(e["run_id"], e["sigma"]): e for e in entry["runs"]}
    mom1_id = next(r for r in collect_runs(tmp_path)[0] if r.path == dirs["mom1"]).run_id
    assert runs[(mom1_id, 0.25)]["certified_accuracy"]["0.75"] == 0.2
    (cmp,) = entry["comparisons"]
    iv = cmp["intervals"]["acr_diff"]
    assert abs(iv["estimate"] - ACR_BY_HAND / 2) <= 8 * EPS
    assert iv["low"] <= iv["estimate"] <= iv["high"]


def _cert(radius: np.ndarray, correct: np.ndarray, *, sigma: float = 0.25, n: int = 10_000):
    label = np.zeros(radius.size, dtype=int)
    pred = np.where(correct, 0, 1)
    obj = certificate_json(sigma, label.tolist(), pred.tolist(), radius.tolist(), n=n)
    from experiments.report.certificates import certificate_from_json

    return certificate_from_json(obj, Path(f"sigma{sigma}.json"))


def _pair_sample(rng: np.random.Generator, size: int) -> tuple[Certificate, Certificate]:
    """A's radii U(0.2, 1.2), all correct; B's radii A's - 0.1 + U(-0.05, 0.05), 10% wrong
    independently: true ACR difference E[r_a] - 0.9 E[r_b] = 0.7 - 0.9 * 0.6 = 0.16."""
    ra = rng.uniform(0.2, 1.2, size)
    rb = ra - 0.1 + rng.uniform(-0.05, 0.05, size)
    return _cert(ra, np.ones(size, bool)), _cert(rb, rng.random(size) >= 0.1)


def test_paired_acr_interval_covers_the_true_difference() -> None:
    """Coverage over 100 constructed data sets of 400 images: the 95% interval must hold the
    true 0.16 in at least 88 (binomial(100, 0.95) has sd 2.2; 88 is 3 sd below 95, which
    also leaves room for the percentile bootstrap's slight under-coverage at this size).
    One large sample also checks the width against normal theory (20%: Monte Carlo error
    of the 2.5% quantiles from 2000 resamples and skewness)."""
    rng = np.random.default_rng(11)
    true = 0.16
    covered = 0
    for k in range(100):
        a, b = _pair_sample(rng, 400)
        iv = compare_certificates(a, b, n_boot=300, seed=k)["acr_diff"]
        covered += iv.low <= true <= iv.high
    assert covered >= 88
    a, b = _pair_sample(rng, 3000)
    ivs = compare_certificates(a, b, n_boot=2000, seed=1)
    iv = ivs["acr_diff"]
    d = a.certified_radius - b.certified_radius
    assert abs(iv.estimate - d.mean()) <= 1e-12 and abs(iv.estimate - (a.acr - b.acr)) <= 1e-12
    half = stats.norm.ppf(0.975) * d.std(ddof=1) / np.sqrt(d.size)
    assert abs((iv.high - iv.low) / (2 * half) - 1) <= 0.2
    assert iv.excludes(0.0) and not iv.excludes(true)
    assert ivs["certified_accuracy_a"].estimate == 1.0


def test_paired_acr_comparison_refuses_different_images_or_settings() -> None:
    rng = np.random.default_rng(3)
    r = rng.uniform(0, 1, 20)
    ok = np.ones(20, bool)
    base = _cert(r, ok)
    for other in (_cert(r, ok, sigma=0.5), _cert(r, ok, n=1000), _cert(r[:10], ok[:10])):
        with pytest.raises(ValueError, match="same images at the same"):
            compare_certificates(base, other)
    assert compare_certificates(base, _cert(r, ok), n_boot=50)["acr_diff"].estimate == 0.0


def test_a_single_certified_image_is_not_compared(tmp_path: Path) -> None:
    """The paired bootstrap needs 2 images; a section with one certified image per run says
    so instead of failing, and draws the figure."""
    configs = synthetic_runs(tmp_path)
    for name in ("mom1", "aug2"):
        write_certificates(executors.run_dir(tmp_path, configs[name]), 2.0, [0], [0], [1.5])
    records, _ = collect_runs(tmp_path)
    fc = fair_choice(records)
    setting = dict(setting_key(records[0].config))
    md, entry = certified_section(setting, records, fc, tmp_path, "t", {"n_boot": 20})
    assert "- **moment vs augment** at sigma 2: not compared" in "\n".join(md)
    assert entry is not None and entry["comparisons"] == [] and len(entry["runs"]) == 2
    assert (tmp_path / entry["figures"][0]).is_file()
    assert certified_section(setting, records[:0], fc, tmp_path, "t", {}) == ([], None)
