"""Tests of ``python -m experiments``: demo --quick, train, evaluate, and clean user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.__main__ import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_demo(mnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    code = main(["demo", "--quick", "--out", str(out), "--data-root", str(mnist_root),
                 "--no-progress"])
    assert code == 0
    return out


def test_demo_quick_writes_table_plot_and_runs(quick_demo: Path) -> None:
    table = json.loads((quick_demo / "demo_table.json").read_text())
    assert [row["method"] for row in table["rows"]] == ["baseline", "moment", "augment"]
    assert table["momentkit_version"] and table["quick"] is True
    for row in table["rows"]:
        results = json.loads((quick_demo / row["method"] / "results.json").read_text())
        assert row["test_accuracy"] == results["test_accuracy"]
        assert row["robustness_auc"] == results["robustness"]["auc"]
        assert 0.0 <= row["robustness_auc"] <= 1.0
    csv_lines = (quick_demo / "demo_table.csv").read_text().splitlines()
    assert csv_lines[0].startswith("# momentkit_version")
    header = next(line for line in csv_lines if not line.startswith("#"))
    assert header.startswith("method,sigma,alpha,folds,test_accuracy,robustness_auc")
    assert (quick_demo / "demo_robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_reproduces_a_run(quick_demo: Path, mnist_root: Path, capsys) -> None:
    run = quick_demo / "moment"
    assert main(["evaluate", "--run", str(run), "--data-root", str(mnist_root)]) == 0
    evaluation = json.loads((run / "evaluation.json").read_text())
    results = json.loads((run / "results.json").read_text())
    assert evaluation["test_accuracy"] == results["test_accuracy"]
    assert evaluation["robustness"] == results["robustness"]
    assert "robustness" in capsys.readouterr().out


def test_train_command(mnist_root: Path, tmp_path: Path) -> None:
    args = ["train", "--dataset", "mnist", "--model", "lenet", "--method", "augment",
            "--sigma", "0.3", "--folds", "2", "--epochs", "1", "--train-subset", "200",
            "--test-subset", "50", "--eval-sigmas", "3", "--batch-size", "20", "--lr", "1e-3",
            "--out", str(tmp_path / "run"), "--data-root", str(mnist_root), "--no-progress"]
    assert main(args) == 0
    config = json.loads((tmp_path / "run" / "results.json").read_text())["config"]
    assert (config["method"], config["sigma"], config["folds"], config["train_subset"]) == (
        "augment", 0.3, 2, 200)


def test_bad_config_is_one_line_error(tmp_path: Path, capsys) -> None:
    code = main(["train", "--dataset", "mnist", "--model", "lenet", "--method", "moment",
                 "--sigma", "0.5", "--out", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.startswith("error: alpha")


def test_bad_thread_count_is_refused(tmp_path: Path, capsys) -> None:
    code = main(["demo", "--quick", "--out", str(tmp_path), "--threads", "0"])
    assert code == 2 and "--threads" in capsys.readouterr().err


def test_missing_data_from_a_real_process(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "experiments", "train", "--dataset", "mnist", "--model",
         "lenet", "--method", "baseline", "--data-root", str(tmp_path / "nowhere"),
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "MOMENTKIT_DATA" in proc.stderr and "--data-root" in proc.stderr
    assert str((tmp_path / "nowhere").resolve()) in proc.stderr
