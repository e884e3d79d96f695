"""Tests of experiments.training (and its parts: rundata, trainstate, checkpoints,
evaluation): short real runs, resume after a crash, checkpoint errors, divergence,
degenerate predictions, subsets larger than their data set."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments import rundir, training
from experiments.checkpoints import CheckpointError, best_model_from_checkpoint, load_checkpoint
from experiments.config import RunConfig
from experiments.data import ImageSet
from experiments.evaluation import default_sigmas, degenerate_predictions, evaluate_model
from experiments.rundata import prepare_test_data
from experiments.training import RESULT_KEYS, RunDiverged, check_finite, run_training
from experiments.trainstate import EarlyStopping

# Small enough for CI, large enough to clearly beat chance (0.1) after one epoch.
SHORT = dict(dataset="mnist", model="lenet", epochs=1, train_subset=600, batch_size=20,
             lr=1e-3, test_subset=200, eval_sigmas=4)
METHOD_PARAMS = {
    "baseline": {},
    "moment": dict(sigma=0.5, alpha=1.0),
    "augment": dict(sigma=0.5, folds=2),
}


@pytest.fixture(scope="module")
def short_runs(mnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("runs")
    runs = {}
    for method, extra in METHOD_PARAMS.items():
        config = RunConfig(method=method, **SHORT, **extra)
        runs[method] = (config, out / method,
                        run_training(config, out / method, data_root=mnist_root, progress=False))
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHOD_PARAMS))
def test_short_run_learns_and_writes_results(short_runs: dict, method: str) -> None:
    config, out, results = short_runs[method]
    assert results["test_accuracy"] > 0.5
    assert set(RESULT_KEYS) <= set(results)
    assert results["run_id"] == config.run_id() and results["config"] == config.to_dict()
    assert results["epochs_run"] == 1 and results["best_epoch"] == 1
    assert results["gradient_steps"] == 27 * (config.folds if method == "augment" else 1)
    entry = results["history"][0]
    assert {"train_loss", "val_loss", "val_accuracy", "lr", "seconds"} <= set(entry)
    assert entry["lr"] == 1e-3 and np.isfinite(entry["val_loss"])
    rob = results["robustness"]
    assert len(rob["sigmas"]) == len(rob["curve"]) == 4 and rob["curve"][0] == 1.0
    assert rob["ci"][0] <= rob["auc"] <= rob["ci"][1]
    assert json.loads((out / "results.json").read_text()) == results
    assert results["degenerate_predictions"]["flagged"] is False
    assert 0.1 <= results["degenerate_predictions"]["top_class_fraction"] < 0.9
    with np.load(out / "per_image.npz") as per_image:
        assert per_image["correct"].shape == (200,) and per_image["correct"].dtype == bool
        assert per_image["robust"].shape == (4, 200) and per_image["robust"].dtype == bool
        assert per_image["correct"].mean() == pytest.approx(results["test_accuracy"])


@pytest.mark.slow
def test_finished_run_is_returned_without_work(
    short_runs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, out, results = short_runs["baseline"]

    def fail(*args, **kwargs):
        raise AssertionError("a finished run must not load data or train again")

    monkeypatch.setattr(training, "prepare_data", fail)
    assert run_training(config, out, progress=False) == results


@pytest.mark.slow
def test_evaluate_model_reproduces_the_results(short_runs: dict, mnist_root: Path) -> None:
    config, out, results = short_runs["moment"]
    _, model = best_model_from_checkpoint(load_checkpoint(out / "checkpoint.pt"))
    evaluation = evaluate_model(
        model, prepare_test_data(config, mnist_root), sigmas=default_sigmas(config.eval_sigmas)
    )
    assert evaluation["test_accuracy"] == results["test_accuracy"]
    assert evaluation["robustness"] == results["robustness"]


@pytest.mark.slow
def test_other_results_in_out_dir_are_refused(short_runs: dict) -> None:
    config, out, _ = short_runs["baseline"]
    other = RunConfig.from_dict({**config.to_dict(), "seed": 1})
    with pytest.raises(ValueError, match="another run"):
        run_training(other, out, progress=False)


# ------------------------------------------------------------------------ resume

TINY = dict(dataset="mnist", model="lenet", method="baseline", train_subset=300,
            batch_size=30, lr=1e-3, test_subset=50, eval_sigmas=3)


def _comparable(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in history]


def _assert_same_run(a: Path, b: Path) -> None:
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert _comparable(ra["history"]) == _comparable(rb["history"])
    assert ra["test_accuracy"] == rb["test_accuracy"] and ra["robustness"] == rb["robustness"]
    assert ra["gradient_steps"] == rb["gradient_steps"]
    ca, cb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key
    for key, state in ca["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], cb["optimizer"]["state"][key]["exp_avg"])


@pytest.mark.slow
def test_resume_after_interruption_matches_an_uninterrupted_run(
    mnist_root: Path, tmp_path: Path
) -> None:
    two = RunConfig(epochs=2, **TINY)
    run_training(two, tmp_path / "straight", data_root=mnist_root, progress=False)

    # 1) a run with epochs=1, then the same run extended to epochs=2
    run_training(RunConfig(epochs=1, **TINY), tmp_path / "extended", data_root=mnist_root,
                 progress=False)
    run_training(two, tmp_path / "extended", data_root=mnist_root, progress=False)
    _assert_same_run(tmp_path / "straight", tmp_path / "extended")

    # 2) a crash right after epoch 1's checkpoint, then a plain restart
    def crash(epoch: int, entry: dict) -> None:
        if epoch == 1:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        run_training(two, tmp_path / "crashed", data_root=mnist_root, progress=False,
                     on_epoch_end=crash)
    assert not (tmp_path / "crashed" / "results.json").exists()
    assert load_checkpoint(tmp_path / "crashed" / "checkpoint.pt")["epoch"] == 1
    run_training(two, tmp_path / "crashed", data_root=mnist_root, progress=False)
    _assert_same_run(tmp_path / "straight", tmp_path / "crashed")

    # a checkpoint of another run is refused and left as it was
    (tmp_path / "other").mkdir()
    shutil.copy(tmp_path / "straight" / "checkpoint.pt", tmp_path / "other" / "checkpoint.pt")
    before = (tmp_path / "other" / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match="another run"):
        run_training(RunConfig(epochs=2, **{**TINY, "seed": 1}), tmp_path / "other",
                     data_root=mnist_root, progress=False)
    assert (tmp_path / "other" / "checkpoint.pt").read_bytes() == before
    # and one with more epochs than asked for as well
    with pytest.raises(CheckpointError, match="more than epochs=1"):
        run_training(RunConfig(epochs=1, **TINY), tmp_path / "other", data_root=mnist_root,
                     progress=False)


def test_corrupt_checkpoint_is_reported_and_left_intact(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"\x00garbage, not a checkpoint")
    with pytest.raises(CheckpointError) as info:
        run_training(RunConfig(epochs=1, **TINY), tmp_path, progress=False)
    assert str(path) in str(info.value) and "untouched" in str(info.value)
    assert path.read_bytes() == b"\x00garbage, not a checkpoint"


def test_checkpoint_without_training_state_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(CheckpointError, match="not a momentkit training checkpoint"):
        load_checkpoint(path)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None,
                    reason="tensorboard is installed; the missing-package error cannot occur")
def test_tensorboard_missing_is_a_clear_error(mnist_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ImportError, match="pip install 'momentkit\\[tensorboard\\]'"):
        run_training(RunConfig(epochs=1, **TINY), tmp_path / "run", data_root=mnist_root,
                     progress=False, tensorboard=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_alexnet_on_a_tiny_cifar10_tree_runs_end_to_end(data_root: Path, tmp_path: Path) -> None:
    # 3-channel data, the SGD preset and the moment loss through AlexNet: a smoke test of
    # the plumbing (20 images cannot test learning)
    source = data_root / "cifar10-jpeg"
    if not source.is_dir():
        pytest.skip(f"cifar10-jpeg not found under {data_root}")
    for split in ("train", "test"):
        for cls in sorted(p.name for p in (source / split).iterdir()):
            (tmp_path / "data" / "cifar10-jpeg" / split / cls).mkdir(parents=True)
            first = sorted((source / split / cls).iterdir())[:2]
            for path in first:
                shutil.copy(path, tmp_path / "data" / "cifar10-jpeg" / split / cls / path.name)
    config = RunConfig("cifar10", "alexnet", "moment", sigma=0.25, alpha=1.0, epochs=1,
                       batch_size=8, lr=0.01, eval_sigmas=3)
    results = run_training(config, tmp_path / "run", data_root=tmp_path / "data",
                           progress=False)
    assert results["n_test"] == 20 and results["gradient_steps"] == 3  # 18 images / 8
    assert np.isfinite(results["history"][0]["train_loss"])
    assert results["history"][0]["train_moment_loss"] > 0


# ------------------------------------------------------------------------ divergence


@pytest.mark.parametrize(
    "method",
    ["baseline", pytest.param("moment", marks=pytest.mark.slow),
     pytest.param("augment", marks=pytest.mark.slow)],
)
def test_nan_from_the_first_epoch_stops_the_run(
    mnist_root: Path, tmp_path: Path, method: str
) -> None:
    """The reported case (lr 1e30): every loss is NaN. Before, the run finished with
    accuracy 0.08, robustness 1.0 and NaN tokens in results.json; with the regularizer it
    ended in "relu_mean: var contains inf", an input error, exit 2."""
    config = RunConfig(epochs=3, **{**TINY, "lr": 1e30, "train_subset": 100, "batch_size": 50,
                                    "method": method, **METHOD_PARAMS[method]})
    with pytest.raises(RunDiverged, match=r"^run diverged at epoch 1 \(loss nan\)"):
        run_training(config, tmp_path, data_root=mnist_root, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [rundir.ERROR_FILE]
    err = rundir.read_error(tmp_path)
    assert (err["kind"], err["epoch"], err["attempts"]) == ("diverged", 1, 1)
    assert err["error"].startswith("run diverged at epoch 1 (loss nan)")


@pytest.mark.slow
def test_divergence_keeps_the_last_good_checkpoint(
    mnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loss turns NaN in epoch 2: epoch 1's checkpoint stays as it was."""
    calls = [0]
    batch_loss = training._batch_loss

    def nan_after_epoch_1(model, config, x, y):
        calls[0] += 1
        loss, moment = batch_loss(model, config, x, y)
        return (loss * float("nan") if calls[0] > 2 else loss), moment  # 90 images / 50

    monkeypatch.setattr(training, "_batch_loss", nan_after_epoch_1)
    small = {**TINY, "train_subset": 100, "batch_size": 50}
    config = RunConfig(epochs=3, **small)
    epochs = []
    with pytest.raises(RunDiverged, match=r"at epoch 2 \(loss nan\); the checkpoint of epoch 1"):
        run_training(config, tmp_path, data_root=mnist_root, progress=False,
                     on_epoch_end=lambda epoch, entry: epochs.append(epoch))
    assert epochs == [1]
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 1 and len(state["history"]) == 1
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values())
    assert not (tmp_path / "results.json").exists()
    assert rundir.read_error(tmp_path)["epoch"] == 2
    # a later success clears the record
    monkeypatch.setattr(training, "_batch_loss", batch_loss)
    results = run_training(RunConfig(epochs=2, **small), tmp_path, data_root=mnist_root,
                           progress=False)
    assert results["epochs_run"] == 2 and rundir.read_error(tmp_path) is None


