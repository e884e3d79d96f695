"""Run configurations and the paper's training presets (Table 1).

A :class:`RunConfig` names one training run completely: data set, model, method and
its parameters, epochs, seed, subsets, optional overrides of the Table 1 preset and
the evaluation settings. :meth:`RunConfig.run_id` is a short SHA-256 of its canonical
JSON, the same in every process and on every machine, so it can name output folders
and detect stale results.

Methods:

* ``baseline``: plain cross-entropy; ``sigma = 0``, ``alpha = 0``, ``folds = 1``.
* ``moment``: the analytic moment regularizer, loss
  ``CE(Phi(x), y) + alpha * CE(Omega(mu3), y)`` (paper Eq. 3) with training noise
  standard deviation ``sigma`` (pixel units); needs ``sigma > 0``, ``alpha > 0``,
  ``folds = 1``.
* ``augment``: ``folds``-fold noisy data augmentation (the clean set plus
  ``folds - 1`` noisy copies, noise standard deviation ``sigma``); needs ``sigma > 0``,
  ``folds >= 2``, ``alpha = 0``.
* ``gaussian``: Gaussian noise training as Cohen, Rosenfeld and Kolter (2019) train for
  randomized smoothing: every training image gets one fresh noise draw of standard
  deviation ``sigma`` per epoch, no clean copies
  (:func:`experiments.augment.gaussian_noise_batches`); needs ``sigma > 0``,
  ``alpha = 0``, ``folds = 1``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from experiments.data import DATASET_INFO, DATASETS
from experiments.models import MODELS

METHODS = ("baseline", "moment", "augment", "gaussian")
MOMENTS = ("first_relu", "network")
"""Surrogates of the moment regularizer (see :class:`RunConfig`)."""


@dataclass(frozen=True)
class TrainPreset:
    """Optimization hyper-parameters of one model family (paper Table 1).

    ``optimizer`` is ``"adam"`` (betas 0.9/0.999, eps 1e-8, no amsgrad) or ``"sgd"``
    (momentum 0.9, Nesterov, dampening 0). The learning rate is multiplied by
    ``lr_factor`` when the validation loss has not improved for ``lr_patience`` epochs
    (``ReduceLROnPlateau``); training stops when it has not improved for
    ``loss_patience`` epochs.
    """

    optimizer: str
    batch_size: int
    lr: float
    lr_patience: int
    lr_factor: float
    loss_patience: int
    weight_decay: float


PRESETS: dict[str, TrainPreset] = {
    "lenet": TrainPreset("adam", 1000, 1e-4, 3, 0.9, 10, 0.0),
    "alexnet": TrainPreset("sgd", 128, 0.1, 5, 0.5, 20, 5e-4),
}

# fields that only change the evaluation, not the trained weights; ``epochs`` is a cap
# that a resumed run may raise (see ``RunConfig.training_key``)
EVALUATION_FIELDS = ("eval_sigmas", "eval_samples", "test_subset")


def _check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: must be at least {minimum}, got {value}")


def _as_float(name: str, value: Any, optional: bool = False) -> float | None:
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: must be finite and non-negative, got {value}")
    return value


@dataclass(frozen=True)
class RunConfig:
    """One training run. Invalid fields raise ``ValueError`` naming the field.

    ``train_subset``: train on this many images of the training set (chosen with
    ``seed``) before the 90/10 train/validation split; ``None`` uses all.
    ``test_subset``: evaluate on this many test images (chosen with a fixed seed, so
    every run with the same value sees the same images); ``None`` uses all.
    ``batch_size``, ``lr``: ``None`` takes the model's Table 1 preset.
    ``patience``: early-stopping patience in epochs (the validation loss must fall
    strictly within this many epochs); ``None`` takes the preset's (10 for LeNet, 20
    for AlexNet). Like ``moments`` it is left out of :meth:`to_dict` at its default.
    ``moments`` (method ``moment`` only): the surrogate of the regularizer,
    ``"first_relu"`` (the paper's ``Omega(mu3)``) or ``"network"`` (the output mean of
    every layer's Gaussian moments, :func:`momentkit.network_moments`). At its default it
    is left out of :meth:`to_dict`, so run ids of runs made before the field existed stay
    the same.
    ``eval_sigmas``: number of evenly spaced sigmas in [0, 0.5] for the robustness
    curve; ``eval_samples``: noise samples per image and sigma.
    """

    dataset: str
    model: str
    method: str
    sigma: float = 0.0
    alpha: float = 0.0
    folds: int = 1
    epochs: int = 100
    seed: int = 0
    train_subset: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    eval_sigmas: int = 30
    eval_samples: int = 1
    test_subset: int | None = None
    moments: str = "first_relu"
    patience: int | None = None

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset: unknown {self.dataset!r}; expected one of {list(DATASETS)}")
        if self.model not in MODELS:
            raise ValueError(f"model: unknown {self.model!r}; expected one of {list(MODELS)}")
        if self.method not in METHODS:
            raise ValueError(f"method: unknown {self.method!r}; expected one of {list(METHODS)}")
        if self.model == "alexnet" and DATASET_INFO[self.dataset].size != 32:
            raise ValueError(
                f"model: 'alexnet' needs 32x32 images; {self.dataset!r} has 28x28 (use 'lenet')"
            )
        if self.moments not in MOMENTS:
            raise ValueError(f"moments: unknown {self.moments!r}; expected one of {list(MOMENTS)}")
        if self.moments != "first_relu" and self.method != "moment":
            raise ValueError(
                f"moments: only method 'moment' has a surrogate to choose, got {self.moments!r} "
                f"with method {self.method!r}"
            )
        object.__setattr__(self, "sigma", _as_float("sigma", self.sigma))
        object.__setattr__(self, "alpha", _as_float("alpha", self.alpha))
        object.__setattr__(self, "lr", _as_float("lr", self.lr, optional=True))
        _check_int("folds", self.folds, 1)
        _check_int("epochs", self.epochs, 1)
        _check_int("seed", self.seed, 0)
        _check_int("train_subset", self.train_subset, 2, optional=True)
        _check_int("batch_size", self.batch_size, 1, optional=True)
        _check_int("patience", self.patience, 1, optional=True)
        _check_int("eval_sigmas", self.eval_sigmas, 2)
        _check_int("eval_samples", self.eval_samples, 1)
        _check_int("test_subset", self.test_subset, 1, optional=True)
        if self.lr is not None and self.lr == 0.0:
            raise ValueError("lr: must be positive")
        if self.method == "baseline":
            for name, value, neutral in (("sigma", self.sigma, 0.0), ("alpha", self.alpha, 0.0),
                                         ("folds", self.folds, 1)):
                if value != neutral:
                    raise ValueError(
                        f"{name}: method 'baseline' takes {name}={neutral}, got {value}"
                    )
        elif self.method == "moment":
            for name, value in (("sigma", self.sigma), ("alpha", self.alpha)):
                if value <= 0:
                    raise ValueError(f"{name}: method 'moment' needs {name} > 0, got {value}")
            if self.folds != 1:
                raise ValueError(f"folds: method 'moment' takes folds=1, got {self.folds}")
        else:
            if self.sigma <= 0:
                raise ValueError(
                    f"sigma: method {self.method!r} needs sigma > 0, got {self.sigma}"
                )
            if self.method == "augment" and self.folds < 2:
                raise ValueError(f"folds: method 'augment' needs folds >= 2, got {self.folds}")
            if self.method == "gaussian" and self.folds != 1:
                raise ValueError(f"folds: method 'gaussian' takes folds=1, got {self.folds}")
            if self.alpha != 0:
                raise ValueError(
                    f"alpha: method {self.method!r} takes alpha=0, got {self.alpha}"
                )

    # ------------------------------------------------------------------ serialization

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict (``moments`` and ``patience`` only when they are
        not the default, so run ids of runs made before these fields existed stay the same)."""
        d = dataclasses.asdict(self)
        if d["moments"] == "first_relu":
            del d["moments"]
        if d["patience"] is None:
            del d["patience"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"config: unknown field(s) {unknown}")
        missing = [n for n in ("dataset", "model", "method") if n not in d]
        if missing:
            raise ValueError(f"config: missing field(s) {missing}")
        return cls(**d)

    def canonical_json(self) -> str:
        """Sorted-key, whitespace-free JSON of :meth:`to_dict` (floats as Python prints them)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def run_id(self) -> str:
        """First 12 hex digits of the SHA-256 of :meth:`canonical_json`."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:12]

    def training_key(self) -> str:
        """Like :meth:`run_id` but ignoring ``epochs`` and the evaluation fields.

        Two configs with the same key train identical weights epoch by epoch, so a
        checkpoint of one can be resumed (or extended to more epochs) by the other.
        """
        d = self.to_dict()
        for name in ("epochs", *EVALUATION_FIELDS):
            d.pop(name)
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    # ------------------------------------------------------------------ hyper-parameters

    def preset(self) -> TrainPreset:
        """The Table 1 preset of this model with the ``batch_size`` / ``lr`` / ``patience``
        overrides applied."""
        base = PRESETS[self.model]
        return dataclasses.replace(
            base,
            batch_size=self.batch_size if self.batch_size is not None else base.batch_size,
            lr=self.lr if self.lr is not None else base.lr,
            loss_patience=self.patience if self.patience is not None else base.loss_patience,
        )
