"""Tests of experiments.report.markdown and experiments.report.cli: report.md, results.csv and
summary.json on synthetic runs (with failed and flagged runs) and on a real tiny grid."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from experiments import executors
from experiments.__main__ import build_parser
from experiments.__main__ import main as report_main
from experiments.grids import expand_spec, write_manifest
from experiments.report import collect_results, results_table, write_report
from experiments.report.figures import figure3_lines
from tests.experiments.report_runs import (
    EPS,
    RUNS,
    N,
    cfg,
    r_by_hand,
    record,
    synthetic_runs,
    write_failed,
    write_nan_results,
    write_run,
)


def _strict(text: str) -> dict:
    """json.loads that refuses NaN and infinities, as strict JSON readers do."""

    def refuse(token: str) -> None:
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.slow
def test_write_report_on_synthetic_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path
    synthetic_runs(root)
    out = root / "out"
    assert report_main(["report", str(root), "--out", str(out), "--bootstrap", "200"]) == 0
    text = (out / "report.md").read_text()
    assert f"Factor R(best moment) / R(best augment) = {0.99 / 0.921875:.4f}" in text
    assert "qualify (1 augmentation, 1 regularizer, 0 Gaussian noise training)" in text
    # every run against the baseline: mom1 has one more correct image (+0.25 points), aug6
    # has eight fewer (-2 points) and does not qualify
    assert "| moment alpha=1 sigma=0.5 | 0.9025 | 0.25 [" in text
    assert "| augment N~=6 sigma=0.5 | 0.8800 | -2.00 [" in text
    assert text.count("| no |") == 2 and text.count("| yes |") == 2
    # every regularizer run against the best augmentation (aug2 qualifies; no Gaussian
    # run): mom1 one image more than aug2 (+0.25 points), R ratio 0.99 / 0.921875
    assert "Every regularizer run against the best noise-training runs" in text
    mom1 = next(line for line in text.splitlines()
                if line.startswith("| moment alpha=1 sigma=0.5 | augment N~=2 sigma=0.25 |"))
    assert "| 0.25 [" in mom1 and f"| {0.99 / 0.921875:.3f} [" in mom1
    assert "| moment alpha=5 sigma=2 | augment N~=2 sigma=0.25 | -0.25 [" in text
    assert "## Runs left out\n\nNone" in text
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert [p.split("_")[0] for p in pngs] == ["accuracy", "compute", "fair"]
    with (out / "results.csv").open() as fh:
        lines = fh.read().splitlines()
    assert lines[0].startswith("# momentkit ") and lines[1].startswith("# 5 runs (0 left out)")
    rows = list(csv.DictReader(lines[2:]))
    assert len(rows) == 5 and rows[0]["method"] == "baseline"
    summary = _strict((out / "summary.json").read_text())
    assert abs(summary["settings"][0]["factor"] - 0.99 / 0.921875) <= 8 * EPS
    # a different tolerance is a command-line option
    argv = ["report", str(root), "--out", str(out), "--bootstrap", "100"]
    assert report_main(argv + ["--tolerance", "mnist=0.0039"]) == 0
    text = (out / "report.md").read_text()
    assert "qualify (1 augmentation, 2 regularizer, 0 Gaussian noise training)" in text
    assert report_main(["report", str(root), "--tolerance", "mnist"]) == 2
    assert "DATASET=FRACTION" in capsys.readouterr().err
    assert report_main(["report", str(root), "--tolerance", "mnist=1.5"]) == 2
    assert "0 <= FRACTION < 1" in capsys.readouterr().err


def test_failed_and_flagged_runs_in_the_report(tmp_path: Path) -> None:
    """A diverged, a crashed and a NaN-results run are in no table but listed with their
    reason; a flagged run is marked and not chosen although its R is the highest;
    summary.json stays strict JSON with no augmentation run (factor undefined)."""
    write_run(tmp_path, cfg("baseline"), 360, [400, 380, 340, 300, 260])
    ok = cfg("moment", alpha=1.0, sigma=0.5)
    write_run(tmp_path, ok, 361, [400, 398, 396, 394, 392])
    flat = cfg("moment", alpha=9.0, sigma=0.5)
    write_run(tmp_path, flat, 362, [400] * 5, degenerate=0.97)
    diverged = cfg("moment", alpha=50.0, sigma=0.5)
    write_failed(tmp_path, diverged, "diverged", 2, "non-finite loss at epoch 2")
    crashed = cfg("augment", folds=3, sigma=0.5)
    write_failed(tmp_path, crashed, "exception", None, "RuntimeError: a | b")
    nan_run = cfg("augment", folds=4, sigma=0.5)
    write_nan_results(tmp_path, nan_run)
    out = tmp_path / "report"
    write_report(tmp_path, n_boot=100)
    text = (out / "report.md").read_text()
    main_part, left_part = text.split("## Runs left out")
    for gone in (diverged, crashed, nan_run):
        assert gone.run_id() not in main_part and gone.run_id() in left_part
    assert f"| {diverged.run_id()} | moment alpha=50 sigma=0.5 | diverged | 2 |" in left_part
    assert f"| {crashed.run_id()} | augment N~=3 sigma=0.5 | exception |  | RuntimeError" in (
        left_part
    )
    assert "invalid results" in left_part
    # the flagged run: marked in the run table, excluded from the fair choice, said so
    assert "| moment alpha=9 sigma=0.5 **[degenerate predictions]** | 0.9050 | 1.0000 |" in text
    assert f"Left out of the choice for degenerate predictions: {flat.run_id()}." in text
    assert "| best moment | moment alpha=1 sigma=0.5 | 0.9025 | 0.9900 |" in text
    assert "| no (degenerate predictions) |" in text
    summary = _strict((out / "summary.json").read_text())
    setting = summary["settings"][0]
    assert setting["best"] == {"moment": ok.run_id(), "augment": None, "gaussian": None}
    assert setting["flagged"] == [flat.run_id()] and setting["factor"] is None
    assert {r["run_id"]: r["kind"] for r in summary["left_out"]} == {
        diverged.run_id(): "diverged",
        crashed.run_id(): "exception",
        nan_run.run_id(): "invalid results",
    }
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()[2:]))
    assert len(rows) == 3
    # no run holds certificates: no certified section, figure, summary entry or values
    assert "Certified robustness" not in text and not list(out.glob("certified_*.png"))
    assert summary["certified"] == [] and all(r["acr"] == "" for r in rows)


def test_report_of_an_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no finished run"):
        write_report(tmp_path)
    write_failed(tmp_path, cfg("baseline"), "diverged", 0, "nan")
    with pytest.raises(ValueError, match="1 failed or diverged"):
        write_report(tmp_path)


def test_the_report_command_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``report --device`` did nothing; it is gone (argparse refuses it, exit 2). Bad
    bootstrap settings are one-line errors naming the flag."""
    parser = build_parser()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["report", str(tmp_path), "--device", "cpu"])
    assert exc.value.code == 2
    for flag, value in (("--bootstrap", "5"), ("--level", "1")):
        assert report_main(["report", str(tmp_path), flag, value]) == 2
        assert flag in capsys.readouterr().err
    assert not (tmp_path / "report").exists()  # refused before anything is written
    args = parser.parse_args(["report", str(tmp_path)])
    assert (args.bootstrap, args.level, args.seed, args.out) == (2000, 0.95, 0, None)