def test_check_finite_names_what_diverged() -> None:
    model = torch.nn.Linear(2, 2)
    assert check_finite(model, 0.5, 0.4) is None
    assert check_finite(model, math.inf, None) == "loss inf"
    assert check_finite(model, 0.5, math.nan) == "loss 0.5, validation loss nan"
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    assert check_finite(model, 0.5, 0.4) == "loss 0.5, non-finite parameters"


def test_early_stopping_counts_epochs_without_a_strictly_lower_loss() -> None:
    stop = EarlyStopping(patience=2)
    assert stop.step(1, 1.0) and not stop.step(2, 1.0)  # equal is not better
    assert stop.step(3, 0.5) and stop.bad_epochs == 0
    assert not stop.step(4, 0.7) and not stop.stopped
    assert not stop.step(5, 0.6) and stop.stopped and stop.best_epoch == 3
    again = EarlyStopping.from_state_dict(2, stop.state_dict())
    assert again == stop
    # the checkpoint entry keeps the keys of format 1 (older checkpoints still resume)
    assert set(stop.state_dict()) == {"best_val_loss", "best_epoch", "bad_epochs", "stopped"}


# ------------------------------------------------------------------------ degenerate models


class _Constant(torch.nn.Module):
    """Logits that favour ``label`` whatever the input: Eq. 6 calls it perfectly robust."""

    def __init__(self, label: int) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.nn.functional.one_hot(torch.tensor(label), 10).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], 10) + 0 * x.flatten(1)[:, :1]


