"""Stand-ins for ``run_training`` used by the grid, lock and executor tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments import rundir
from experiments.config import RunConfig


def fake_train(config: RunConfig, out_dir: Path, **_: object) -> dict:
    """Writes a complete result derived from the run id (no data, no training)."""
    rng = np.random.default_rng(int(config.run_id(), 16) % 2**32)
    robust = rng.random((3, 10)) < 0.7
    correct = rng.random(10) < 0.9
    rundir.write_npz_atomic(Path(out_dir) / rundir.PER_IMAGE_FILE, correct=correct,
                            robust=robust)
    res = {
        "config": config.to_dict(),
        "run_id": config.run_id(),
        "test_accuracy": float(correct.mean()),
        "robustness": {"sigmas": [0.0, 0.25, 0.5], "curve": robust.mean(1).tolist(), "auc": 0.5},
    }
    rundir.write_json_atomic(Path(out_dir) / rundir.RESULTS_FILE, res)
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


def small_grid() -> list[RunConfig]:
    """Three one-epoch MNIST configs, one per method."""
    base = {"dataset": "mnist", "model": "lenet", "epochs": 1}
    return [
        RunConfig(**base, method="baseline"),
        RunConfig(**base, method="moment", alpha=1.0, sigma=0.5),
        RunConfig(**base, method="augment", folds=2, sigma=0.5),
    ]
