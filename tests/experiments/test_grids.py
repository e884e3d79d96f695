"""Tests of experiments.grids (grid expansion, presets, CLI) and experiments.executors
(run folders, locks, failure recording, local and Ray executors, kill and resume)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import executors
from experiments.__main__ import main
from experiments.config import RunConfig
from experiments.grids import (
    PAPER_AUGMENT_FOLDS,
    PAPER_AUGMENT_SIGMAS,
    PAPER_COMBOS,
    PAPER_MOMENT_ALPHAS,
    PAPER_MOMENT_SIGMAS,
    GridError,
    expand_spec,
    load_grid,
    load_grid_file,
    matched_epochs,
    write_manifest,
)
from experiments.report import collect_results, results_table

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


# --------------------------------------------------------------------------- expansion


@pytest.mark.parametrize(("model", "dataset"), PAPER_COMBOS)
def test_paper_presets_match_the_papers_grid(model: str, dataset: str) -> None:
    grid = load_grid(f"paper-{model}-{dataset}")
    assert grid.count_by_method() == {"baseline": 1, "augment": 20, "moment": 63}
    assert len(grid) == 84 == len(set(grid.run_ids()))
    aug = {(c.folds, c.sigma) for c in grid.configs if c.method == "augment"}
    assert aug == {(n, s) for n in PAPER_AUGMENT_FOLDS for s in PAPER_AUGMENT_SIGMAS}
    mom = {(c.alpha, c.sigma) for c in grid.configs if c.method == "moment"}
    assert mom == {(a, s) for a in PAPER_MOMENT_ALPHAS for s in PAPER_MOMENT_SIGMAS}
    assert PAPER_MOMENT_SIGMAS == (0.125, 0.25, 0.325, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)
    assert {(c.model, c.dataset, c.epochs) for c in grid.configs} == {(model, dataset, 100)}


def test_paper_all_and_shipped_presets() -> None:
    assert len(load_grid("paper-all")) == 5 * 84
    assert len(load_grid("paper-lenet-cifar10", epochs=3).configs[0:1]) == 1
    assert {c.epochs for c in load_grid("paper-lenet-cifar10", epochs=3).configs} == {3}
    reduced = load_grid("reduced-cpu")
    assert reduced.count_by_method() == {"baseline": 1, "augment": 4, "moment": 8}
    assert len(load_grid("tiny")) == 3
    with pytest.raises(GridError, match="neither a preset"):
        load_grid("no-such-grid")


def test_toml_and_yaml_files_expand_to_the_same_runs(tmp_path: Path) -> None:
    toml = tmp_path / "g.toml"
    toml.write_text(
        'name = "g"\n[defaults]\ndataset = "mnist"\nmodel = "lenet"\nepochs = [1, 2]\n'
        '[[groups]]\nmethod = "baseline"\n'
        '[[groups]]\nmethod = "moment"\nalpha = [0.5, 1.0, 2.0]\nsigma = [0.25, 4.0]\n'
    )
    yml = tmp_path / "g.yaml"
    yml.write_text(
        "name: g\ndefaults: {dataset: mnist, model: lenet, epochs: [1, 2]}\ngroups:\n"
        "  - {method: baseline}\n  - {method: moment, alpha: [0.5, 1.0, 2.0], sigma: [0.25, 4.0]}\n"
    )
    g1, g2 = load_grid_file(toml), load_grid(str(yml))
    # every list is an axis: 2 epochs x (1 baseline + 3 alphas x 2 sigmas)
    assert len(g1) == 2 * (1 + 3 * 2)
    assert g1.run_ids() == g2.run_ids()


def test_duplicates_are_kept_once() -> None:
    spec = {
        "name": "d",
        "defaults": {"dataset": "mnist", "model": "lenet"},
        "groups": [{"method": "baseline"}, {"method": "baseline", "epochs": 100}],
    }
    assert len(expand_spec(spec)) == 1


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"groups": [{"method": "baseline"}]}, "missing 'name'"),
        ({"name": "x", "groups": []}, "'groups' must be a non-empty list"),
        ({"name": "x", "extra": 1, "groups": [{}]}, "unknown top-level key"),
        (
            {"name": "x", "groups": [{"method": "baseline", "sigmas": 1}]},
            r"unknown key\(s\) \['sigmas'\]",
        ),
        ({"name": "x", "defaults": {"modle": "lenet"}, "groups": [{}]}, r"\[defaults\]: unknown"),
        (
            {"name": "x", "groups": [{"method": "moment", "alpha": []}]},
            "axis 'alpha' is an empty list",
        ),
        (
            {"name": "x", "groups": [{"dataset": "mnist", "model": "lenet", "method": "moment"}]},
            "invalid run",
        ),
    ],
)
def test_malformed_specs_raise_grid_error(spec: dict, message: str) -> None:
    with pytest.raises(GridError, match=message):
        expand_spec(spec)


def test_bad_grid_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [")
    with pytest.raises(GridError, match="not valid TOML"):
        load_grid_file(bad)
    other = tmp_path / "g.json"
    other.write_text("{}")
    with pytest.raises(GridError, match="must end in"):
        load_grid_file(other)


def test_run_ids_are_stable_across_processes_and_key_order() -> None:
    grid = load_grid("reduced-cpu")
    code = (
        "from experiments.grids import load_grid; "
        "print(' '.join(load_grid('reduced-cpu').run_ids()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.split() == grid.run_ids()
    cfg = grid.configs[3]
    reordered = dict(reversed(list(cfg.to_dict().items())))
    assert RunConfig.from_dict(reordered).run_id() == cfg.run_id()
    # a different seed is a different run
    assert grid.with_overrides(seed=1).run_ids()[0] != grid.run_ids()[0]


def test_matched_compute_epochs_by_hand() -> None:
    ref = {"method": "augment", "folds": 6, "epochs": 3}
    moment = {"method": "moment"}
    # 3 epochs of 6-fold augmentation = 18 passes over the training set
    assert matched_epochs(ref, moment, "gradient_steps") == 18
    # a regularizer step costing 2.8 plain steps: round(18 / 2.8) = 6 epochs
    assert matched_epochs(ref, moment, "wall_time", 2.8) == 6
    # cost ratio is ignored when matching gradient steps
    assert matched_epochs(ref, moment, "gradient_steps", 2.8) == 18
    assert matched_epochs(ref, {"method": "augment", "folds": 2}, "gradient_steps") == 9
    assert matched_epochs({"method": "baseline", "epochs": 1}, moment, "wall_time", 5.0) == 1
    with pytest.raises(GridError, match="matched.by"):
        matched_epochs(ref, moment, "flops")
    with pytest.raises(GridError, match="cost_ratio"):
        matched_epochs(ref, moment, "wall_time", 0.0)


def test_matched_group_expands_and_records_its_pair(tmp_path: Path) -> None:
    spec = {
        "name": "m",
        "defaults": {"dataset": "mnist", "model": "lenet", "epochs": 3},
        "groups": [
            {"method": "augment", "folds": 6, "sigma": 0.5},
            {
                "method": "moment",
                "alpha": 1.0,
                "sigma": 0.5,
                "matched": {
                    "method": "augment",
                    "folds": 6,
                    "epochs": 3,
                    "by": "wall_time",
                    "cost_ratio": 2.0,
                },
            },
        ],
    }
    grid = expand_spec(spec)
    aug, mom = grid.configs
    assert mom.epochs == 9
    assert [(m.run_id, m.reference_run_id, m.by) for m in grid.matched] == [
        (mom.run_id(), aug.run_id(), "wall_time")
    ]
    manifest = json.loads(write_manifest(grid, tmp_path).read_text())
    assert manifest["matched"][0]["reference_run_id"] == aug.run_id()
    # the pair follows a seed override
    reseeded = grid.with_overrides(seed=4)
    assert reseeded.matched[0].reference_run_id == reseeded.configs[0].run_id()
    # a reference the grid does not train is an error
    spec["groups"] = spec["groups"][1:]
    with pytest.raises(GridError, match="not part of the grid"):
        expand_spec(spec)


# --------------------------------------------------------------------------- run folders


def fake_train(config: RunConfig, out_dir: Path, **_: object) -> dict:
    """Stand-in for run_training: writes a complete result derived from the run id."""
    rng = np.random.default_rng(int(config.run_id(), 16) % 2**32)
    robust = rng.random((3, 10)) < 0.7
    correct = rng.random(10) < 0.9
    np.savez(Path(out_dir) / "per_image.npz", correct=correct, robust=robust)
    res = {
        "config": config.to_dict(),
        "run_id": config.run_id(),
        "test_accuracy": float(correct.mean()),
        "robustness": {"sigmas": [0.0, 0.25, 0.5], "curve": robust.mean(1).tolist(), "auc": 0.5},
    }
    (Path(out_dir) / "results.json").write_text(json.dumps(res))
    return res


class Recorder:
    """fake_train that counts calls and fails on chosen run ids."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.calls: list[str] = []
        self.fail = fail or set()

    def __call__(self, config: RunConfig, out_dir: Path, **kw: object) -> dict:
        self.calls.append(config.run_id())
        if config.run_id() in self.fail:
            raise RuntimeError(f"injected failure of {config.run_id()}")
        return fake_train(config, out_dir, **kw)


