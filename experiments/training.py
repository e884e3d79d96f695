"""Training of one run: the paper's protocol (Section 4.2, Table 1).

:func:`run_training` trains the model of a :class:`~experiments.config.RunConfig` with
its method, keeps the model of the best validation loss, evaluates it on the test set
(:func:`experiments.evaluation.evaluate_model`: clean accuracy and the Eq. 6 robustness
curve) and writes the results. Its parts, in the order a run uses them:
:func:`~experiments.rundata.prepare_data` (images),
:class:`~experiments.trainstate.TrainingState` (model, optimizer, schedule, early
stopping, counters; fresh or from a checkpoint), :func:`train_one_epoch`,
:func:`validate`, :func:`check_finite` (divergence), ``TrainingState.snapshot``
(one checkpoint), :func:`make_results` and :func:`write_results`.

Protocol. A seeded 90/10 split of the training set (after ``train_subset``, if set)
gives training and validation images. Each epoch visits the training images (for
``augment``: the ``folds * n`` image/copy pairs) in a fresh permutation seeded by
``(seed, epoch)``. The per-batch loss is

* ``baseline``: ``CE(Phi(x), y)``;
* ``moment``: ``CE(Phi(x), y) + alpha * CE(Omega(mu3), y)`` (paper Eq. 3, through
  :func:`momentkit.regularizer.moment_regularized_loss`);
* ``augment``: ``CE(Phi(x~), y)`` on clean or noisy copies (:mod:`experiments.augment`).

The *validation loss* is the plain cross-entropy on the clean validation images, for
every method, so that early stopping and learning-rate decay react to the clean task.
After every epoch ``ReduceLROnPlateau`` sees the validation loss; training stops after
``loss_patience`` epochs without a strictly lower validation loss, or at ``epochs``.

Divergence. An epoch whose mean training loss, validation loss or parameters are not
finite stops the run with :class:`RunDiverged` ("run diverged at epoch E (loss nan)"):
its state is not checkpointed (the last good checkpoint stays), ``error.json`` records
``kind: "diverged"`` and no ``results.json`` is written, so the run counts as failed.

Files in the output directory (see :mod:`experiments.rundir`): ``checkpoint.pt``
(:mod:`experiments.checkpoints`, after every epoch; an unreadable one raises
:class:`~experiments.checkpoints.CheckpointError` and is left untouched),
``results.json`` (written last: configuration, run id, version, history, test accuracy,
robustness, ``degenerate_predictions``, timings), ``per_image.npz``, and ``error.json``
after a divergence.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from experiments import rundir
from experiments.augment import augmented_batches, gaussian_noise_batches
from experiments.checkpoints import (
    CheckpointError,
    best_model_from_checkpoint,
    load_checkpoint,
    resumable_checkpoint,
    write_checkpoint,
)
from experiments.cli import Progress, check_device
from experiments.config import RunConfig
from experiments.data import ImageSet, iterate_batches
from experiments.evaluation import (
    EVAL_BATCH_SIZE,
    default_sigmas,
    degenerate_warning,
    evaluate_model,
    write_evaluation,
)
from experiments.models import make_model
from experiments.rundata import TEST_SUBSET_SEED, RunData, prepare_data, prepare_test_data
from experiments.trainstate import EarlyStopping, TrainingState, make_optimizer
from momentkit.errors import MomentInputError

__all__ = [
    "RESULT_KEYS", "TEST_SUBSET_SEED", "CheckpointError", "EarlyStopping", "RunData",
    "RunDiverged", "TrainingState", "best_model_from_checkpoint", "check_finite",
    "load_checkpoint", "make_model", "make_optimizer", "make_results", "prepare_data",
    "prepare_test_data", "run_training", "train_one_epoch", "validate", "write_results",
]

RESULT_KEYS = (
    "config", "run_id", "version", "history", "epochs_run", "best_epoch", "stopped_early",
    "test_accuracy", "robustness", "wall_time_s", "train_time_s", "gradient_steps", "device",
)
"""Keys every ``results.json`` of :func:`run_training` holds (and ``n_test``,
``degenerate_predictions``, which older results lack)."""


class RunDiverged(RuntimeError):
    """Training produced a non-finite loss or parameters; the run is recorded as failed.

    ``epoch`` is the epoch that diverged; ``recorded`` is True once ``error.json`` holds it.
    """

    kind = "diverged"

    def __init__(self, epoch: int, detail: str, kept: str) -> None:
        super().__init__(f"run diverged at epoch {epoch} ({detail}); {kept}")
        self.epoch, self.detail, self.recorded = epoch, detail, False


# --------------------------------------------------------------------------- one epoch


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    digest = hashlib.sha256(f"momentkit-epoch:{seed}:{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _train_batches(config: RunConfig, train: ImageSet, batch_size: int,
                   epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    generator = _epoch_generator(config.seed, epoch)
    if config.method == "augment":
        return augmented_batches(
            train, batch_size, config.folds, config.sigma, config.seed, generator
        )
    if config.method == "gaussian":
        return gaussian_noise_batches(
            train, batch_size, config.sigma, config.seed, epoch, generator
        )
    return iterate_batches(train, batch_size, generator=generator)


def _batch_loss(
    model: nn.Module, config: RunConfig, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training loss of one batch and, for ``moment``, its moment term (detached)."""
    if config.method == "moment":
        from momentkit.regularizer import moment_regularized_loss

        total, _, moment_term = moment_regularized_loss(
            model, x, y, config.sigma, config.alpha, moments=config.moments
        )
        return total, moment_term.detach()
    return F.cross_entropy(model(x), y), None


