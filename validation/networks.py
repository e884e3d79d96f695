"""Networks, data and a short training loop for the ``deep`` suite.

Defined here, not imported from ``experiments``, so that the validation suites stand
on ``momentkit`` alone (the one exception: the paper's AlexNet, taken from
:func:`experiments.models.alexnet`). ``lenet_shaped(1.0)`` has the layers of the paper's
LeNet (conv 5x5 32 - ReLU - maxpool - conv 5x5 64 - ReLU - maxpool - fc 1024 - ReLU -
fc); smaller ``width`` scales the channel and unit counts for quick runs, and
``pool="avg"`` replaces its max-pools by 2x2 average pools. :func:`small_resnet` is a
small residual network with BatchNorm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from momentkit.affine import Normalize

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


def mlp(hidden_layers: int, width: int, n_in: int = 784, classes: int = 10) -> nn.Sequential:
    """``Normalize - Flatten - (Linear - ReLU) x hidden_layers - Linear`` for 28x28 input."""
    layers: list[nn.Module] = [Normalize([MNIST_MEAN], [MNIST_STD]), nn.Flatten()]
    size = n_in
    for _ in range(hidden_layers):
        layers += [nn.Linear(size, width), nn.ReLU()]
        size = width
    layers.append(nn.Linear(size, classes))
    return nn.Sequential(*layers)


def lenet_shaped(width: float = 1.0, classes: int = 10, pool: str = "max") -> nn.Sequential:
    """The paper's LeNet for 28x28 grey input, channel/unit counts scaled by ``width``;
    ``pool="avg"`` uses 2x2 average pools in place of its 2x2 max-pools."""
    if pool not in ("max", "avg"):
        raise ValueError(f"lenet_shaped: pool must be 'max' or 'avg', got {pool!r}")
    c1, c2, f = max(1, round(32 * width)), max(1, round(64 * width)), max(1, round(1024 * width))
    pooling = nn.MaxPool2d if pool == "max" else nn.AvgPool2d
    return nn.Sequential(
        Normalize([MNIST_MEAN], [MNIST_STD]),
        nn.Conv2d(1, c1, 5, padding=2),
        nn.ReLU(),
        pooling(2),
        nn.Conv2d(c1, c2, 5, padding=2),
        nn.ReLU(),
        pooling(2),
        nn.Flatten(),
        nn.Linear(c2 * 7 * 7, f),
        nn.ReLU(),
        nn.Linear(f, classes),
    )


class BasicBlock(nn.Module):
    """``ReLU(BN(conv3x3(ReLU(BN(conv3x3(x))))) + shortcut(x))``, the residual block of
    He et al. (2016); the shortcut is the identity, or a strided 1x1 convolution with
    BatchNorm when the block changes the shape."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        """``c_in`` to ``c_out`` channels; ``stride`` 2 halves the spatial size."""
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output for a batch ``x`` of shape ``(N, c_in, H, W)``."""
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


def small_resnet(width: int = 8, classes: int = 10) -> nn.Sequential:
    """A small ResNet for 28x28 grey input::

        Normalize - conv 3x3 (width) - ReLU - block(width) - block(2 width, stride 2)
        - block(4 width, stride 2) - global average pool - flatten - fc

    with :class:`BasicBlock` residual blocks (BatchNorm2d after every convolution in
    them). The stem has no BatchNorm, so that the network splits at its first ReLU as
    the regularizer's surrogate needs. Set the BatchNorm running statistics before use
    (:func:`set_batchnorm_statistics` or training); the moments are those of eval mode.
    """
    return nn.Sequential(
        Normalize([MNIST_MEAN], [MNIST_STD]),
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        BasicBlock(width, width),
        BasicBlock(width, 2 * width, stride=2),
        BasicBlock(2 * width, 4 * width, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, classes),
    )


def set_batchnorm_statistics(model: nn.Module, x: torch.Tensor, batch: int = 100) -> None:
    """Set every BatchNorm layer's running mean and variance to the cumulative average of
    its batch statistics over ``x`` (forward passes in train mode, no parameter update);
    leaves the model in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(x[i : i + batch])
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    model.eval()


def _read_idx(raw: Path, split: str, n: int, gen: torch.Generator):
    """``n`` random images and labels of an MNIST split from its uncompressed IDX files
    (memory-mapped: only the chosen images are read)."""
    images = raw / f"{split}-images-idx3-ubyte"
    labels = raw / f"{split}-labels-idx1-ubyte"
    for path in (images, labels):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: MNIST is expected as the four uncompressed IDX files in "
                f"{raw} (torchvision layout); supply them or point --data-root / "
                "MOMENTKIT_DATA at a folder that holds MNIST/raw"
            )
    img = np.memmap(images, dtype=np.uint8, mode="r")
    lab = np.memmap(labels, dtype=np.uint8, mode="r")
    count = int.from_bytes(img[4:8].tobytes(), "big")
    if (
        int.from_bytes(img[:4].tobytes(), "big") != 2051
        or int.from_bytes(lab[:4].tobytes(), "big") != 2049
        or img.size != 16 + count * 784
        or lab.size != 8 + count
    ):
        raise ValueError(f"{images} or {labels} is not a valid MNIST IDX file (corrupt?)")
    idx = np.sort(torch.randperm(count, generator=gen)[:n].numpy())
    x = np.asarray(img[16:]).reshape(count, 1, 28, 28)[idx]
    y = np.asarray(lab[8:])[idx]
    return torch.from_numpy(x.astype(np.float32) / 255), torch.from_numpy(y.astype(np.int64))


@dataclass(frozen=True)
class ImageData:
    """Train and test images ``(N, 1, 28, 28)`` in [0, 1] with labels; ``source`` says
    where they came from (``"MNIST (<root>)"`` or a note that they are synthetic)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str
    synthetic: bool