def _small_grid() -> list[RunConfig]:
    base = {"dataset": "mnist", "model": "lenet", "epochs": 1}
    return [
        RunConfig(**base, method="baseline"),
        RunConfig(**base, method="moment", alpha=1.0, sigma=0.5),
        RunConfig(**base, method="augment", folds=2, sigma=0.5),
    ]


def test_finished_runs_are_skipped(tmp_path: Path) -> None:
    configs = _small_grid()
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
    configs = _small_grid()
    bad = configs[1].run_id()
    rec = Recorder(fail={bad})
    outcomes = executors.run_local(configs, tmp_path, train_fn=rec, progress=False)
    assert [o.status for o in outcomes] == ["done", "failed", "done"]  # the grid went on
    rdir = executors.run_dir(tmp_path, bad)
    err = json.loads((rdir / "error.json").read_text())
    assert err["attempts"] == 1 and "injected failure" in err["error"]
    assert "RuntimeError: injected failure" in (rdir / "traceback.txt").read_text()
    assert executors.run_state(rdir) == "failed"
    assert not (rdir / executors.LOCK_NAME).exists()
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
    cfg = _small_grid()[0]
    outcome = executors.run_one(cfg, tmp_path, train_fn=lambda *a, **k: {})
    assert outcome.status == "failed" and "no complete result" in outcome.error