def train_one_epoch(
    state: TrainingState, config: RunConfig, train: ImageSet, *, progress: bool = False
) -> dict[str, float]:
    """One pass of ``config``'s method over ``train``; advances ``state.epoch`` and steps.

    Returns ``{"train_loss"}`` (the mean batch loss weighted by batch size) and, for
    ``moment``, ``"train_moment_loss"``; either may be NaN or infinite if training diverged
    (``train_loss`` is NaN, and the epoch ends early, when the regularizer's moments
    cannot be computed because the parameters or the logits are no longer finite).
    """
    preset = config.preset()
    state.epoch += 1
    model, optimizer = state.model, state.optimizer
    device = next(model.parameters()).device
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    moment_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    passes = config.folds if config.method == "augment" else 1
    total = math.ceil(len(train) * passes / preset.batch_size)
    batches = _train_batches(config, train, preset.batch_size, state.epoch)
    with Progress(total, f"{config.method} epoch {state.epoch}/{config.epochs}",
                  enabled=progress, unit="batch") as bar:
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            try:
                loss, moment_term = _batch_loss(model, config, x, y)
            except MomentInputError:
                # the regularizer refuses moments that overflowed because the weights did:
                # a divergence (NaN loss) when the plain forward pass overflows as well
                if _finite_parameters(model) and _finite_logits(model, x):
                    raise
                return {"train_loss": math.nan}
            loss.backward()
            optimizer.step()
            state.steps += 1
            loss_sum += loss.detach().double() * y.shape[0]
            if moment_term is not None:
                moment_sum += moment_term.double() * y.shape[0]
            seen += y.shape[0]
            bar.update()
    out = {"train_loss": float(loss_sum) / seen}
    if config.method == "moment":
        out["train_moment_loss"] = float(moment_sum) / seen
    return out


