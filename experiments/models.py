"""The paper's LeNet and AlexNet adaptations (Section 4.2).

Every model is an ``nn.Sequential`` whose first module is
:class:`momentkit.affine.Normalize` (the dataset's per-channel mean and standard
deviation, so that noise is specified in pixel units in [0, 1]) followed by a
convolution and directly by a ReLU: the structure that
``momentkit.split.split_at_first_relu`` needs to write the network as
``Phi(x) = Omega(ReLU(Upsilon(x)))``.

LeNet::

    Normalize - conv 5x5 (32, pad 2) - ReLU - maxpool 2 - conv 5x5 (64, pad 2) - ReLU
    - maxpool 2 - flatten - fc (64*7*7 = 3136 on 28x28, 4096 on 32x32) -> 1024 - ReLU - fc

AlexNet (torchvision's AlexNet adapted to 32x32: pool kernels 2, conv1 padding 5, first
fc input 256, no dropout; the max-pools after conv2 and conv5 are swapped with the
preceding ReLU, which computes the same function since ReLU is monotone; the ReLU after
conv1 stays directly after it)::

    Normalize - conv 11x11/4 (64, pad 5) - ReLU - maxpool 2 - conv 5x5 (192, pad 2)
    - maxpool 2 - ReLU - conv 3x3 (384) - ReLU - conv 3x3 (256) - ReLU - conv 3x3 (256)
    - maxpool 2 - ReLU - flatten - fc 256 -> 4096 - ReLU - fc 4096 -> 4096 - ReLU - fc

AlexNet needs 32x32 input (on 28x28 the feature map vanishes before the last pool), so
it is defined for CIFAR-10 and CIFAR-100 only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from experiments.data import DATASET_INFO, DatasetInfo
from momentkit.affine import Normalize

if TYPE_CHECKING:
    from experiments.config import RunConfig

MODELS = ("lenet", "alexnet")


def _info(dataset: str) -> DatasetInfo:
    try:
        return DATASET_INFO[dataset]
    except KeyError:
        raise ValueError(
            f"dataset: unknown dataset {dataset!r}; expected one of {sorted(DATASET_INFO)}"
        ) from None


def lenet(dataset: str) -> nn.Sequential:
    """LeNet of the paper for ``dataset`` (input ``(N, C, S, S)`` in [0, 1], output logits).

    Raises ``ValueError`` for an unknown dataset.
    """
    info = _info(dataset)
    side = info.size // 4  # two 2x2 max-pools
    return nn.Sequential(
        Normalize(info.mean, info.std),
        nn.Conv2d(info.channels, 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(1),
        nn.Linear(64 * side * side, 1024),
        nn.ReLU(),
        nn.Linear(1024, info.num_classes),
    )


def alexnet(dataset: str) -> nn.Sequential:
    """AlexNet adapted to 32x32 input for ``dataset`` (CIFAR-10 or CIFAR-100).

    Raises ``ValueError`` for an unknown dataset or one whose images are not 32x32.
    """
    info = _info(dataset)
    if info.size != 32:
        raise ValueError(
            f"model: the AlexNet adaptation needs 32x32 images, but {dataset!r} has "
            f"{info.size}x{info.size}; use 'lenet' for this dataset"
        )
    return nn.Sequential(
        Normalize(info.mean, info.std),
        nn.Conv2d(info.channels, 64, kernel_size=11, stride=4, padding=5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Flatten(1),
        nn.Linear(256, 4096),
        nn.ReLU(),
        nn.Linear(4096, 4096),
        nn.ReLU(),
        nn.Linear(4096, info.num_classes),
    )


def build_model(name: str, dataset: str) -> nn.Sequential:
    """The model called ``name`` (one of :data:`MODELS`) for ``dataset``.

    Raises ``ValueError`` naming the argument for an unknown model or dataset.
    """
    if name == "lenet":
        return lenet(dataset)
    if name == "alexnet":
        return alexnet(dataset)
    raise ValueError(f"model: unknown model {name!r}; expected one of {list(MODELS)}")


def make_model(config: RunConfig, device: torch.device | str = "cpu") -> nn.Sequential:
    """The model of a run config, initialized from ``config.seed`` on ``device``.

    The global RNG is forked, so the caller's random state is left as it was and the
    same config gives the same initial weights in every process.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(config.model, config.dataset)
    return model.to(device)
