"""Tests of experiments.config: validation, serialization, run ids, Table 1 presets."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from experiments.config import PRESETS, RunConfig


def test_presets_are_table_1() -> None:
    lenet, alexnet = PRESETS["lenet"], PRESETS["alexnet"]
    assert (lenet.optimizer, lenet.batch_size, lenet.lr, lenet.lr_patience, lenet.lr_factor,
            lenet.loss_patience, lenet.weight_decay) == ("adam", 1000, 1e-4, 3, 0.9, 10, 0.0)
    assert (alexnet.optimizer, alexnet.batch_size, alexnet.lr, alexnet.lr_patience,
            alexnet.lr_factor, alexnet.loss_patience, alexnet.weight_decay) == (
        "sgd", 128, 0.1, 5, 0.5, 20, 5e-4)


def test_preset_overrides() -> None:
    cfg = RunConfig("mnist", "lenet", "baseline", batch_size=64, lr=1e-3)
    assert (cfg.preset().batch_size, cfg.preset().lr, cfg.preset().optimizer) == (64, 1e-3, "adam")
    assert RunConfig("cifar10", "alexnet", "baseline").preset() == PRESETS["alexnet"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(dataset="svhn", model="lenet", method="baseline"), "dataset"),
        (dict(dataset="mnist", model="vgg", method="baseline"), "model"),
        (dict(dataset="mnist", model="lenet", method="dropout"), "method"),
        (dict(dataset="mnist", model="alexnet", method="baseline"), "model"),
        (dict(dataset="mnist", model="lenet", method="baseline", sigma=0.5), "sigma"),
        (dict(dataset="mnist", model="lenet", method="moment", sigma=0.5), "alpha"),
        (dict(dataset="mnist", model="lenet", method="augment", sigma=0.5), "folds"),
        (dict(dataset="mnist", model="lenet", method="augment", folds=2), "sigma"),
        (dict(dataset="mnist", model="lenet", method="gaussian"), "sigma"),
        (dict(dataset="mnist", model="lenet", method="gaussian", sigma=0.5, folds=2), "folds"),
        (dict(dataset="mnist", model="lenet", method="gaussian", sigma=0.5, alpha=1), "alpha"),
        (dict(dataset="mnist", model="lenet", method="baseline", sigma=-1.0), "sigma"),
        (dict(dataset="mnist", model="lenet", method="baseline", epochs=0), "epochs"),
        (dict(dataset="mnist", model="lenet", method="baseline", epochs=True), "epochs"),
        (dict(dataset="mnist", model="lenet", method="baseline", seed=1.5), "seed"),
        (dict(dataset="mnist", model="lenet", method="baseline", lr=float("nan")), "lr"),
        (dict(dataset="mnist", model="lenet", method="baseline", eval_sigmas=1), "eval_sigmas"),
    ],
)
def test_invalid_fields_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}"):
        RunConfig(**kwargs)


def test_round_trip_and_unknown_keys() -> None:
    cfg = RunConfig("cifar10", "alexnet", "moment", sigma=0.25, alpha=2, train_subset=100)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.alpha == 2.0 and isinstance(cfg.alpha, float)
    with pytest.raises(ValueError, match="unknown field"):
        RunConfig.from_dict({**cfg.to_dict(), "momentum": 0.9})
    with pytest.raises(ValueError, match="missing"):
        RunConfig.from_dict({"dataset": "mnist"})


@pytest.mark.slow
def test_run_id_is_stable_across_processes() -> None:
    cfg = RunConfig("mnist", "lenet", "augment", sigma=0.5, folds=6, seed=3)
    code = (
        "from experiments.config import RunConfig;"
        "print(RunConfig('mnist', 'lenet', 'augment', sigma=0.5, folds=6, seed=3).run_id())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert other == cfg.run_id() and len(other) == 12
    # an int sigma is the same run as the float
    assert RunConfig("mnist", "lenet", "augment", sigma=1, folds=6).run_id() == RunConfig(
        "mnist", "lenet", "augment", sigma=1.0, folds=6).run_id()


def test_run_id_changes_with_every_field() -> None:
    base = RunConfig("mnist", "lenet", "moment", sigma=0.5, alpha=1.0)
    changes = dict(dataset="cifar10", model="alexnet", sigma=0.25, alpha=2.0, epochs=5, seed=1,
                   train_subset=100, batch_size=10, lr=0.1, eval_sigmas=5, eval_samples=2,
                   test_subset=50, patience=2)
    ids = {base.run_id()}
    for name, value in changes.items():
        extra = {"dataset": "cifar10"} if name == "model" else {}
        ids.add(dataclasses.replace(base, **{name: value}, **extra).run_id())
    assert len(ids) == len(changes) + 1


def test_training_key_ignores_epochs_and_evaluation() -> None:
    base = RunConfig("mnist", "lenet", "baseline", epochs=2)
    same = dataclasses.replace(base, epochs=50, eval_sigmas=5, eval_samples=3, test_subset=10)
    assert same.training_key() == base.training_key() and same.run_id() != base.run_id()
    assert dataclasses.replace(base, seed=1).training_key() != base.training_key()


def test_moments_field_keeps_old_run_ids_and_round_trips() -> None:
    """The ``moments`` field is left out at its default, so committed run ids still match."""
    import json
    from pathlib import Path

    results = Path(__file__).parents[2] / "docs/results/reduced-cpu/run_results"
    for folder in sorted(results.iterdir())[:4]:
        config = json.loads((folder / "results.json").read_text())["config"]
        assert RunConfig.from_dict(config).run_id() == folder.name
    net = RunConfig("mnist", "lenet", "moment", sigma=0.5, alpha=1.0, moments="network")
    assert net.to_dict()["moments"] == "network"
    assert RunConfig.from_dict(net.to_dict()) == net
    assert net.run_id() != RunConfig("mnist", "lenet", "moment", sigma=0.5, alpha=1.0).run_id()
    with pytest.raises(ValueError, match="^moments"):
        RunConfig("mnist", "lenet", "baseline", moments="network")
    with pytest.raises(ValueError, match="^moments"):
        RunConfig("mnist", "lenet", "moment", sigma=0.5, alpha=1.0, moments="exact")


def test_patience_overrides_the_preset_and_keeps_old_run_ids() -> None:
    base = RunConfig("mnist", "lenet", "baseline")
    assert "patience" not in base.to_dict() and base.preset().loss_patience == 10
    short = dataclasses.replace(base, patience=3)
    assert short.preset().loss_patience == 3 and short.to_dict()["patience"] == 3
    assert RunConfig.from_dict(short.to_dict()) == short
    assert short.training_key() != base.training_key()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="^patience"):
            RunConfig("mnist", "lenet", "baseline", patience=bad)