@torch.no_grad()
def validate(model: nn.Module, val: ImageSet) -> tuple[float, float]:
    """Mean clean cross-entropy and accuracy on ``val``."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = 0
    for x, y in iterate_batches(val, EVAL_BATCH_SIZE):
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double().cpu()
        correct += int((logits.argmax(1) == y).sum())
    return float(loss_sum) / len(val), correct / len(val)


def _finite_parameters(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@torch.no_grad()
def _finite_logits(model: nn.Module, x: torch.Tensor) -> bool:
    return bool(torch.isfinite(model(x)).all())


def check_finite(model: nn.Module, train_loss: float, val_loss: float | None) -> str | None:
    """What is not finite after an epoch ("loss nan", "non-finite parameters", ...), or None."""
    if not math.isfinite(train_loss):
        return f"loss {train_loss:g}"
    if not _finite_parameters(model):
        return f"loss {train_loss:g}, non-finite parameters"
    if val_loss is not None and not math.isfinite(val_loss):
        return f"loss {train_loss:g}, validation loss {val_loss:g}"
    return None


def _diverged(out_dir: Path, epoch: int, detail: str) -> RunDiverged:
    kept = (f"the checkpoint of epoch {epoch - 1} is kept" if epoch > 1
            else "no checkpoint was written")
    exc = RunDiverged(epoch, detail, f"{kept}; lower the learning rate (--lr)")
    rundir.record_error(out_dir, str(exc), "diverged", epoch)
    exc.recorded = True
    return exc


# --------------------------------------------------------------------------- logging


class _TensorBoard:
    """Per-epoch scalars in ``OUT/tensorboard`` (a no-op when not requested)."""

    def __init__(self, log_dir: Path | None) -> None:
        self.writer = None
        if log_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(
                "TensorBoard logging was requested but the 'tensorboard' package is not "
                "installed; install it with: pip install 'momentkit[tensorboard]' "
                "(or run without --tensorboard)"
            ) from exc
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, entry: dict[str, Any]) -> None:
        if self.writer is not None:
            for key in ("train_loss", "val_loss", "val_accuracy", "lr"):
                self.writer.add_scalar(key, entry[key], entry["epoch"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --------------------------------------------------------------------------- results


def make_results(config: RunConfig, state: TrainingState, evaluation: dict[str, Any],
                 device: torch.device, wall_time_s: float) -> dict[str, Any]:
    """The ``results.json`` content of a finished run (see :data:`RESULT_KEYS`)."""
    return {
        "config": config.to_dict(),
        "run_id": config.run_id(),
        "version": rundir.package_version(),
        "history": state.history,
        "epochs_run": state.epoch,
        "best_epoch": state.stopping.best_epoch,
        "stopped_early": bool(state.stopping.stopped),
        "test_accuracy": evaluation["test_accuracy"],
        "n_test": evaluation["n_test"],
        "robustness": evaluation["robustness"],
        "degenerate_predictions": evaluation["degenerate_predictions"],
        "wall_time_s": wall_time_s,
        "train_time_s": state.train_time,
        "gradient_steps": state.steps,
        "device": str(device),
    }


def write_results(out_dir: Path, results: dict[str, Any], evaluation: dict[str, Any]) -> None:
    """Write ``per_image.npz``, then ``results.json`` (strict JSON), then drop old errors."""
    write_evaluation(out_dir, evaluation)
    rundir.write_json_atomic(out_dir / rundir.RESULTS_FILE, results)
    rundir.clear_error(out_dir)


def _finished(config: RunConfig, out_dir: Path) -> dict[str, Any] | None:
    """The complete results of ``config`` in ``out_dir``, None if there are none.

    Raises ``ValueError`` when ``out_dir`` holds the results of another training.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir: {str(out_dir)!r} exists and is not a folder")
    existing = rundir.read_results(out_dir)
    if existing is None:
        return None
    if existing.get("run_id") == config.run_id() and all(k in existing for k in RESULT_KEYS):
        return existing
    try:
        other = RunConfig.from_dict(existing.get("config", {}))
    except (TypeError, ValueError):
        return None
    if other.training_key() != config.training_key():
        raise ValueError(
            f"out_dir: {str(out_dir)!r} holds results of another run "
            f"({existing.get('run_id')}); use another output directory"
        )
    return None


# --------------------------------------------------------------------------- the run


