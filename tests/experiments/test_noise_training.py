"""Tests of Gaussian noise training (experiments.augment): determinism and distribution.

Statistical checks use 5 standard errors: a false alarm has probability below 1e-6 each.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from experiments.augment import (
    augmentation_noise,
    gaussian_noise_batches,
    gaussian_training_noise,
)
from experiments.data import ImageSet

K = 5.0


def test_noise_is_a_function_of_seed_image_and_epoch_only() -> None:
    index = torch.tensor([4, 8, 4, 0])
    z = gaussian_training_noise(3, index, 2, (1, 7, 7))
    assert z.shape == (4, 1, 7, 7)
    assert torch.equal(z, gaussian_training_noise(3, index, 2, (1, 7, 7)))
    assert torch.equal(z[0], z[2])  # the same image in the same epoch: the same draw
    assert torch.equal(z[1:2], gaussian_training_noise(3, index[1:2], 2, (1, 7, 7)))
    # a fresh draw per epoch, per image and per seed; apart from the augmentation copies
    for other in (gaussian_training_noise(3, index, 3, (1, 7, 7)),
                  gaussian_training_noise(4, index, 2, (1, 7, 7))):
        assert not bool((other == z).any())
    copies = augmentation_noise(3, index, torch.full_like(index, 2), (1, 7, 7))
    assert not bool((copies == z).any())
    with pytest.raises(ValueError, match="epoch"):
        gaussian_training_noise(0, index, -1, (4,))


def test_noise_is_standard_normal_and_fresh_each_epoch() -> None:
    n_img, size = 500, 256
    index = torch.arange(n_img)
    z1 = gaussian_training_noise(11, index, 1, (size,)).double()
    z2 = gaussian_training_noise(11, index, 2, (size,)).double()
    flat = z1.flatten()
    n = flat.numel()
    assert abs(float(flat.mean())) < K / math.sqrt(n)
    assert abs(float(flat.var()) - 1.0) < K * math.sqrt(2.0 / n)
    # Kolmogorov-Smirnov against N(0, 1) on the first 20000 values (p-value > 1e-6)
    assert stats.kstest(flat[:20_000].numpy(), "norm").pvalue > 1e-6
    # two epochs of the same image are uncorrelated: mean correlation over 500 images,
    # standard error 1/sqrt(256 * 500)
    corr = (z1 * z2).mean(1)
    assert abs(float(corr.mean())) < K / math.sqrt(size * n_img)


def test_noise_epoch_visits_every_image_once_with_its_draw() -> None:
    n, sigma, seed, epoch = 13, 0.25, 7, 4
    images = torch.randint(0, 256, (n, 1, 5, 5), dtype=torch.uint8)
    data = ImageSet(images, torch.arange(n))  # the label is the image's index
    batches = list(gaussian_noise_batches(data, 5, sigma, seed, epoch,
                                          torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in batches] == [5, 5, 3]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert sorted(y.tolist()) == list(range(n))
    expected = images[y].float() / 255 + sigma * gaussian_training_noise(seed, y, epoch, (1, 5, 5))
    assert torch.equal(x, expected)
    # a different batch size permutes the same way and adds the same noise
    again = list(gaussian_noise_batches(data, 4, sigma, seed, epoch,
                                        torch.Generator().manual_seed(0)))
    assert torch.equal(torch.cat([b[0] for b in again]), x)
    clean = next(gaussian_noise_batches(data, n, 0.0, seed, epoch, torch.Generator()))
    assert torch.equal(clean[0], images[clean[1]].float() / 255)


def test_the_gaussian_method_trains_on_one_fresh_draw_per_image_and_epoch() -> None:
    """``method="gaussian"`` feeds training exactly the batches of :func:`gaussian_noise_batches`
    with the run's seed and the epoch, and a config for it round-trips."""
    from experiments.config import RunConfig
    from experiments.training import _epoch_generator, _train_batches

    config = RunConfig("mnist", "lenet", "gaussian", sigma=0.25, seed=7)
    assert RunConfig.from_dict(config.to_dict()) == config
    n = 10
    data = ImageSet(torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8), torch.arange(n))
    got = list(_train_batches(config, data, 4, epoch=3))
    want = list(gaussian_noise_batches(data, 4, 0.25, 7, 3, _epoch_generator(7, 3)))
    assert len(got) == len(want) == 3
    for (x, y), (xw, yw) in zip(got, want, strict=True):
        assert torch.equal(y, yw)
        assert torch.equal(x, xw)
        noise = (x - data.batch(y)[0]) / 0.25
        assert torch.allclose(noise, gaussian_training_noise(7, y, 3, (1, 4, 4)), atol=1e-5)
