"""Networks and data of the validation suites."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from validation.networks import lenet_shaped, load_mnist_subset, mlp


def test_shapes():
    x = torch.rand(2, 1, 28, 28)
    assert lenet_shaped(1.0)(x).shape == (2, 10) and mlp(3, 32)(x).shape == (2, 10)
    convs = [m for m in lenet_shaped(1.0) if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64]  # the paper's LeNet at width 1


def test_mnist_subset(data_root: Path):
    if not (data_root / "MNIST" / "raw").is_dir():
        pytest.skip(f"MNIST not found under {data_root}")
    data = load_mnist_subset(data_root, 50, 20, seed=0)
    assert data.train_x.shape == (50, 1, 28, 28) and data.test_y.shape == (20,)
    assert not data.synthetic and 0 <= float(data.train_x.min()) <= float(data.train_x.max()) <= 1


def test_missing_root_falls_back_to_synthetic_and_says_so(tmp_path: Path):
    data = load_mnist_subset(tmp_path, 30, 10, seed=0)
    assert data.synthetic and str(tmp_path) in data.source and data.train_x.shape[0] == 30


def test_corrupt_or_incomplete_mnist_is_an_error(tmp_path: Path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist_subset(tmp_path, 10, 10, seed=0)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (raw / name).write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a valid MNIST IDX"):
        load_mnist_subset(tmp_path, 10, 10, seed=0)
