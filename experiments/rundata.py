"""The images of one run: its training, validation and test parts.

A run draws ``train_subset`` images (all if ``None``) from the training set with its
``seed`` and splits them 90/10, seeded by the same ``seed``, into training and
validation images (:func:`experiments.data.train_val_split`). ``test_subset`` test images
are drawn with the fixed :data:`TEST_SUBSET_SEED`, so every run with the same value sees
the same test images and per-image results can be paired. A subset larger than the set
it is drawn from is an error, never silently clamped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from experiments.config import RunConfig
from experiments.data import ImageSet, load_dataset, subset_indices, train_val_split

TEST_SUBSET_SEED = 0
"""Seed choosing ``test_subset`` images: fixed, so all runs see the same test images."""


@dataclass(frozen=True)
class RunData:
    """The images one run uses: training, validation and test parts."""

    train: ImageSet
    val: ImageSet
    test: ImageSet


def _subset(images: ImageSet, k: int | None, seed: int, field_name: str, what: str) -> ImageSet:
    if k is not None and k > len(images):
        raise ValueError(
            f"{field_name} (--{field_name.replace('_', '-')}): {k} images requested, but "
            f"the {what} has only {len(images)}"
        )
    return images.subset(subset_indices(len(images), k, seed, field_name))


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
    images are drawn with :data:`TEST_SUBSET_SEED`. All parts stay ``uint8`` on ``device``.

    Raises:
        experiments.data.DatasetNotFoundError: the data set is missing.
        ValueError: ``train_subset`` or ``test_subset`` is larger than the set it is
            drawn from (the message names the flag, the requested and available sizes).
    """
    ds = load_dataset(config.dataset, data_root, progress=progress)
    pool = _subset(ds.train, config.train_subset, config.seed, "train_subset",
                   f"{config.dataset} training set")
    test = _test_part(ds.test, config)
    train_idx, val_idx = train_val_split(len(pool), config.seed)
    return RunData(pool.subset(train_idx).to(device), pool.subset(val_idx).to(device),
                   test.to(device))


def prepare_test_data(
    config: RunConfig,
    data_root: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
) -> ImageSet:
    """The test images of ``config`` (``test_subset`` drawn with :data:`TEST_SUBSET_SEED`).

    Raises the errors of :func:`prepare_data`.
    """
    return _test_part(load_dataset(config.dataset, data_root).test, config).to(device)


def _test_part(test: ImageSet, config: RunConfig) -> ImageSet:
    return _subset(test, config.test_subset, TEST_SUBSET_SEED, "test_subset",
                   f"{config.dataset} test set")