def run_training(
    config: RunConfig,
    out_dir: str | os.PathLike[str],
    *,
    data_root: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    tensorboard: bool = False,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train ``config`` into ``out_dir`` (resuming if possible), evaluate, write results.

    Returns the content of ``out_dir/results.json`` (see :data:`RESULT_KEYS`). If that
    file is already complete for ``config.run_id()`` it is returned without any work.
    A checkpoint of a config with the same :meth:`RunConfig.training_key` (the same
    run, possibly with a different ``epochs`` cap or evaluation settings) is resumed
    after its last completed epoch; training that had stopped early stays stopped.
    ``on_epoch_end(epoch, history_entry)`` is called after each epoch's checkpoint is
    saved (an exception raised there interrupts the run like a crash would). Nothing is
    created in ``out_dir`` before the device, the checkpoint and the data are checked.

    Raises:
        RunDiverged: a non-finite loss or parameters (``error.json`` records it).
        CheckpointError: ``out_dir/checkpoint.pt`` is unreadable, belongs to another
            run, or already holds more epochs than ``config.epochs``.
        ValueError: ``out_dir`` is a file or holds the results of another run; ``device``
            is not usable; a subset larger than its data set.
        experiments.data.DatasetNotFoundError: the data set is missing.
        ImportError: ``tensorboard=True`` but tensorboard is not installed.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    finished = _finished(config, out_dir)
    if finished is not None:
        return finished
    checkpoint = resumable_checkpoint(config, out_dir / rundir.CHECKPOINT_FILE)
    device = check_device(str(device), "device")
    data = prepare_data(config, data_root, device, progress=progress)
    board = _TensorBoard(out_dir / "tensorboard" if tensorboard else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = TrainingState.start(config, device, checkpoint)
    log = Progress(None, config.method, enabled=progress)
    # The global CPU generator is forked: seeded from the config on a fresh run, restored
    # from the checkpoint on a resumed one, and the caller's state is left as it was.
    with torch.random.fork_rng(devices=[]):
        if state.rng_cpu is not None:
            torch.set_rng_state(state.rng_cpu)
        else:
            torch.manual_seed(config.seed)
        try:
            while state.epoch < config.epochs and not state.stopping.stopped:
                _one_epoch(state, config, data, out_dir, start, board, log, progress)
                if on_epoch_end is not None:
                    on_epoch_end(state.epoch, state.history[-1])
        finally:
            board.close()
    if state.best_state is not None:
        state.model.load_state_dict(state.best_state)
    evaluation = evaluate_model(state.model, data.test, sigmas=default_sigmas(config.eval_sigmas),
                                samples=config.eval_samples, device=device)
    warning = degenerate_warning(evaluation)
    if warning is not None:
        print(f"{warning} (run {config.run_id()}, {out_dir})", file=sys.stderr, flush=True)
    results = make_results(config, state, evaluation, device,
                           state.past_wall + time.perf_counter() - start)
    write_results(out_dir, results, evaluation)
    return results


def _one_epoch(state: TrainingState, config: RunConfig, data: RunData, out_dir: Path,
               start: float, board: _TensorBoard, log: Progress, progress: bool) -> None:
    """Train, check, validate and checkpoint one epoch (raises :class:`RunDiverged`)."""
    epoch_start = time.perf_counter()
    lr = state.optimizer.param_groups[0]["lr"]
    losses = train_one_epoch(state, config, data.train, progress=progress)
    val_loss, val_acc = validate(state.model, data.val)
    problem = check_finite(state.model, losses["train_loss"], val_loss)
    if problem is not None:
        raise _diverged(out_dir, state.epoch, problem)
    state.scheduler.step(val_loss)
    improved = state.stopping.step(state.epoch, val_loss)
    seconds = time.perf_counter() - epoch_start
    state.train_time += seconds
    entry = {"epoch": state.epoch, "train_loss": losses["train_loss"], "val_loss": val_loss,
             "val_accuracy": val_acc, "lr": lr, "seconds": seconds}
    if "train_moment_loss" in losses:
        entry["train_moment_loss"] = losses["train_moment_loss"]
    state.finish_epoch(entry, improved)
    log.write(f"[{config.method}] epoch {state.epoch}: train loss {entry['train_loss']:.4f}, "
              f"val loss {val_loss:.4f}, val acc {val_acc:.4f}, lr {lr:.3g}, {seconds:.1f}s")
    board.log(entry)
    wall = state.past_wall + time.perf_counter() - start
    write_checkpoint(out_dir / rundir.CHECKPOINT_FILE, state.snapshot(config, wall))