def load_mnist_subset(root: Path | None, n_train: int, n_test: int, seed: int) -> ImageData:
    """``n_train`` training and ``n_test`` test images of MNIST from ``root`` (the
    torchvision layout ``root/MNIST/raw``), or synthetic digits when that folder is
    missing. Missing or corrupt files inside an existing folder are an error.

    The synthetic fallback: ten smooth random 28x28 prototypes, one per class, plus
    pixel noise, clipped to [0, 1]. It exercises the same code; the source string says
    which was used and is written into every output of the suite.
    """
    gen = torch.Generator().manual_seed(seed)
    raw = None if root is None else Path(root) / "MNIST" / "raw"
    if raw is not None and raw.is_dir():
        trx, tr_y = _read_idx(raw, "train", n_train, gen)
        tex, te_y = _read_idx(raw, "t10k", n_test, gen)
        return ImageData(trx, tr_y, tex, te_y, "MNIST (DATA_ROOT/MNIST/raw)", False)
    where = "no root given" if raw is None else f"{raw} not found"
    return _synthetic(gen, n_train, n_test, (1, 28, 28), 0.3,
                      f"synthetic digits ({where}; MNIST missing)")


def _synthetic(gen: torch.Generator, n_train: int, n_test: int, shape: tuple[int, int, int],
               level: float, source: str) -> ImageData:
    """Ten smooth random prototypes plus pixel noise, clamped to [0, 1]: the stand-in
    data of the suites when a data set is missing (``source`` says so)."""
    protos = torch.nn.functional.avg_pool2d(torch.rand(10, *shape, generator=gen), 5, 1, 2)
    protos = (protos - protos.mean()) * 6 + level

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (n,), generator=gen)
        x = (protos[y] + 0.2 * torch.randn(n, *shape, generator=gen)).clamp(0, 1)
        return x, y

    trx, tr_y = draw(n_train)
    tex, te_y = draw(n_test)
    return ImageData(trx, tr_y, tex, te_y, source, True)


def train_quickly(
    model: nn.Module, data: ImageData, epochs: int, seed: int, device: torch.device
) -> float:
    """Adam (lr 1e-3, batch 100) for ``epochs`` epochs; returns the test accuracy."""
    torch.manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = data.train_x.to(device), data.train_y.to(device)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen).to(device)
        for i in range(0, len(x), 100):
            idx = order[i : i + 100]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(data.test_x.to(device)).argmax(1).cpu()
    return float((pred == data.test_y).float().mean())


def load_cifar10_subset(root: Path | None, n_train: int, n_test: int, seed: int) -> ImageData:
    """``n_train`` training and ``n_test`` test images ``(N, 3, 32, 32)`` in [0, 1] of
    CIFAR-10 from the JPEG image-folder copy ``root/cifar10-jpeg/{train,test}/<class>/``
    (classes in alphabetical order, which is CIFAR-10's), or synthetic 32x32 colour
    images (smooth class prototypes plus noise) when that folder is missing."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    base = None if root is None else Path(root) / "cifar10-jpeg"
    if base is not None and base.is_dir():

        def draw_split(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
            classes = sorted(p.name for p in (base / split).iterdir() if p.is_dir())
            files = [
                (f, k) for k, c in enumerate(classes) for f in sorted((base / split / c).iterdir())
            ]
            if len(classes) != 10 or not files:
                raise ValueError(f"{base / split} does not hold the 10 CIFAR-10 class folders")
            pick = torch.randperm(len(files), generator=gen)[:n].tolist()
            xs, ys = [], []
            for i in pick:
                with Image.open(files[i][0]) as image:
                    xs.append(np.asarray(image.convert("RGB")).transpose(2, 0, 1))
                ys.append(files[i][1])
            x = torch.from_numpy(np.stack(xs).astype(np.float32) / 255)
            return x, torch.tensor(ys, dtype=torch.int64)

        trx, tr_y = draw_split("train", n_train)
        tex, te_y = draw_split("test", n_test)
        return ImageData(trx, tr_y, tex, te_y, "CIFAR-10 JPEG copy (DATA_ROOT/cifar10-jpeg)", False)
    where = "no root given" if base is None else f"{base} not found"
    return _synthetic(gen, n_train, n_test, (3, 32, 32), 0.45,
                      f"synthetic images ({where}; CIFAR-10 missing)")
