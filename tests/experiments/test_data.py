"""Tests of experiments.data: loading the offline copies, the cache, errors, splits, batches."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch

from experiments import data as data_mod
from experiments.data import (
    CIFAR10_CLASSES,
    DatasetNotFoundError,
    ImageSet,
    iterate_batches,
    load_dataset,
    load_image_folder,
    resolve_data_root,
    subset_indices,
    train_val_split,
)

# Published class counts of MNIST (LeCun et al.; the same in torchvision's copy).
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_shapes_dtypes_and_label_counts(mnist_root: Path) -> None:
    ds = load_dataset("mnist", mnist_root)
    assert ds.train.images.shape == (60000, 1, 28, 28)
    assert ds.test.images.shape == (10000, 1, 28, 28)
    assert ds.train.images.dtype == torch.uint8 and ds.train.labels.dtype == torch.int64
    assert ds.train.labels.bincount().tolist() == MNIST_TRAIN_COUNTS
    assert ds.test.labels.bincount().tolist() == MNIST_TEST_COUNTS
    assert ds.info.num_classes == 10 and ds.info.channels == 1
    # MNIST digits are white on black: both extremes occur
    assert int(ds.test.images.min()) == 0 and int(ds.test.images.max()) == 255


def test_fashion_mnist_is_balanced(data_root: Path) -> None:
    if not (data_root / "FashionMNIST" / "raw").is_dir():
        pytest.skip(f"FashionMNIST not found under {data_root}")
    ds = load_dataset("fashion-mnist", data_root)
    assert ds.train.images.shape == (60000, 1, 28, 28)
    assert ds.train.labels.bincount().tolist() == [6000] * 10
    assert ds.test.labels.bincount().tolist() == [1000] * 10


def _small_cifar_tree(data_root: Path, dest: Path, per_class: int = 2) -> Path:
    """A copy of ``per_class`` real JPEGs per class and split, in the offline layout."""
    source = data_root / "cifar10-jpeg"
    if not source.is_dir():
        pytest.skip(f"cifar10-jpeg not found under {data_root}")
    for split in ("train", "test"):
        for cls in CIFAR10_CLASSES:
            (dest / "cifar10-jpeg" / split / cls).mkdir(parents=True)
            for name in sorted(p.name for p in (source / split / cls).iterdir())[:per_class]:
                shutil.copy(source / split / cls / name, dest / "cifar10-jpeg" / split / cls / name)
    return dest


def test_cifar10_image_folder_loads_in_class_order(data_root: Path, tmp_path: Path) -> None:
    root = _small_cifar_tree(data_root, tmp_path / "data")
    ds = load_dataset("cifar10", root, cache_dir=tmp_path / "cache")
    assert ds.train.images.shape == (20, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert ds.train.labels.tolist() == [c for c in range(10) for _ in range(2)]
    # pixels equal an independent decoder (torchvision's libjpeg-turbo binding) exactly
    files = sorted((root / "cifar10-jpeg" / "test" / "airplane").iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io image decoding
        from torchvision.io import ImageReadMode, decode_image, read_file

        reference = decode_image(read_file(str(files[1])), mode=ImageReadMode.RGB)
    assert torch.equal(ds.test.images[1], reference)


def test_image_folder_cache_hit_and_invalidation(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _small_cifar_tree(data_root, tmp_path / "data", per_class=1)
    folder = root / "cifar10-jpeg" / "train"
    cache = tmp_path / "cache"
    first, classes = load_image_folder(folder, cache_dir=cache)
    assert classes == list(CIFAR10_CLASSES)
    assert len(list(cache.glob("*.pt"))) == 1

    calls = []
    real_decode = data_mod.decode_image_file

    def counting_decode(path: Path) -> torch.Tensor:
        calls.append(path)
        return real_decode(path)

    monkeypatch.setattr(data_mod, "decode_image_file", counting_decode)
    second, _ = load_image_folder(folder, cache_dir=cache)
    assert calls == []  # served from the cache
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)

    # a changed source (one more file) misses the cache and is decoded again
    extra = folder / "cat" / "extra.jpg"
    shutil.copy(next((folder / "dog").iterdir()), extra)
    third, _ = load_image_folder(folder, cache_dir=cache)
    assert len(third) == len(first) + 1 and len(calls) == len(third)


def test_damaged_cache_file_is_rebuilt(mnist_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    good = load_dataset("mnist", mnist_root, cache_dir=cache)
    for path in cache.glob("*.pt"):
        path.write_bytes(b"not a tensor file")
    with pytest.warns(UserWarning, match="unreadable cache file"):
        again = load_dataset("mnist", mnist_root, cache_dir=cache)
    assert torch.equal(good.test.images, again.test.images)


def test_cifar10_wrong_class_folders_are_rejected(data_root: Path, tmp_path: Path) -> None:
    root = _small_cifar_tree(data_root, tmp_path / "data", per_class=1)
    (root / "cifar10-jpeg" / "train" / "truck").rename(root / "cifar10-jpeg" / "train" / "lorry")
    with pytest.raises(ValueError, match="not the CIFAR-10 classes"):
        load_dataset("cifar10", root, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(
    ("name", "layout"),
    [("mnist", "MNIST/raw"), ("fashion-mnist", "FashionMNIST/raw"),
     ("cifar10", "cifar10-jpeg"), ("cifar100", "cifar-100-python")],
)
def test_missing_dataset_names_root_and_how_to_supply_it(
    name: str, layout: str, tmp_path: Path
) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, tmp_path)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for part in (str(tmp_path.resolve()), layout, "--data-root", "MOMENTKIT_DATA"):
        assert part in message


def test_data_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOMENTKIT_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(DatasetNotFoundError, match="elsewhere"):
        load_dataset("mnist")


def test_data_root_order_is_flag_then_environment_then_dot_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOMENTKIT_DATA", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_data_root(None) == tmp_path / "env"
    monkeypatch.setenv("MOMENTKIT_DATA", "")  # set but empty counts as unset
    assert resolve_data_root(None) == Path("data")
    monkeypatch.delenv("MOMENTKIT_DATA")
    assert resolve_data_root() == Path("data")
    assert resolve_data_root("~/d") == Path.home() / "d"


def test_validation_uses_the_same_data_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m validation`` resolved ``../shared``-style defaults of its own before."""
    from validation import __main__ as validation_main

    seen = []
    monkeypatch.setattr(validation_main, "suite_runner",
                        lambda name: lambda cfg: seen.append(cfg.data_root) or None)
    monkeypatch.setattr(validation_main, "write_report", _no_report)
    monkeypatch.setenv("MOMENTKIT_DATA", str(tmp_path / "env"))
    validation_main.main(["cost", "--out", str(tmp_path / "out")])
    validation_main.main(["cost", "--out", str(tmp_path / "out"), "--data-root", "x"])
    monkeypatch.delenv("MOMENTKIT_DATA")
    validation_main.main(["cost", "--out", str(tmp_path / "out")])
    assert seen == [tmp_path / "env", Path("x"), Path("data")]


