"""Training and evaluation of one run: the paper's protocol (Section 4.2, Table 1).

:func:`run_training` trains the model of a :class:`~experiments.config.RunConfig` with
its method, keeps the model of the best validation loss, evaluates it on the test set
(clean accuracy and the Eq. 6 robustness curve through
:func:`momentkit.robustness.gaussian_robustness`) and writes the results.

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

Files in the output directory:

* ``checkpoint.pt``: written atomically after every epoch (model, optimizer, scheduler,
  early-stopping state, RNG state, history, best model). A run that finds one resumes
  after its last completed epoch; an unreadable one raises :class:`CheckpointError` and
  is left untouched.
* ``results.json``: configuration, run id, package version, history, test accuracy,
  robustness, timings (written last and atomically; its presence means the run is
  complete).
* ``per_image.npz``: ``correct`` bool ``(n_test,)`` and ``robust`` bool
  ``(n_sigmas, n_test)``, for paired comparisons between runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from experiments.augment import augmented_batches
from experiments.config import RunConfig, TrainPreset
from experiments.data import (
    ImageSet,
    iterate_batches,
    load_dataset,
    subset_indices,
    train_val_split,
)
from experiments.models import build_model

CHECKPOINT_FORMAT = 1
TEST_SUBSET_SEED = 0
"""Seed choosing ``test_subset`` images: fixed, so all runs see the same test images."""
EVAL_SEED = 0
"""Seed of the robustness noise: fixed, so all runs are measured with the same noise."""
EVAL_BATCH_SIZE = 1000
DEFAULT_EVAL_SIGMA_MAX = 0.5

RESULT_KEYS = (
    "config",
    "run_id",
    "version",
    "history",
    "epochs_run",
    "best_epoch",
    "stopped_early",
    "test_accuracy",
    "robustness",
    "wall_time_s",
    "train_time_s",
    "gradient_steps",
    "device",
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or belongs to another run; the file is left as it was."""


def package_version() -> str:
    """momentkit's version (``momentkit.__version__``, else the installed metadata)."""
    try:
        from momentkit import __version__

        return str(__version__)
    except ImportError:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("momentkit")
        except PackageNotFoundError:
            return "unknown"


# --------------------------------------------------------------------------- file helpers


