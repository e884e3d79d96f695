"""Tests of ``python -m experiments``: demo --quick, train, evaluate, clean user errors
(one line, exit 2, nothing left behind), divergence (exit 1) and progress in a log."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments import rundir
from experiments.__main__ import main
from experiments.cli import Progress, progress

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_demo(mnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``demo --quick`` with progress on, its output going to a log (not a terminal)."""
    out = tmp_path_factory.mktemp("demo")
    log = io.StringIO()
    with contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
        code = main(["demo", "--quick", "--out", str(out), "--data-root", str(mnist_root)])
    (out / "demo.log").write_text(log.getvalue())
    assert code == 0
    return out


@pytest.mark.slow
def test_demo_log_has_a_few_lines_per_epoch(quick_demo: Path) -> None:
    """Every tqdm refresh used to be a line of its own in a log: thousands for the demo."""
    log = (quick_demo / "demo.log").read_text()
    assert "\r" not in log
    lines = log.splitlines()
    # per run: a header, 4 batch milestones and a summary for its one epoch; then the table
    per_epoch = [line for line in lines if " epoch 1/1: " in line]
    assert len(per_epoch) == 3 * 4, per_epoch
    assert len([line for line in lines if line.startswith("[")]) == 3
    assert len(lines) < 40, lines


@pytest.mark.slow
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


@pytest.mark.slow
def test_evaluate_reproduces_a_run(quick_demo: Path, mnist_root: Path, capsys) -> None:
    run = quick_demo / "moment"
    assert main(["evaluate", "--run", str(run), "--data-root", str(mnist_root)]) == 0
    evaluation = json.loads((run / "evaluation.json").read_text())
    results = json.loads((run / "results.json").read_text())
    assert evaluation["test_accuracy"] == results["test_accuracy"]
    assert evaluation["robustness"] == results["robustness"]
    assert "robustness" in capsys.readouterr().out


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert not (tmp_path / "run").exists()  # it was left behind, empty


TRAIN = ["train", "--dataset", "mnist", "--model", "lenet", "--method", "baseline",
         "--epochs", "1", "--train-subset", "100", "--test-subset", "20", "--eval-sigmas", "2",
         "--batch-size", "50", "--no-progress"]


@pytest.mark.parametrize("device", ["tpu9", "cuda", "cuda:7"])
def test_an_unusable_device_is_one_line_and_leaves_nothing(
    device: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip(f"{device} exists on this machine")
    out = tmp_path / "run"
    assert main([*TRAIN, "--device", device, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --device {device!r} is not usable here")
    assert err.count("\n") == 1 and not out.exists()


def test_out_pointing_at_a_file_is_one_line_and_leaves_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "file"
    out.write_text("mine")
    assert main([*TRAIN, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: --out: {str(out)!r} exists and is not a folder\n"
    assert out.read_text() == "mine"


@pytest.mark.parametrize(
    "command",
    [["demo", "--quick"], ["grid", "run", "tiny", "--no-progress"]],
)
def test_other_commands_refuse_a_file_as_output_folder(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "file"
    out.write_text("mine")
    flag = "--out" if command[0] == "demo" else "--results-dir"
    assert main([*command, flag, str(out)]) == 2
    assert capsys.readouterr().err == f"error: {flag}: {str(out)!r} exists and is not a folder\n"
    assert out.read_text() == "mine"


def test_demo_without_data_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--data-root", str(tmp_path / "no")]) == 2
    assert capsys.readouterr().err.startswith("error: mnist: data set not found")
    assert not out.exists()


def test_grid_run_with_zero_workers_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    results = tmp_path / "r"
    assert main(["grid", "run", "tiny", "--workers", "0", "--results-dir", str(results)]) == 2
    assert capsys.readouterr().err == "error: --workers: must be at least 1, got 0\n"
    assert not results.exists()


def test_a_subset_too_large_names_the_flag(
    mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = [*TRAIN, "--out", str(tmp_path / "run"), "--data-root", str(mnist_root)]
    assert main([*args, "--train-subset", "70000"]) == 2
    assert capsys.readouterr().err == (
        "error: train_subset (--train-subset): 70000 images requested, but the mnist "
        "training set has only 60000\n")
    assert not (tmp_path / "run").exists()


def test_a_diverged_train_exits_1_with_one_line(
    mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The reported command (lr 1e30) exited 0 with a perfect robustness."""
    out = tmp_path / "nan"
    code = main([*TRAIN, "--lr", "1e30", "--out", str(out), "--data-root", str(mnist_root)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: run diverged at epoch 1 (loss nan)")
    assert err.count("\n") == 1
    assert rundir.read_error(out)["kind"] == "diverged"
    assert not (out / "results.json").exists()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("total", "lines"), [(1000, 4), (9, 4), (3, 3), (1, 1)])
def test_progress_in_a_log_is_a_few_plain_lines(total: int, lines: int) -> None:
    log = io.StringIO()
    assert list(progress(range(total), "epoch 1/2", total, stream=log)) == list(range(total))
    out = log.getvalue().splitlines()
    assert len(out) == lines and out[-1].startswith(f"epoch 1/2: {total}/{total} it (")
    assert "\r" not in log.getvalue()


def test_progress_in_a_terminal_is_a_bar_and_can_be_silenced() -> None:
    term = _Terminal()
    list(progress(range(50), "epoch", 50, stream=term))
    assert term.getvalue().startswith("\repoch:   0%")  # a tqdm bar, redrawn in place
    quiet = _Terminal()
    with Progress(5, "grid", enabled=False, stream=quiet) as bar:
        bar.update(5)
        bar.write("run x failed")
    assert quiet.getvalue() == ""