def test_a_constant_classifier_is_flagged() -> None:
    gen = torch.Generator().manual_seed(0)
    test = ImageSet(torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8, generator=gen),
                    torch.arange(40) % 10)
    evaluation = evaluate_model(_Constant(3), test, sigmas=default_sigmas(3))
    assert evaluation["robustness"]["auc"] == 1.0  # what Eq. 6 gives it
    assert evaluation["degenerate_predictions"] == {"flagged": True, "top_class_fraction": 1.0}
    assert evaluation["test_accuracy"] == 0.1


def test_degenerate_threshold() -> None:
    # 9 of 10 in one class is at the threshold (>= 0.9), 8 of 10 is below it
    assert degenerate_predictions(np.array([1] * 9 + [2]))["flagged"] is True
    assert degenerate_predictions(np.array([1] * 8 + [2, 3])) == {
        "flagged": False, "top_class_fraction": 0.8}
    assert degenerate_predictions(np.array([], dtype=int))["flagged"] is False


# ------------------------------------------------------------------------ input checks


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("train_subset", 60_001, "train_subset (--train-subset): 60001 images requested, but "
         "the mnist training set has only 60000"),
        ("test_subset", 10_001, "test_subset (--test-subset): 10001 images requested, but "
         "the mnist test set has only 10000"),
    ],
)
def test_a_subset_larger_than_its_data_set_is_refused(
    mnist_root: Path, tmp_path: Path, field: str, value: int, message: str
) -> None:
    """Before, the whole set was used silently while the config recorded the request."""
    config = RunConfig(epochs=1, **{**TINY, field: value})
    with pytest.raises(ValueError) as info:
        run_training(config, tmp_path / "run", data_root=mnist_root, progress=False)
    assert str(info.value) == message
    assert not (tmp_path / "run").exists()


def test_an_unusable_device_or_a_file_as_out_dir_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="device 'tpu9' is not usable here"):
        run_training(RunConfig(epochs=1, **TINY), tmp_path / "run", device="tpu9")
    assert not (tmp_path / "run").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        run_training(RunConfig(epochs=1, **TINY), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


def test_batch_loss_uses_the_configured_surrogate() -> None:
    """``moments="network"`` reaches the regularizer: the moment term is the cross-entropy of
    the whole-network mean, not of the first-ReLU surrogate."""
    import torch.nn.functional as F

    from experiments.config import RunConfig
    from experiments.models import make_model
    from experiments.training import _batch_loss
    from momentkit.regularizer import expected_prediction

    torch.manual_seed(0)
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([3, 7])
    for moments in ("first_relu", "network"):
        config = RunConfig("mnist", "lenet", "moment", sigma=0.5, alpha=1.0, moments=moments)
        model = make_model(config)
        _, term = _batch_loss(model, config, x, y)
        want = F.cross_entropy(expected_prediction(model, x, 0.5, moments=moments).surrogate, y)
        assert torch.allclose(term, want.detach(), rtol=1e-5, atol=1e-6)