def _no_report(cfg, report):
    class Written:
        summary: list = []
        seconds = 0.0
        paths = {"md": "-"}

    return Written()


def test_unknown_dataset_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="dataset"):
        load_dataset("imagenet")


def test_train_val_split_is_seeded_disjoint_and_complete() -> None:
    train, val = train_val_split(1000, seed=3)
    again_train, again_val = train_val_split(1000, seed=3)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    assert len(train) == 900 and len(val) == 100
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(1000))
    other_train, _ = train_val_split(1000, seed=4)
    assert not torch.equal(train, other_train)


def test_subset_indices() -> None:
    idx = subset_indices(100, 10, seed=1)
    assert len(set(idx.tolist())) == 10 and bool((idx >= 0).all() and (idx < 100).all())
    assert torch.equal(idx, subset_indices(100, 10, seed=1))
    assert torch.equal(subset_indices(100, None, seed=1), torch.arange(100))
    assert torch.equal(subset_indices(100, 100, seed=1), torch.arange(100))
    # never clamped silently (it was: 101 of 100 gave all 100)
    with pytest.raises(ValueError, match="101 images requested, but only 100 are available"):
        subset_indices(100, 101, seed=1)
    with pytest.raises(ValueError, match="must be positive"):
        subset_indices(100, 0, seed=1)


def test_iterate_batches_visits_every_image_once_as_floats() -> None:
    images = torch.randint(0, 256, (23, 1, 4, 4), dtype=torch.uint8)
    data = ImageSet(images, torch.arange(23))
    seen = []
    for x, y in iterate_batches(data, 5, generator=torch.Generator().manual_seed(0)):
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 4, 4)
        # float pixels are the uint8 values / 255, exactly as float32 division gives
        assert torch.equal(x, images[y].float() / 255)
        seen += y.tolist()
    assert sorted(seen) == list(range(23)) and seen != list(range(23))


def test_image_set_rejects_float_images() -> None:
    with pytest.raises(ValueError, match="images"):
        ImageSet(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))


def test_incomplete_torchvision_cifar_folder_is_reported(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(b"truncated download")
    with pytest.raises(DatasetNotFoundError, match="incomplete or corrupted"):
        load_dataset("cifar100", tmp_path, cache_dir=tmp_path / "cache")
