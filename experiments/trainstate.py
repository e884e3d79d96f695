"""What a run carries from epoch to epoch: model, optimizer, schedule, early stopping.

:class:`TrainingState` is created fresh for a config or from a checkpoint
(:mod:`experiments.checkpoints`), and :meth:`TrainingState.snapshot` is the checkpoint
written after an epoch. :class:`EarlyStopping` stops after ``patience`` epochs without a
strictly lower validation loss (paper Table 1: 10 for LeNet, 20 for AlexNet).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from experiments import rundir
from experiments.checkpoints import CHECKPOINT_FORMAT
from experiments.config import RunConfig, TrainPreset
from experiments.models import make_model


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


@dataclass
class EarlyStopping:
    """Stop after ``patience`` epochs without a strictly lower validation loss.

    Its :meth:`state_dict` is the checkpoint's ``early_stopping`` entry.
    """

    patience: int
    best_val_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped: bool = False

    def step(self, epoch: int, val_loss: float) -> bool:
        """Record ``epoch``'s validation loss; True when it is a new best."""
        if val_loss < self.best_val_loss:
            self.best_val_loss, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
            return True
        self.bad_epochs += 1
        self.stopped = self.bad_epochs >= self.patience
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"best_val_loss": self.best_val_loss, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "stopped": self.stopped}

    @classmethod
    def from_state_dict(cls, patience: int, state: dict[str, Any]) -> EarlyStopping:
        return cls(patience, float(state["best_val_loss"]), int(state["best_epoch"]),
                   int(state["bad_epochs"]), bool(state["stopped"]))


def _cpu_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@dataclass
class TrainingState:
    """Everything a run carries from epoch to epoch, and what a checkpoint holds.

    ``best_state`` holds the weights of the best epoch so far (CPU copies), ``None``
    before the first epoch.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    stopping: EarlyStopping
    history: list[dict[str, Any]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    epoch: int = 0
    train_time: float = 0.0
    steps: int = 0
    past_wall: float = 0.0
    rng_cpu: torch.Tensor | None = None

    @classmethod
    def start(cls, config: RunConfig, device: torch.device,
              checkpoint: dict[str, Any] | None = None) -> TrainingState:
        """A fresh state for ``config``, or the one stored in ``checkpoint``."""
        preset = config.preset()
        model = make_model(config, device)
        optimizer = make_optimizer(model, preset)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=preset.lr_factor, patience=preset.lr_patience
        )
        state = cls(model, optimizer, scheduler, EarlyStopping(preset.loss_patience))
        if checkpoint is None:
            return state
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        state.stopping = EarlyStopping.from_state_dict(preset.loss_patience,
                                                       checkpoint["early_stopping"])
        state.history = list(checkpoint["history"])
        best = checkpoint["best_state"]  # None: the checkpointed model is the best one
        state.best_state = best if best is not None else {
            k: v.clone() for k, v in checkpoint["model"].items()}
        state.epoch = int(checkpoint["epoch"])
        state.train_time = float(checkpoint.get("train_time_s", 0.0))
        state.steps = int(checkpoint.get("gradient_steps", 0))
        state.past_wall = float(checkpoint.get("wall_time_s", 0.0))
        state.rng_cpu = checkpoint.get("rng_cpu")
        return state

    def finish_epoch(self, entry: dict[str, Any], improved: bool) -> None:
        """Append the epoch's history entry; keep its weights if they are the best."""
        self.history.append(entry)
        if improved:
            self.best_state = _cpu_weights(self.model)

    def snapshot(self, config: RunConfig, wall_time_s: float) -> dict[str, Any]:
        """The checkpoint dict of the state after the last finished epoch."""
        best_is_current = self.stopping.best_epoch == self.epoch
        return {
            "format": CHECKPOINT_FORMAT,
            "config": config.to_dict(),
            "training_key": config.training_key(),
            "version": rundir.package_version(),
            "epoch": self.epoch,
            "model": _cpu_weights(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "early_stopping": self.stopping.state_dict(),
            "history": self.history,
            "best_state": None if best_is_current else self.best_state,
            "rng_cpu": torch.get_rng_state(),
            "train_time_s": self.train_time,
            "gradient_steps": self.steps,
            "wall_time_s": wall_time_s,
        }
