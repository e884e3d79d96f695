"""Tests of experiments.models: shapes, the paper's layer structure, the split at the first ReLU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from experiments.data import DATASET_INFO
from experiments.models import alexnet, build_model, lenet
from momentkit.affine import Normalize
from momentkit.split import split_at_first_relu

CASES = [
    ("lenet", "mnist"),
    ("lenet", "fashion-mnist"),
    ("lenet", "cifar10"),
    ("lenet", "cifar100"),
    ("alexnet", "cifar10"),
    ("alexnet", "cifar100"),
]


def _input(dataset: str, n: int = 3) -> torch.Tensor:
    info = DATASET_INFO[dataset]
    generator = torch.Generator().manual_seed(0)
    return torch.rand(n, info.channels, info.size, info.size, generator=generator)


@pytest.mark.parametrize(("name", "dataset"), CASES)
def test_output_shape_and_stem(name: str, dataset: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, dataset)
    assert isinstance(model, nn.Sequential)
    out = model(_input(dataset))
    assert out.shape == (3, DATASET_INFO[dataset].num_classes)
    # Normalize with the data set's statistics, then a convolution directly followed by ReLU
    assert isinstance(model[0], Normalize)
    assert model[0].mean.tolist() == pytest.approx(DATASET_INFO[dataset].mean)
    assert isinstance(model[1], nn.Conv2d) and isinstance(model[2], nn.ReLU)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


@pytest.mark.parametrize(("name", "dataset"), CASES)
def test_split_at_first_relu_reproduces_the_model(name: str, dataset: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, dataset)
    upsilon, omega = split_at_first_relu(model)
    assert upsilon.affine is model[1] and upsilon.normalize is model[0]
    x = _input(dataset)
    assert torch.equal(omega(torch.relu(upsilon(x))), model(x))


def test_lenet_layer_sizes() -> None:
    # fc input 64 * 7 * 7 = 3136 on 28x28 and 64 * 8 * 8 = 4096 on 32x32 (paper Sec. 4.2)
    linear = [m for m in lenet("mnist") if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(3136, 1024), (1024, 10)]
    linear = [m for m in lenet("cifar100") if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(4096, 1024), (1024, 100)]
    convs = [m for m in lenet("mnist") if isinstance(m, nn.Conv2d)]
    assert [(m.out_channels, m.kernel_size, m.padding) for m in convs] == [
        (32, (5, 5), (2, 2)), (64, (5, 5), (2, 2))]


def test_alexnet_adaptation() -> None:
    model = alexnet("cifar10")
    conv1 = model[1]
    assert (conv1.kernel_size, conv1.stride, conv1.padding) == ((11, 11), (4, 4), (5, 5))
    pools = [m for m in model if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3 and all(p.kernel_size == 2 for p in pools)
    linear = [m for m in model if isinstance(m, nn.Linear)]
    assert [m.in_features for m in linear] == [256, 4096, 4096]


def test_alexnet_rejects_28x28_and_unknown_names() -> None:
    with pytest.raises(ValueError, match="model: .*32x32"):
        alexnet("mnist")
    with pytest.raises(ValueError, match="model"):
        build_model("resnet", "mnist")
    with pytest.raises(ValueError, match="dataset"):
        lenet("svhn")
