"""Tests of experiments.executors: running grids' runs once each, recording failures and
divergences, the local (in-process and process pool) and Ray executors, kill and resume."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import executors, locks, rundir
from experiments.__main__ import main
from experiments.config import RunConfig
from experiments.grids import load_grid_file
from experiments.report import collect_results, results_table
from tests.experiments.fakes import Recorder, small_grid

REPO = Path(__file__).resolve().parents[2]
# a tiny real grid: 3 runs of 2 epochs on 300 MNIST images, seconds each on a CPU
TINY_TOML = """
name = "test-tiny"
[defaults]
dataset = "mnist"
model = "lenet"
epochs = 2
train_subset = 300
test_subset = 100
eval_sigmas = 4
batch_size = 100
lr = 0.001

[[groups]]
method = "baseline"

[[groups]]
method = "moment"
alpha = 1.0
sigma = 0.5

[[groups]]
method = "augment"
folds = 2
sigma = 0.5
"""
# the columns that a deterministic training must reproduce exactly
RESULT_COLUMNS = ("run_id", "test_accuracy", "robustness_auc", "epochs_run", "gradient_steps")


def _table(results_dir: Path) -> list[tuple]:
    rows = results_table(collect_results(results_dir))
    return [tuple(row[c] for c in RESULT_COLUMNS) for row in rows]


# --------------------------------------------------------------------------- run_one


def test_finished_runs_are_skipped(tmp_path: Path) -> None:
    configs = small_grid()
    rec = Recorder()
    first = executors.run_local(configs, tmp_path, train_fn=rec, progress=False)
    assert [o.status for o in first] == ["done"] * 3
    assert rec.calls == [c.run_id() for c in configs]
    assert executors.scan_states(tmp_path) == {c.run_id(): "done" for c in configs}
    again = executors.run_local(configs, tmp_path, train_fn=rec, progress=False)
    assert again == [] and len(rec.calls) == 3
    # run_one on a finished run does not train either
    assert executors.run_one(configs[0], tmp_path, train_fn=rec).status == "skipped"
    assert len(rec.calls) == 3
    saved = json.loads((executors.run_dir(tmp_path, configs[1]) / "config.json").read_text())
    assert RunConfig.from_dict(saved) == configs[1]


def test_failed_run_is_recorded_and_retried(tmp_path: Path) -> None:
    configs = small_grid()
    bad = configs[1].run_id()
    rec = Recorder(fail={bad})
    outcomes = executors.run_local(configs, tmp_path, train_fn=rec, progress=False)
    assert [o.status for o in outcomes] == ["done", "failed", "done"]  # the grid went on
    rdir = executors.run_dir(tmp_path, bad)
    err = json.loads((rdir / "error.json").read_text())
    assert err["attempts"] == 1 and "injected failure" in err["error"]
    assert err["kind"] == "exception" and err["epoch"] is None
    assert "RuntimeError: injected failure" in (rdir / "traceback.txt").read_text()
    assert executors.run_state(rdir) == "failed"
    assert not (rdir / locks.LOCK_NAME).exists()
    # still failing: the attempt counter grows
    executors.run_local(configs, tmp_path, train_fn=rec, progress=False)
    assert json.loads((rdir / "error.json").read_text())["attempts"] == 2
    # fixed: the next grid run retries only the failed run and clears the record
    rec.fail.clear()
    outcomes = executors.run_local(configs, tmp_path, train_fn=rec, progress=False)
    assert [(o.run_id, o.status) for o in outcomes] == [(bad, "done")]
    assert executors.run_state(rdir) == "done"
    assert not (rdir / "error.json").exists() and not (rdir / "traceback.txt").exists()


def test_training_that_writes_nothing_counts_as_failed(tmp_path: Path) -> None:
    cfg = small_grid()[0]
    outcome = executors.run_one(cfg, tmp_path, train_fn=lambda *a, **k: {})
    assert outcome.status == "failed" and "no complete result" in outcome.error


def test_a_busy_run_is_reported_not_trained(tmp_path: Path) -> None:
    rec = Recorder()
    cfg = small_grid()[0]
    held = locks.claim_run(locks.run_dir(tmp_path, cfg))
    assert executors.run_one(cfg, tmp_path, train_fn=rec).status == "busy"
    assert rec.calls == []
    held.release()


@pytest.mark.slow
def test_a_diverged_run_is_failed_not_done(mnist_root: Path, tmp_path: Path) -> None:
    """A real training at lr 1e30: NaN in the first epoch. Before, the grid marked the run
    done with a perfect robustness; now it is failed with kind "diverged" and no results."""
    cfg = RunConfig("mnist", "lenet", "baseline", epochs=2, train_subset=100, batch_size=50,
                    lr=1e30, test_subset=20, eval_sigmas=2)
    outcomes = executors.run_local([cfg], tmp_path, data_root=str(mnist_root), progress=False)
    assert [o.status for o in outcomes] == ["failed"]
    assert "run diverged at epoch 1 (loss nan)" in outcomes[0].error
    rdir = locks.run_dir(tmp_path, cfg)
    assert locks.run_state(rdir) == "failed"
    err = rundir.read_error(rdir)
    assert (err["kind"], err["epoch"], err["attempts"]) == ("diverged", 1, 1)
    assert "RunDiverged" in (rdir / rundir.TRACEBACK_FILE).read_text()
    assert not (rdir / rundir.RESULTS_FILE).exists() and collect_results(tmp_path) == []
    # a retry counts one more attempt, once
    executors.run_local([cfg], tmp_path, data_root=str(mnist_root), progress=False)
    assert rundir.read_error(rdir)["attempts"] == 2


def test_error_records_count_attempts_and_are_strict_json(tmp_path: Path) -> None:
    first = rundir.record_error(tmp_path, "boom", "exception", traceback_text="tb")
    assert (first["attempts"], first["kind"], first["epoch"]) == (1, "exception", None)
    second = rundir.record_error(tmp_path, "nan loss", "diverged", 4, loss="nan")
    assert rundir.read_error(tmp_path) == second
    assert (second["attempts"], second["epoch"], second["loss"]) == (2, 4, "nan")
    assert (tmp_path / rundir.TRACEBACK_FILE).read_text() == "tb"
    with pytest.raises(ValueError, match="kind"):
        rundir.record_error(tmp_path, "x", "other")
    with pytest.raises(ValueError):  # strict JSON: NaN is refused, nothing is written
        rundir.record_error(tmp_path, "x", "diverged", 5, loss=float("nan"))
    assert rundir.read_error(tmp_path) == second
    rundir.clear_error(tmp_path)
    assert rundir.read_error(tmp_path) is None
    assert not (tmp_path / rundir.TRACEBACK_FILE).exists()


def test_grid_progress_in_a_log_is_one_line_per_run(tmp_path: Path) -> None:
    err = io.StringIO()  # not a terminal: plain lines instead of bar refreshes
    sys_err, sys.stderr = sys.stderr, err
    try:
        executors.run_local(small_grid(), tmp_path, train_fn=Recorder())
    finally:
        sys.stderr = sys_err
    lines = err.getvalue().splitlines()
    assert [line.split(" run ")[0] for line in lines] == ["grid: 1/3", "grid: 2/3", "grid: 3/3"]
    assert "\r" not in err.getvalue()


# --------------------------------------------------------------------------- real tiny grids



@pytest.fixture(scope="module")
def tiny_grid_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("grid") / "tiny.toml"
    path.write_text(TINY_TOML)
    return path


@pytest.fixture(scope="module")
def uninterrupted(
    tiny_grid_file: Path, tmp_path_factory: pytest.TempPathFactory, mnist_root: Path
) -> Path:
    """The tiny grid run without interruption by the local executor with 2 workers."""
    results = tmp_path_factory.mktemp("uninterrupted")
    grid = load_grid_file(tiny_grid_file)
    outcomes = executors.run_local(
        grid.configs,
        results,
        workers=2,
        threads_per_worker=1,
        data_root=str(mnist_root),
        progress=False,
    )
    assert sorted(o.status for o in outcomes) == ["done"] * 3, outcomes
    return results


@pytest.mark.slow
def test_local_executor_with_two_workers(uninterrupted: Path, tiny_grid_file: Path) -> None:
    grid = load_grid_file(tiny_grid_file)
    assert executors.scan_states(uninterrupted) == {rid: "done" for rid in grid.run_ids()}
    for rid in grid.run_ids():
        rdir = executors.run_dir(uninterrupted, rid)
        assert not (rdir / locks.LOCK_NAME).exists()
        res = json.loads((rdir / "results.json").read_text())
        assert res["run_id"] == rid and res["epochs_run"] == 2


@pytest.mark.slow
def test_grid_killed_mid_run_resumes_to_the_same_table(
    uninterrupted: Path, tiny_grid_file: Path, tmp_path: Path, mnist_root: Path
) -> None:
    """Kill a `grid run` process (SIGKILL) right after the first epoch checkpoint of its
    first run, resume, and compare the final table with the uninterrupted grid."""
    results = tmp_path / "killed"
    env = {**os.environ, "MOMENTKIT_DATA": str(mnist_root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "experiments", "grid", "run", str(tiny_grid_file)]
    cmd += ["--results-dir", str(results)]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not list(results.glob("runs/*/checkpoint.pt")) and proc.poll() is None:
            assert time.time() < deadline, "the grid wrote no checkpoint within 120 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    states = executors.scan_states(results)
    assert list(states.values()).count("done") < 3, states
    # the killed worker's lock is left behind; its pid is dead, so it must not block
    assert list(results.glob("runs/*/lock.json"))
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert (
            main(
                [
                    "grid",
                    "run",
                    str(tiny_grid_file),
                    "--results-dir",
                    str(results),
                    "--data-root",
                    str(mnist_root),
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    assert set(executors.scan_states(results).values()) == {"done"}
    assert _table(results) == _table(uninterrupted)


@pytest.mark.slow
def test_ray_executor_on_a_tiny_grid(
    uninterrupted: Path, tiny_grid_file: Path, tmp_path: Path, mnist_root: Path
) -> None:
    ray = pytest.importorskip("ray", reason="Ray not installed (pip install 'momentkit[ray]')")
    grid = load_grid_file(tiny_grid_file)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # through the command line: the executor uses the Ray instance started here
        cmd = ["grid", "run", str(tiny_grid_file), "--executor", "ray", "--limit", "1"]
        cmd += ["--cpus-per-run", "1", "--results-dir", str(tmp_path)]
        assert main([*cmd, "--data-root", str(mnist_root)]) == 0
        assert ray.is_initialized()
    finally:
        ray.shutdown()
    # --limit 1: the manifest lists the grid's three runs, one of them trained
    states = executors.scan_states(tmp_path)
    assert states == {
        rid: ("done" if i == 0 else "pending") for i, rid in enumerate(grid.run_ids())
    }
    # Ray gives each 1-CPU task one thread, as the 2-worker run had: the same results
    expected = [row for row in _table(uninterrupted) if row[0] == grid.run_ids()[0]]
    assert _table(tmp_path) == expected