def _write_atomic(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` through ``write(handle)`` into a temporary file, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    _write_atomic(Path(path), lambda h: json.dump(obj, h, indent=2), mode="w")


def _write_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    _write_atomic(path, lambda h: h.write(buffer.getvalue()))


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class RunData:
    """The images one run uses: training, validation and test parts."""

    train: ImageSet
    val: ImageSet
    test: ImageSet


def prepare_data(
    config: RunConfig,
    data_root: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    *,
    progress: bool = False,
) -> RunData:
    """Load the run's data set, take ``train_subset`` and the 90/10 split, ``test_subset``.

    ``train_subset`` images are drawn with ``config.seed`` from the training set, then
    split 90/10 with ``config.seed`` into training and validation images. ``test_subset``
    images are drawn with :data:`TEST_SUBSET_SEED`. All parts stay ``uint8`` on
    ``device``. Raises :class:`experiments.data.DatasetNotFoundError` if the data set is
    missing.
    """
    ds = load_dataset(config.dataset, data_root, progress=progress)
    pool = ds.train.subset(subset_indices(len(ds.train), config.train_subset, config.seed))
    train_idx, val_idx = train_val_split(len(pool), config.seed)
    return RunData(
        pool.subset(train_idx).to(device),
        pool.subset(val_idx).to(device),
        _test_part(ds.test, config).to(device),
    )


def prepare_test_data(
    config: RunConfig,
    data_root: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
) -> ImageSet:
    """The test images of ``config`` (``test_subset`` drawn with :data:`TEST_SUBSET_SEED`)."""
    return _test_part(load_dataset(config.dataset, data_root).test, config).to(device)


def _test_part(test: ImageSet, config: RunConfig) -> ImageSet:
    return test.subset(subset_indices(len(test), config.test_subset, TEST_SUBSET_SEED))


# --------------------------------------------------------------------------- pieces


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    digest = hashlib.sha256(f"momentkit-epoch:{seed}:{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def make_model(config: RunConfig, device: torch.device | str = "cpu") -> nn.Sequential:
    """The run's model, initialized from ``config.seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(config.model, config.dataset)
    return model.to(device)


def make_optimizer(model: nn.Module, preset: TrainPreset) -> torch.optim.Optimizer:
    """Adam (0.9, 0.999, eps 1e-8) or Nesterov SGD (momentum 0.9) as in Table 1."""
    if preset.optimizer == "adam":
        return torch.optim.Adam(
            model.parameters(), lr=preset.lr, betas=(0.9, 0.999), eps=1e-8,
            weight_decay=preset.weight_decay, amsgrad=False,
        )
    return torch.optim.SGD(
        model.parameters(), lr=preset.lr, momentum=0.9, dampening=0.0, nesterov=True,
        weight_decay=preset.weight_decay,
    )


def _train_batches(config: RunConfig, train: ImageSet, batch_size: int, epoch: int):
    generator = _epoch_generator(config.seed, epoch)
    if config.method == "augment":
        return augmented_batches(
            train, batch_size, config.folds, config.sigma, config.seed, generator
        )
    return iterate_batches(train, batch_size, generator=generator)


def _batch_loss(
    model: nn.Module, config: RunConfig, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training loss of one batch and, for ``moment``, its moment term (detached)."""
    if config.method == "moment":
        from momentkit.regularizer import moment_regularized_loss

        total, _, moment_term = moment_regularized_loss(model, x, y, config.sigma, config.alpha)
        return total, moment_term.detach()
    return F.cross_entropy(model(x), y), None


@torch.no_grad()
def _validate(model: nn.Module, val: ImageSet) -> tuple[float, float]:
    """Mean clean cross-entropy and accuracy on ``val``."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = 0
    for x, y in iterate_batches(val, EVAL_BATCH_SIZE):
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double().cpu()
        correct += int((logits.argmax(1) == y).sum())
    return float(loss_sum) / len(val), correct / len(val)


class _BatchSet(torch.utils.data.Dataset):
    """A map-style data set whose item ``i`` is the ``i``-th batch ``(x, y)`` of an ImageSet."""

    def __init__(self, data: ImageSet, batch_size: int) -> None:
        self.data, self.batch_size = data, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.data) / self.batch_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.batch_size
        stop = min(start + self.batch_size, len(self.data))
        return self.data.batch(torch.arange(start, stop))


def batch_loader(
    data: ImageSet, batch_size: int = EVAL_BATCH_SIZE
) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` of float batches ``(x, y)`` over ``data`` in order (no per-item work)."""
    return torch.utils.data.DataLoader(_BatchSet(data, batch_size), batch_size=None)


def default_sigmas(n: int = 30) -> torch.Tensor:
    """``linspace(0, 0.5, n)``: the paper's robustness sigmas (Eq. 6)."""
    return torch.linspace(0.0, DEFAULT_EVAL_SIGMA_MAX, n, dtype=torch.float64)


def _floats(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.astype(float).tolist()
    if isinstance(value, tuple | list):
        return [_floats(v) for v in value]
    return float(value)


def evaluate_model(
    model: nn.Module,
    test: ImageSet,
    *,
    sigmas: torch.Tensor | None = None,
    samples: int = 1,
    seed: int = EVAL_SEED,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Clean accuracy and Eq. 6 robustness of ``model`` on ``test``.

    Returns ``{"test_accuracy", "n_test", "robustness": {"sigmas", "curve", "auc",
    "mean", "ci"}, "correct": bool array (n_test,), "robust": bool array
    (n_sigmas, n_test)}``. ``sigmas`` defaults to :func:`default_sigmas`; the noise is
    drawn by :func:`momentkit.robustness.gaussian_robustness` with ``seed`` and
    ``samples`` noise vectors per image and sigma.
    """
    from momentkit.robustness import gaussian_robustness

    model = model.to(device).eval()
    test = test.to(device)
    correct = []
    with torch.no_grad():
        for x, y in iterate_batches(test, EVAL_BATCH_SIZE):
            correct.append((model(x).argmax(1) == y).cpu())
    correct_arr = torch.cat(correct).numpy()
    sigmas = default_sigmas() if sigmas is None else sigmas
    result = gaussian_robustness(
        model, batch_loader(test), sigmas=sigmas, samples=samples, seed=seed, device=device
    )
    per_image = result.per_image
    if isinstance(per_image, torch.Tensor):
        per_image = per_image.detach().cpu().numpy()
    return {
        "test_accuracy": float(correct_arr.mean()),
        "n_test": int(correct_arr.shape[0]),
        "robustness": {
            "sigmas": _floats(result.sigmas),
            "curve": _floats(result.curve),
            "auc": float(result.auc),
            "mean": float(result.mean),
            "ci": _floats(result.ci),
        },
        "correct": correct_arr.astype(bool),
        "robust": np.asarray(per_image, dtype=bool),
    }


def write_evaluation(out_dir: Path, evaluation: dict[str, Any]) -> None:
    """Write ``per_image.npz`` (``correct``, ``robust``) of an :func:`evaluate_model` result."""
    _write_npz_atomic(
        Path(out_dir) / "per_image.npz",
        correct=evaluation["correct"],
        robust=evaluation["robust"],
    )


# --------------------------------------------------------------------------- checkpoints


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`run_training` onto the CPU.

    Raises :class:`CheckpointError` naming the file if it cannot be read or lacks the
    expected entries; the file itself is never modified.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for damaged files
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} ({type(exc).__name__}: {exc}). "
            "The file was left untouched: delete it to retrain from scratch, or use "
            "another output directory."
        ) from exc
    required = ("format", "config", "training_key", "epoch", "model", "optimizer",
                "scheduler", "early_stopping", "history", "best_state")
    if not isinstance(state, dict) or any(k not in state for k in required):
        missing = [k for k in required if not isinstance(state, dict) or k not in state]
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a momentkit training checkpoint "
            f"(missing {missing}); the file was left untouched"
        )
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format {state['format']}, this version reads "
            f"format {CHECKPOINT_FORMAT}; the file was left untouched"
        )
    return state


def best_model_from_checkpoint(
    state: dict[str, Any], device: torch.device | str = "cpu"
) -> tuple[RunConfig, nn.Module]:
    """The config and the best-validation model stored in a checkpoint ``state``."""
    config = RunConfig.from_dict(state["config"])
    model = make_model(config, device)
    best = state["best_state"] if state["best_state"] is not None else state["model"]
    model.load_state_dict(best)
    return config, model


def _summary_writer(log_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError(
            "TensorBoard logging was requested but the 'tensorboard' package is not "
            "installed; install it with: pip install 'momentkit[tensorboard]' "
            "(or run without --tensorboard)"
        ) from exc
    return SummaryWriter(log_dir=str(log_dir))


def _read_results(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        with open(path) as handle:
            results = json.load(handle)
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) else None


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
    saved (an exception raised there interrupts the run like a crash would).

    Raises:
        CheckpointError: ``out_dir/checkpoint.pt`` is unreadable, belongs to another
            run, or already holds more epochs than ``config.epochs``.
        ValueError: ``out_dir/results.json`` holds the results of another run.
        experiments.data.DatasetNotFoundError: the data set is missing.
        ImportError: ``tensorboard=True`` but tensorboard is not installed.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path, ckpt_path = out_dir / "results.json", out_dir / "checkpoint.pt"
    run_id = config.run_id()

    existing = _read_results(results_path)
    if existing is not None:
        if (
            existing.get("run_id") == run_id
            and all(k in existing for k in RESULT_KEYS)
            and (out_dir / "per_image.npz").exists()
        ):
            return existing
        try:
            other = RunConfig.from_dict(existing.get("config", {}))
        except (TypeError, ValueError):
            other = None
        if other is not None and other.training_key() != config.training_key():
            raise ValueError(
                f"out_dir: {str(out_dir)!r} holds results of another run "
                f"({existing.get('run_id')}); use another output directory"
            )

    state = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    if state is not None:
        if state["training_key"] != config.training_key():
            raise CheckpointError(
                f"checkpoint {str(ckpt_path)!r} belongs to another run (config "
                f"{state['config']}); the file was left untouched, use another output "
                "directory"
            )
        if state["epoch"] > config.epochs:
            raise CheckpointError(
                f"checkpoint {str(ckpt_path)!r} already holds {state['epoch']} epochs, more "
                f"than epochs={config.epochs}; the file was left untouched"
            )

    writer = _summary_writer(out_dir / "tensorboard") if tensorboard else None
    device = torch.device(device)
    preset = config.preset()
    data = prepare_data(config, data_root, device, progress=progress)
    model = make_model(config, device)
    optimizer = make_optimizer(model, preset)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=preset.lr_factor, patience=preset.lr_patience
    )
    history: list[dict[str, Any]] = []
    stop = {"best_val_loss": math.inf, "best_epoch": 0, "bad_epochs": 0, "stopped": False}
    best_state: dict[str, torch.Tensor] | None = None
    epoch, train_time, steps, past_wall = 0, 0.0, 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stop = dict(state["early_stopping"])
        history = list(state["history"])
        best_state = state["best_state"]
        if best_state is None:  # the checkpointed model was the best one
            best_state = {k: v.clone() for k, v in state["model"].items()}
        epoch = int(state["epoch"])
        train_time = float(state.get("train_time_s", 0.0))
        steps = int(state.get("gradient_steps", 0))
        past_wall = float(state.get("wall_time_s", 0.0))

    batches_per_epoch = math.ceil(
        len(data.train) * (config.folds if config.method == "augment" else 1)
        / preset.batch_size
    )
    # The global CPU generator is forked: seeded from the config on a fresh run, restored
    # from the checkpoint on a resumed one, and the caller's state is left as it was.
    with torch.random.fork_rng(devices=[]):
        if state is not None and "rng_cpu" in state:
            torch.set_rng_state(state["rng_cpu"])
        else:
            torch.manual_seed(config.seed)
        while epoch < config.epochs and not stop["stopped"]:
            epoch += 1
            epoch_start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            model.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            moment_sum = torch.zeros((), dtype=torch.float64, device=device)
            seen = 0
            bar = tqdm(
                _train_batches(config, data.train, preset.batch_size, epoch),
                total=batches_per_epoch,
                desc=f"{config.method} epoch {epoch}/{config.epochs}",
                disable=not progress,
                leave=False,
            )
            for x, y in bar:
                optimizer.zero_grad(set_to_none=True)
                loss, moment_term = _batch_loss(model, config, x, y)
                loss.backward()
                optimizer.step()
                steps += 1
                loss_sum += loss.detach().double() * y.shape[0]
                if moment_term is not None:
                    moment_sum += moment_term.double() * y.shape[0]
                seen += y.shape[0]
            bar.close()
            val_loss, val_acc = _validate(model, data.val)
            scheduler.step(val_loss)
            if val_loss < stop["best_val_loss"]:
                stop.update(best_val_loss=val_loss, best_epoch=epoch, bad_epochs=0)
                best_state = None  # the current model is the best one
            else:
                stop["bad_epochs"] += 1
                if stop["bad_epochs"] >= preset.loss_patience:
                    stop["stopped"] = True
            seconds = time.perf_counter() - epoch_start
            train_time += seconds
            entry = {
                "epoch": epoch,
                "train_loss": float(loss_sum) / seen,
                "val_loss": val_loss,
                "val_accuracy": val_acc,
                "lr": lr,
                "seconds": seconds,
            }
            if config.method == "moment":
                entry["train_moment_loss"] = float(moment_sum) / seen
            history.append(entry)
            if progress:
                tqdm.write(
                    f"[{config.method}] epoch {epoch}: train loss {entry['train_loss']:.4f}, "
                    f"val loss {val_loss:.4f}, val acc {val_acc:.4f}, lr {lr:.3g}, {seconds:.1f}s"
                )
            if writer is not None:
                for key in ("train_loss", "val_loss", "val_accuracy", "lr"):
                    writer.add_scalar(key, entry[key], epoch)
            model_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            snapshot = {
                "format": CHECKPOINT_FORMAT,
                "config": config.to_dict(),
                "training_key": config.training_key(),
                "version": package_version(),
                "epoch": epoch,
                "model": model_state,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "early_stopping": dict(stop),
                "history": history,
                "best_state": best_state,
                "rng_cpu": torch.get_rng_state(),
                "train_time_s": train_time,
                "gradient_steps": steps,
                "wall_time_s": past_wall + time.perf_counter() - start,
            }
            _write_atomic(ckpt_path, lambda h, s=snapshot: torch.save(s, h))
            # ``best_state`` None in a checkpoint means "the model is the best one"; in
            # memory the best weights must survive the next epoch's updates
            if best_state is None:
                best_state = model_state
            if on_epoch_end is not None:
                on_epoch_end(epoch, entry)
    if writer is not None:
        writer.close()

    best = best_state if best_state is not None else model.state_dict()
    model.load_state_dict(best)
    evaluation = evaluate_model(
        model,
        data.test,
        sigmas=default_sigmas(config.eval_sigmas),
        samples=config.eval_samples,
        device=device,
    )
    write_evaluation(out_dir, evaluation)
    results = {
        "config": config.to_dict(),
        "run_id": run_id,
        "version": package_version(),
        "history": history,
        "epochs_run": epoch,
        "best_epoch": stop["best_epoch"],
        "stopped_early": bool(stop["stopped"]),
        "test_accuracy": evaluation["test_accuracy"],
        "n_test": evaluation["n_test"],
        "robustness": evaluation["robustness"],
        "wall_time_s": past_wall + time.perf_counter() - start,
        "train_time_s": train_time,
        "gradient_steps": steps,
        "device": str(device),
    }
    write_json_atomic(results_path, results)
    return results