@pytest.mark.slow
def test_report_command_on_a_real_tiny_grid(tmp_path: Path, mnist_root: Path) -> None:
    spec = {
        "name": "report-tiny",
        "defaults": {
            "dataset": "mnist",
            "model": "lenet",
            "epochs": 1,
            "train_subset": 200,
            "test_subset": 100,
            "eval_sigmas": 4,
            "batch_size": 100,
            "lr": 0.001,
        },
        "groups": [
            {"method": "baseline"},
            {"method": "moment", "alpha": 1.0, "sigma": 0.5},
            {"method": "augment", "folds": 2, "sigma": 0.5},
        ],
    }
    grid = expand_spec(spec)
    write_manifest(grid, tmp_path)
    outcomes = executors.run_local(
        grid.configs, tmp_path, data_root=str(mnist_root), progress=False
    )
    assert [o.status for o in outcomes] == ["done"] * 3
    assert report_main(["report", str(tmp_path), "--bootstrap", "200"]) == 0
    out = tmp_path / "report"
    text = (out / "report.md").read_text()
    assert "## lenet on mnist (train subset 200, test subset 100, epochs 1, seed 0)" in text
    assert "### Fair comparison" in text and "### Training cost per method" in text
    assert len(list(out.glob("*.png"))) == 3
    _strict((out / "summary.json").read_text())
    rows = results_table(collect_results(tmp_path))
    assert {r["run_id"] for r in rows} == set(grid.run_ids())
    for row in rows:
        assert 0.0 <= row["test_accuracy"] <= 1.0 and 0.0 <= row["robustness_auc"] <= 1.0
        assert row["gradient_steps"] == (2 if row["method"] == "augment" else 1) * 2


