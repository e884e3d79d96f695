"""Image data sets for the experiments: loading, caching, splitting and batching.

Four data sets are supported, all through ``torchvision.datasets`` layouts under a
*data root*:

========================  ======================================================
``mnist``                 ``<root>/MNIST/raw/`` (torchvision IDX files)
``fashion-mnist``         ``<root>/FashionMNIST/raw/`` (torchvision IDX files)
``cifar10``               ``<root>/cifar-10-batches-py/`` (torchvision) or an
                          ImageFolder tree ``<root>/cifar10-jpeg/{train,test}/<class>/*.jpg``
                          whose class folders sort alphabetically into CIFAR-10 order
``cifar100``              ``<root>/cifar-100-python/`` (torchvision)
========================  ======================================================

The data root is the ``--data-root`` flag, else the ``MOMENTKIT_DATA`` environment
variable, else ``./data``. A data set that is not there raises
:class:`DatasetNotFoundError` (a ``FileNotFoundError``) naming the root searched, the
layout expected and how to point the code at the data.

Every split is decoded once into a ``uint8`` tensor ``(N, C, H, W)`` and cached as a
``.pt`` file in the cache directory (``MOMENTKIT_CACHE``, else
``~/.cache/momentkit``). The cache key hashes the source path, the number of source
files, their total size and their latest modification time, so a changed source is
decoded again; cache files are written to a temporary name and moved into place, so an
interrupted write never leaves a truncated cache behind.

Images stay ``uint8`` in memory and become ``float`` tensors in [0, 1] only per batch
(:meth:`ImageSet.batch`); batches are drawn by indexing the ``uint8`` tensor with a
permutation (:func:`iterate_batches`), with no per-item ``Dataset`` and no PIL.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from experiments.cli import progress as show_progress
from experiments.rundir import write_atomic

CACHE_FORMAT = 1
"""Bumped whenever the layout of a cache file changes, so old caches are ignored."""

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a data set: classes, image shape, normalization statistics.

    ``mean`` and ``std`` are the usual per-channel statistics of the training images
    in [0, 1] units; models use them in their first (:class:`momentkit.affine.Normalize`)
    module.
    """

    name: str
    num_classes: int
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