# --------------------------------------------------------------------------- locks


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(rdir: Path, pid: int, host: str, age_s: float = 0.0) -> None:
    rdir.mkdir(parents=True, exist_ok=True)
    path = rdir / executors.LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": host, "started": "then", "token": "old"}))
    then = time.time() - age_s
    os.utime(path, (then, then))


def test_a_claimed_run_cannot_be_claimed_again(tmp_path: Path) -> None:
    rdir = tmp_path / "r"
    lock = executors.claim_run(rdir)
    assert lock is not None and lock.owned()
    assert executors.claim_run(rdir) is None
    assert executors.run_state(rdir) == "running"
    # a busy run is reported, not trained
    rec = Recorder()
    cfg = _small_grid()[0]
    rdir_cfg = executors.run_dir(tmp_path, cfg)
    held = executors.claim_run(rdir_cfg)
    assert executors.run_one(cfg, tmp_path, train_fn=rec).status == "busy"
    assert rec.calls == []
    held.release()
    lock.release()
    assert not (rdir / executors.LOCK_NAME).exists()
    assert executors.run_state(rdir) == "pending"


def test_concurrent_claims_have_one_winner(tmp_path: Path) -> None:
    rdir = tmp_path / "r"
    barrier = threading.Barrier(8)
    won = []

    def claim() -> None:
        barrier.wait()
        lock = executors.claim_run(rdir)
        if lock is not None:
            won.append(lock)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    won[0].release()