def test_figure3_keeps_the_two_surrogates_apart_and_draws_gaussian_training() -> None:
    """A whole-network regularizer run at the same alpha as first_relu runs gets its own
    line (one line would join two methods), and Gaussian noise training has a line."""
    runs = [
        record("b", "baseline", 0.99, 0.8),
        record("m1", "moment", 0.99, 0.95),
        record("m2", "moment", 0.99, 0.97),
        record("n1", "moment", 0.99, 0.96),
        record("a", "augment", 0.99, 0.98),
        record("g2", "gaussian", 0.99, 0.99),
        record("g1", "gaussian", 0.99, 0.98),
    ]
    for run_id, sigma in (("m1", 0.25), ("m2", 1.0), ("n1", 0.5), ("g1", 0.25), ("g2", 0.5)):
        next(r for r in runs if r.run_id == run_id).config["sigma"] = sigma
    next(r for r in runs if r.run_id == "n1").config["moments"] = "network"
    lines = [(m, label, [r.run_id for r in rs]) for m, label, rs in figure3_lines(runs)]
    assert lines == [
        ("moment", "moment alpha=1", ["m1", "m2"]),
        ("moment", "moment network alpha=1", ["n1"]),
        ("augment", "augment N~=2", ["a"]),
        ("gaussian", "gaussian", ["g1", "g2"]),
    ]


def test_whole_network_runs_meet_their_first_relu_twin(tmp_path: Path) -> None:
    """The report sets a moments="network" run against the paper's surrogate at the same
    alpha and sigma: accuracies, the paired accuracy difference (4 more correct images of
    400: +1 point) and the R ratio as computed by hand."""
    synthetic_runs(tmp_path)  # holds mom1: first_relu, alpha 1, sigma 0.5
    net_surv = [400, 399, 398, 397, 396]
    write_run(tmp_path, cfg("moment", alpha=1.0, sigma=0.5, moments="network"), 365, net_surv)
    out = tmp_path / "out"
    write_report(tmp_path, out, n_boot=200)
    text = (out / "report.md").read_text()
    assert "### Whole-network moments against the paper's surrogate" in text
    start = "| moment network alpha=1 sigma=0.5 | moment alpha=1 sigma=0.5 |"
    row = next(line for line in text.splitlines() if line.startswith(start))
    r_net, r_twin = r_by_hand(net_surv), r_by_hand(RUNS["mom1"][3])
    assert f"| {365 / N:.4f} / {361 / N:.4f} | 1.00 [" in row
    assert f"| {r_net:.4f} / {r_twin:.4f} | {r_net - r_twin:.4f} [" in row
    assert f"| {r_net / r_twin:.3f} [" in row
    # no whole-network run, no section
    plain = tmp_path / "plain"
    synthetic_runs(plain)
    write_report(plain, plain / "out", n_boot=50)
    assert "Whole-network moments" not in (plain / "out" / "report.md").read_text()