DATASET_INFO: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,)),
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,)),
    "cifar10": DatasetInfo(
        "cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ),
    "cifar100": DatasetInfo(
        "cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    ),
}
DATASETS = tuple(DATASET_INFO)

_LAYOUTS = {
    "mnist": "<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte "
    "(torchvision.datasets.MNIST layout)",
    "fashion-mnist": "<root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte "
    "(torchvision.datasets.FashionMNIST layout)",
    "cifar10": "<root>/cifar-10-batches-py/ (torchvision.datasets.CIFAR10 layout) or "
    "<root>/cifar10-jpeg/{train,test}/<class>/*.jpg (ImageFolder layout)",
    "cifar100": "<root>/cifar-100-python/ (torchvision.datasets.CIFAR100 layout)",
}


class DatasetNotFoundError(FileNotFoundError):
    """A data set is not under the data root; the message says where to put it."""


def _resolve(given: str | os.PathLike[str] | None, env_var: str, default: Path) -> Path:
    value = given if given is not None else (os.environ.get(env_var) or default)
    return Path(value).expanduser()


def resolve_data_root(data_root: str | os.PathLike[str] | None = None) -> Path:
    """The data root every entry point uses (``python -m experiments``, ``python -m
    validation``, the benchmarks, the tests): ``data_root`` (the ``--data-root`` flag) if
    given, else the ``MOMENTKIT_DATA`` environment variable if set and not empty, else
    ``./data`` (relative to the working directory). ``~`` is expanded; the folder need
    not exist (loading a data set then raises :class:`DatasetNotFoundError`)."""
    return _resolve(data_root, "MOMENTKIT_DATA", Path("data"))


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: ``cache_dir``, else ``$MOMENTKIT_CACHE``, else ~/.cache/momentkit."""
    return _resolve(cache_dir, "MOMENTKIT_CACHE", Path.home() / ".cache" / "momentkit")


@dataclass(frozen=True)
class ImageSet:
    """Images as ``uint8`` ``(N, C, H, W)`` with ``int64`` labels ``(N,)``.

    The ``uint8`` tensor is what stays in memory; :meth:`batch` converts only the
    requested images to ``float`` in [0, 1].
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images: expected a uint8 tensor (N, C, H, W), got {self.images.dtype} "
                f"with shape {tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels: expected shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def subset(self, indices: torch.Tensor) -> ImageSet:
        """The images at ``indices`` (a 1-D integer tensor), in that order."""
        indices = indices.to(self.images.device)
        return ImageSet(self.images[indices], self.labels[indices])

    def to(self, device: torch.device | str) -> ImageSet:
        """The same images on ``device`` (still ``uint8``)."""
        return ImageSet(self.images.to(device), self.labels.to(device))

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` for ``indices``: ``x`` float32 in [0, 1] ``(B, C, H, W)``, ``y`` ``(B,)``."""
        indices = indices.to(self.images.device)
        return self.images[indices].float().div_(255.0), self.labels[indices]

    def float_images(self) -> torch.Tensor:
        """All images as float32 in [0, 1] (allocates ``4 * N * C * H * W`` bytes)."""
        return self.images.float().div_(255.0)


@dataclass(frozen=True)
class Dataset:
    """A data set's train and test images, its :class:`DatasetInfo` and its source."""

    info: DatasetInfo
    train: ImageSet
    test: ImageSet
    source: str


def iterate_batches(
    data: ImageSet,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches ``(x, y)`` over ``data``: shuffled by ``generator`` if given, else in order.

    The permutation is drawn on the CPU from ``generator`` (so it is the same on every
    device) and used to index the ``uint8`` tensor; the last batch may be smaller.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be positive, got {batch_size}")
    n = len(data)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield data.batch(order[start : start + batch_size])


def train_val_split(
    n: int, seed: int, val_fraction: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded disjoint split of ``range(n)`` into training and validation indices.

    ``round(val_fraction * n)`` indices (at least one when ``n >= 2``) go to
    validation. The same ``(n, seed, val_fraction)`` gives the same split on every
    machine (``torch.randperm`` with a CPU generator). Both index tensors are sorted.
    """
    if n < 2:
        raise ValueError(f"n: need at least 2 images to split, got {n}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: must be in (0, 1), got {val_fraction}")
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    return order[n_val:].sort().values, order[:n_val].sort().values


def subset_indices(n: int, k: int | None, seed: int, name: str = "subset size") -> torch.Tensor:
    """``k`` distinct indices of ``range(n)`` drawn with ``seed``, sorted (all if ``k`` is None).

    Raises:
        ValueError: ``k`` below 1 or above ``n`` (never silently clamped); the message
            starts with ``name`` and gives the requested and the available size.
    """
    if k is not None and k < 1:
        raise ValueError(f"{name}: must be positive, got {k}")
    if k is not None and k > n:
        raise ValueError(f"{name}: {k} images requested, but only {n} are available")
    if k is None or k == n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:k].sort().values


# --------------------------------------------------------------------------- loading


def _missing(name: str, root: Path, detail: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{name}: data set not found under data root {str(root.resolve())!r} ({detail}). "
        f"Expected layout: {_LAYOUTS[name]}. Supply the data root with --data-root DIR "
        f"or the MOMENTKIT_DATA environment variable."
    )


def _fingerprint(paths: list[Path]) -> dict[str, int]:
    count = size = mtime = 0
    for path in paths:
        st = path.stat()
        count += 1
        size += st.st_size
        mtime = max(mtime, st.st_mtime_ns)
    return {"files": count, "bytes": size, "mtime_ns": mtime}


def _cache_path(cache_dir: Path, label: str, source: Path, files: list[Path]) -> Path:
    key = {
        "format": CACHE_FORMAT,
        "label": label,
        "source": str(source.resolve()),
        **_fingerprint(files),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"{label}-{digest}.pt"


def _cached(
    label: str,
    source: Path,
    files: list[Path],
    decode: Callable[[], ImageSet],
    cache_dir: Path | None,
) -> ImageSet:
    """Load ``label`` from the cache if its key matches, else ``decode()`` and store it."""
    if cache_dir is None:
        return decode()
    path = _cache_path(cache_dir, label, source, files)
    if path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            return ImageSet(blob["images"], blob["labels"])
        except Exception as exc:  # a damaged cache file is rebuilt, never trusted
            warnings.warn(f"ignoring unreadable cache file {path}: {exc}", stacklevel=3)
    data = decode()
    try:
        blob = {"images": data.images, "labels": data.labels}
        write_atomic(path, lambda handle: torch.save(blob, handle))
    except OSError as exc:
        warnings.warn(f"could not write cache file {path}: {exc}", stacklevel=3)
    return data


def _image_folder_files(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    items: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        names = sorted(
            entry.name
            for entry in os.scandir(root / cls)
            if entry.is_file() and entry.name.lower().endswith((".jpg", ".jpeg", ".png"))
        )
        items.extend((root / cls / name, label) for name in names)
    return classes, items


def decode_image_file(path: Path) -> torch.Tensor:
    """Decode one JPEG/PNG file to a ``uint8`` RGB tensor ``(3, H, W)`` (with Pillow)."""
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def load_image_folder(
    root: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> tuple[ImageSet, list[str]]:
    """Load an ImageFolder tree ``root/<class>/<image>`` into an :class:`ImageSet`.

    Classes are the sub-folders in sorted order (label ``i`` is the ``i``-th class);
    within a class, files are taken in sorted order. All images must have the same
    size. Returns ``(images, classes)``. Raises ``FileNotFoundError`` if ``root`` does not
    exist, ``ValueError`` if it holds no images or images of different sizes.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root: image folder {str(root)!r} does not exist")
    classes, items = _image_folder_files(root)
    if not items:
        raise ValueError(f"root: image folder {str(root)!r} holds no .jpg/.png images")

    def decode() -> ImageSet:
        images = [
            decode_image_file(path)
            for path, _ in show_progress(
                items, f"decoding {root.name}", enabled=progress, unit="image"
            )
        ]
        shapes = {tuple(img.shape) for img in images}
        if len(shapes) != 1:
            raise ValueError(f"root: images in {str(root)!r} differ in size: {sorted(shapes)}")
        labels = torch.tensor([label for _, label in items], dtype=torch.int64)
        return ImageSet(torch.stack(images), labels)

    cache = resolve_cache_dir(cache_dir) if use_cache else None
    label = f"imagefolder-{root.name}"
    return _cached(label, root, [path for path, _ in items], decode, cache), classes


def _load_idx(name: str, root: Path, cache: Path | None) -> Dataset:
    from torchvision.datasets import MNIST, FashionMNIST

    cls, folder = (MNIST, "MNIST") if name == "mnist" else (FashionMNIST, "FashionMNIST")
    raw = root / folder / "raw"
    names = [f"{split}-{kind}" for split in ("train", "t10k") for kind in
             ("images-idx3-ubyte", "labels-idx1-ubyte")]
    missing = [n for n in names if not (raw / n).is_file()]
    if missing:
        raise _missing(name, root, f"missing {', '.join(str(raw / n) for n in missing)}")

    def decoder(train: bool) -> Callable[[], ImageSet]:
        def decode() -> ImageSet:
            ds = cls(str(root), train=train, download=False)
            return ImageSet(ds.data.unsqueeze(1).contiguous(), ds.targets.to(torch.int64))

        return decode

    splits = {}
    for split, train in (("train", True), ("t10k", False)):
        files = [raw / f"{split}-images-idx3-ubyte", raw / f"{split}-labels-idx1-ubyte"]
        splits[split] = _cached(f"{name}-{split}", raw, files, decoder(train), cache)
    return Dataset(DATASET_INFO[name], splits["train"], splits["t10k"], str(raw))


def _load_cifar_pickle(name: str, root: Path, cache: Path | None) -> Dataset:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, folder = (CIFAR10, "cifar-10-batches-py") if name == "cifar10" else (
        CIFAR100, "cifar-100-python")
    source = root / folder
    files = sorted(p for p in source.iterdir() if p.is_file())

    def decoder(train: bool) -> Callable[[], ImageSet]:
        def decode() -> ImageSet:
            try:
                ds = cls(str(root), train=train, download=False)
            except RuntimeError as exc:  # torchvision's "not found or corrupted"
                raise _missing(name, root, f"{source} is incomplete or corrupted: {exc}") from None
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            return ImageSet(images, torch.as_tensor(ds.targets, dtype=torch.int64))

        return decode

    train = _cached(f"{name}-train", source, files, decoder(True), cache)
    test = _cached(f"{name}-test", source, files, decoder(False), cache)
    return Dataset(DATASET_INFO[name], train, test, str(source))


def load_dataset(
    name: str,
    data_root: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> Dataset:
    """Load the train and test split of data set ``name`` (one of :data:`DATASETS`).

    ``data_root`` defaults to :func:`resolve_data_root`; ``cache_dir`` to
    :func:`resolve_cache_dir`. For ``cifar10`` the torchvision layout is preferred when
    both it and the ImageFolder tree are present.

    Raises ``ValueError`` for an unknown name and :class:`DatasetNotFoundError` when the
    data set is not under the root (the message names the root, the expected layout,
    the ``--data-root`` flag and the ``MOMENTKIT_DATA`` variable).
    """
    if name not in DATASET_INFO:
        raise ValueError(f"dataset: unknown data set {name!r}; expected one of {list(DATASETS)}")
    root = resolve_data_root(data_root)
    cache = resolve_cache_dir(cache_dir) if use_cache else None
    if name in ("mnist", "fashion-mnist"):
        return _load_idx(name, root, cache)
    pickle_dir = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    if pickle_dir.is_dir():
        return _load_cifar_pickle(name, root, cache)
    if name == "cifar10":
        folder = root / "cifar10-jpeg"
        if (folder / "train").is_dir() and (folder / "test").is_dir():
            splits = {}
            for split in ("train", "test"):
                data, classes = load_image_folder(
                    folder / split, cache_dir=cache, use_cache=use_cache, progress=progress
                )
                if tuple(classes) != CIFAR10_CLASSES:
                    raise ValueError(
                        f"{folder / split}: class folders {classes} are not the CIFAR-10 "
                        f"classes {list(CIFAR10_CLASSES)}"
                    )
                splits[split] = data
            return Dataset(DATASET_INFO[name], splits["train"], splits["test"], str(folder))
        raise _missing(name, root, f"neither {pickle_dir} nor {folder}/{{train,test}} exists")
    raise _missing(name, root, f"{pickle_dir} does not exist")
