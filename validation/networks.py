"""Networks, data and a short training loop for the ``deep`` suite.

Defined here, not imported from ``experiments``, so that the validation suites stand
on ``momentkit`` alone. ``lenet_shaped(1.0)`` has the layers of the paper's LeNet
(conv 5x5 32 - ReLU - maxpool - conv 5x5 64 - ReLU - maxpool - fc 1024 - ReLU - fc);
smaller ``width`` scales the channel and unit counts for quick runs.
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


def lenet_shaped(width: float = 1.0, classes: int = 10) -> nn.Sequential:
    """The paper's LeNet for 28x28 grey input, channel/unit counts scaled by ``width``."""
    c1, c2, f = max(1, round(32 * width)), max(1, round(64 * width)), max(1, round(1024 * width))
    return nn.Sequential(
        Normalize([MNIST_MEAN], [MNIST_STD]),
        nn.Conv2d(1, c1, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 7 * 7, f),
        nn.ReLU(),
        nn.Linear(f, classes),
    )


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
        return ImageData(trx, tr_y, tex, te_y, f"MNIST ({raw})", False)
    protos = torch.nn.functional.avg_pool2d(torch.rand(10, 1, 28, 28, generator=gen), 5, 1, 2)
    protos = (protos - protos.mean()) * 6 + 0.3

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (n,), generator=gen)
        x = (protos[y] + 0.2 * torch.randn(n, 1, 28, 28, generator=gen)).clamp(0, 1)
        return x, y

    trx, tr_y = draw(n_train)
    tex, te_y = draw(n_test)
    where = "no root given" if raw is None else f"{raw} not found"
    return ImageData(trx, tr_y, tex, te_y, f"synthetic digits ({where}; MNIST missing)", True)


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
