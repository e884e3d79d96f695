"""``scripts/grid_in_parts.sh``: one run at a time, each finished run certified, exported
and committed, and a second call resumes without redoing anything."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "grid_in_parts.sh"
GRID = """
name = "parts"
[defaults]
dataset = "mnist"
model = "lenet"
epochs = 1
train_subset = 200
test_subset = 20
eval_sigmas = 2
batch_size = 100
lr = 0.001

[[groups]]
method = "baseline"

[[groups]]
method = "gaussian"
sigma = 0.25
"""


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None or shutil.which("bash") is None,
                    reason="needs git and bash")
def test_each_finished_run_is_certified_exported_and_committed(tmp_path, data_root) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "ci@example.org")
    _git(repo, "config", "user.name", "ci")
    (repo / "parts.toml").write_text(GRID)
    _git(repo, "add", "parts.toml")
    _git(repo, "commit", "-qm", "grid")
    env = {**os.environ, "PYTHON": sys.executable, "MOMENTKIT_DATA": str(data_root),
           "PYTHONPATH": str(REPO)}
    cmd = ["bash", str(SCRIPT), "parts.toml", str(tmp_path / "results"), "out",
           "--sigma", "0.25", "--n", "50", "--n0", "10", "--test-subset", "3"]
    first = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    log = _git(repo, "log", "--format=%s").splitlines()
    # one commit per finished run, then none when nothing was left to do
    assert [s.split(", ")[1].split(" (")[0] for s in log[:-1]] == [
        "2 finished runs exported", "1 finished runs exported"]
    runs = sorted((repo / "out" / "run_results").iterdir())
    assert len(runs) == 2
    for run in runs:
        names = {p.name for p in run.iterdir()}
        assert {"results.json", "per_image.npz", "certify-sigma0.25.json"} <= names
        assert "checkpoint.pt" not in names
    assert _git(repo, "status", "--porcelain") == ""
    again = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert _git(repo, "log", "--format=%s").splitlines() == log  # nothing new to commit