def test_stale_locks_are_broken(tmp_path: Path) -> None:
    host = socket.gethostname()
    # a killed worker on this host: its pid is gone
    dead = tmp_path / "dead"
    _write_lock(dead, _dead_pid(), host)
    assert executors.run_state(dead) == "pending"
    lock = executors.claim_run(dead)
    assert lock is not None and lock.owned()
    lock.release()
    # a worker on another host with a fresh heartbeat holds its run
    remote = tmp_path / "remote"
    _write_lock(remote, 1, "other-host.invalid")
    assert executors.run_state(remote) == "running"
    assert executors.claim_run(remote, stale_after_s=600) is None
    # ... until its heartbeat is older than stale_after
    _write_lock(remote, 1, "other-host.invalid", age_s=700)
    assert executors.run_state(remote, stale_after_s=600) == "pending"
    lock = executors.claim_run(remote, stale_after_s=600)
    assert lock is not None
    lock.release()
    # a live process on this host keeps its lock however old its heartbeat... up to stale_after
    live = tmp_path / "live"
    _write_lock(live, os.getpid(), host, age_s=10)
    assert executors.claim_run(live, stale_after_s=600) is None


def test_heartbeat_refreshes_the_lock(tmp_path: Path) -> None:
    rdir = tmp_path / "r"
    lock = executors.claim_run(rdir, heartbeat_s=0.05)
    path = rdir / executors.LOCK_NAME
    os.utime(path, (0, 0))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 5
    lock.release()


# --------------------------------------------------------------------------- status and CLI


def test_status_command_counts_states(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    grid_file = tmp_path / "g.toml"
    grid_file.write_text(
        'name = "g"\n[defaults]\ndataset = "mnist"\nmodel = "lenet"\nepochs = 1\n'
        '[[groups]]\nmethod = "baseline"\n[[groups]]\nmethod = "augment"\nfolds = [2, 6]\n'
        "sigma = 0.5\n"
    )
    grid = load_grid_file(grid_file)
    results = tmp_path / "res"
    write_manifest(grid, results)
    fake_train(grid.configs[0], _mkdir(executors.run_dir(results, grid.configs[0])))
    executors.run_one(grid.configs[1], results, train_fn=Recorder(fail={grid.run_ids()[1]}))
    assert main(["grid", "status", str(results)]) == 0
    out = capsys.readouterr().out
    assert "done=1 running=0 failed=1 pending=1 total=3" in out
    assert "injected failure" in out
    assert main(["grid", "status", str(grid_file), "--results-dir", str(results)]) == 0
    assert "done=1 running=0 failed=1 pending=1 total=3" in capsys.readouterr().out
    assert main(["grid", "run", str(grid_file), "--dry-run", "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    assert all(rid in out for rid in grid.run_ids())
    assert main(["grid", "list"]) == 0
    assert "paper-lenet-mnist" in capsys.readouterr().out


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


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


def test_local_executor_with_two_workers(uninterrupted: Path, tiny_grid_file: Path) -> None:
    grid = load_grid_file(tiny_grid_file)
    assert executors.scan_states(uninterrupted) == {rid: "done" for rid in grid.run_ids()}
    for rid in grid.run_ids():
        rdir = executors.run_dir(uninterrupted, rid)
        assert not (rdir / executors.LOCK_NAME).exists()
        res = json.loads((rdir / "results.json").read_text())
        assert res["run_id"] == rid and res["epochs_run"] == 2


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


def test_export_copies_results_but_not_checkpoints(tmp_path: Path) -> None:
    configs = _small_grid()
    results = tmp_path / "res"
    executors.run_local(configs, results, train_fn=Recorder(), progress=False)
    (executors.run_dir(results, configs[0]) / "checkpoint.pt").write_bytes(b"x" * 100)
    write_manifest(load_grid("tiny"), results)
    dest = tmp_path / "docs"
    assert main(["grid", "export", str(results), str(dest)]) == 0
    names = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    expected = [
        f"run_results/{c.run_id()}/{f}"
        for c in configs
        for f in ("config.json", "per_image.npz", "results.json")
    ]
    assert names == sorted(expected + ["grids/tiny.json"])
    assert sorted(r.run_id for r in collect_results(dest)) == sorted(c.run_id() for c in configs)
