"""Training checkpoints: ``checkpoint.pt`` of a run folder, its format and its checks.

A checkpoint is a ``torch.save`` dict written atomically after every finished epoch
(through :func:`experiments.rundir.write_atomic`) and read with ``weights_only=True``:

* ``format`` (:data:`CHECKPOINT_FORMAT`), ``config`` (the run's config dict),
  ``training_key`` (:meth:`RunConfig.training_key`), ``version`` (momentkit's),
  ``epoch`` (the last finished epoch);
* ``model``, ``optimizer``, ``scheduler``: their ``state_dict()`` after that epoch;
* ``early_stopping``: ``{"best_val_loss", "best_epoch", "bad_epochs", "stopped"}``;
* ``history``: the per-epoch entries so far;
* ``best_state``: the weights of the lowest validation loss, or ``None`` when they are
  the checkpoint's ``model`` (saves writing them twice);
* ``rng_cpu``: the global CPU generator's state; ``train_time_s``, ``gradient_steps``,
  ``wall_time_s``: the counters so far.

Only weights of finished epochs whose loss and parameters were finite are ever written:
a diverged epoch leaves the previous checkpoint in place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experiments import rundir
from experiments.config import RunConfig
from experiments.models import make_model

CHECKPOINT_FORMAT = 1
REQUIRED_KEYS = ("format", "config", "training_key", "epoch", "model", "optimizer",
                 "scheduler", "early_stopping", "history", "best_state")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or belongs to another run; the file is left as it was."""


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`experiments.training.run_training` onto the CPU.

    Raises:
        CheckpointError: the file cannot be read, lacks an entry of :data:`REQUIRED_KEYS`
            or has another format; the message names the file, which is never modified.
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
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
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


def resumable_checkpoint(config: RunConfig, path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if ``config`` may resume it, ``None`` if there is none.

    Raises:
        CheckpointError: unreadable (see :func:`load_checkpoint`), written for another
            training (another :meth:`RunConfig.training_key`), or holding more epochs
            than ``config.epochs``.
    """
    if not path.exists():
        return None
    state = load_checkpoint(path)
    if state["training_key"] != config.training_key():
        raise CheckpointError(
            f"checkpoint {str(path)!r} belongs to another run (config {state['config']}); "
            "the file was left untouched, use another output directory"
        )
    if state["epoch"] > config.epochs:
        raise CheckpointError(
            f"checkpoint {str(path)!r} already holds {state['epoch']} epochs, more than "
            f"epochs={config.epochs}; the file was left untouched"
        )
    return state


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (the dict described in the module docstring) atomically."""
    rundir.write_atomic(path, lambda handle: torch.save(state, handle))


def best_model_from_checkpoint(
    state: dict[str, Any], device: torch.device | str = "cpu"
) -> tuple[RunConfig, nn.Module]:
    """The config and the best-validation model stored in a checkpoint ``state``."""
    config = RunConfig.from_dict(state["config"])
    model = make_model(config, device)
    best = state["best_state"] if state["best_state"] is not None else state["model"]
    model.load_state_dict(best)
    return config, model
