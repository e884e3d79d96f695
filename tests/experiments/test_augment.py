"""Tests of experiments.augment: Philox known answers, noise statistics, augmented epochs."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from scipy import stats

from experiments import _philox_numba
from experiments.augment import (
    _counter_normal_cpu,
    _counter_normal_torch,
    _mulhilo,
    add_counter_normal_,
    augmentation_noise,
    augmented_batches,
    counter_normal,
    philox4x32,
)
from experiments.data import ImageSet

# Random123 tests/kat_vectors, the three "philox4x32 10" lines: counter, key, expected.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("counter", "key", "expected"), PHILOX_KAT)
def test_philox_matches_random123_known_answers(counter, key, expected) -> None:
    out = philox4x32(tuple(torch.tensor([c]) for c in counter), key)
    assert [int(o) for o in out] == list(expected)


@pytest.mark.parametrize(("counter", "key", "expected"), PHILOX_KAT)
def test_compiled_philox_matches_random123_known_answers(counter, key, expected) -> None:
    out = _philox_numba.philox4x32_words(np.array([counter], dtype=np.uint64), *key, 10)
    assert out[0].tolist() == list(expected)


def test_compiled_philox_equals_torch_philox() -> None:
    gen = torch.Generator().manual_seed(3)
    counters = torch.randint(0, 2**32, (2000, 4), generator=gen)
    for key in ((0, 0), (0xFFFFFFFF, 0xFFFFFFFF), (0x12345678, 0x9ABCDEF0)):
        expected = torch.stack(philox4x32(tuple(counters.T), key), dim=1)
        out = _philox_numba.philox4x32_words(counters.numpy().astype(np.uint64), *key, 10)
        assert out.astype(np.int64).tolist() == expected.tolist()


def test_compiled_uniforms_equal_torch_uniforms_bit_for_bit() -> None:
    # the edges of the rounding: below and above 2**23 lattice points, the top word
    words = [0, 255, 256, 2**31 - 1, 2**31, 2**31 + 256, 2**32 - 257, 2**32 - 256, 2**32 - 1]
    words += torch.randint(0, 2**32, (500,), generator=torch.Generator().manual_seed(4)).tolist()
    expected = ((torch.tensor(words) >> 8).to(torch.float32) + 0.5) * 2.0**-24
    out = [_philox_numba._uniform(np.uint64(w)) for w in words]
    assert torch.equal(torch.tensor(out, dtype=torch.float32), expected)
    assert float(expected.max()) == 1.0 and float(expected.min()) == 2.0**-25


@pytest.mark.parametrize("seed", [0, 2**64 - 1, 0xDEADBEEFCAFEBABE])
@pytest.mark.parametrize("num_values", [1, 3, 785])
def test_compiled_normals_equal_torch_path_within_four_ulps(seed, num_values) -> None:
    # Both paths round to float32 at the same places, from the same float32 uniforms and
    # angles. The kernel's log/cos/sin are float64 rounded once (error <= 1/2 ulp); the
    # torch path's float32 log/cos/sin are within 1 ulp. Through sqrt(-2 log u1) a log
    # error of e ulps becomes e/2 ulps plus the sqrt's rounding, and the product
    # radius * cos adds one rounding on each path: at most about 3 ulps apart, bounded
    # here by 4 ulps of the torch value (ulp = spacing of float32 at |z|).
    gen = torch.Generator().manual_seed(5)
    index = torch.randint(0, 2**32, (400,), generator=gen)
    copy = torch.randint(0, 2**32, (400,), generator=gen)
    fast = _counter_normal_cpu(seed, index, copy, num_values)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # its ~300 small operations are slow to share on a busy CPU
    try:
        ref = _counter_normal_torch(seed, index, copy, num_values)
    finally:
        torch.set_num_threads(threads)
    assert fast.shape == ref.shape == (400, num_values) and fast.dtype == torch.float32
    ulp = torch.nextafter(ref.abs(), torch.tensor(math.inf)) - ref.abs()
    assert bool(((fast - ref).abs() <= 4 * ulp).all())
    # and most values are the same float: the paths are the same stream, not two streams
    assert float((fast == ref).double().mean()) > 0.5


def test_counter_normal_uses_the_compiled_kernel_on_the_cpu() -> None:
    index, copy = torch.tensor([4, 8]), torch.tensor([1, 2])
    z = counter_normal(9, index, copy, 10)
    assert torch.equal(z, _counter_normal_cpu(9, index, copy, 10))
    z64 = counter_normal(9, index, copy, 10, dtype=torch.float64)
    assert z64.dtype == torch.float64 and torch.equal(z64, z.double())


@pytest.mark.parametrize("clean_copy_zero", [False, True])
def test_add_counter_normal_equals_adding_counter_normal(clean_copy_zero) -> None:
    gen = torch.Generator().manual_seed(6)
    index, copy = torch.randint(0, 1000, (6,), generator=gen), torch.tensor([0, 1, 2, 0, 5, 9])
    x = torch.rand(6, 2, 3, 5, generator=gen)
    z = counter_normal(3, index, copy, 30).reshape(x.shape)
    if clean_copy_zero:
        z[copy == 0] = 0.0
    expected = x + 0.3 * z  # float32 arithmetic, the same floats in place
    # the compiled in-place pass on a contiguous float32 batch, and the tensor fallback
    for batch in (x.clone(), x.clone().transpose(2, 3).contiguous().transpose(2, 3)):
        out = add_counter_normal_(batch, 3, index, copy, 0.3, clean_copy_zero=clean_copy_zero)
        assert out is batch and torch.equal(out, expected)
    with pytest.raises(ValueError, match="x: expected"):
        add_counter_normal_(x[:5], 3, index, copy, 0.3)


def test_mulhilo_equals_exact_integer_product() -> None:
    rng = random.Random(0)
    a = [rng.randrange(2**32) for _ in range(1000)] + [0, 1, 2**32 - 1]
    for m in (0xD2511F53, 0xCD9E8D57, 2**32 - 1):
        hi, lo = _mulhilo(torch.tensor(a, dtype=torch.int64), m)
        assert hi.tolist() == [(v * m) >> 32 for v in a]
        assert lo.tolist() == [(v * m) & 0xFFFFFFFF for v in a]


def test_noise_is_reproducible_and_independent_of_the_batch() -> None:
    index = torch.tensor([5, 9, 5, 0])
    copy = torch.tensor([1, 1, 2, 3])
    z = counter_normal(7, index, copy, 50)
    assert torch.equal(z, counter_normal(7, index, copy, 50))
    # the noise of a pair does not depend on which other pairs share its batch
    alone = counter_normal(7, index[2:3], copy[2:3], 50)
    assert torch.equal(z[2:3], alone)
    # a longer image extends the same stream: the first values agree
    assert torch.equal(counter_normal(7, index, copy, 80)[:, :50], z)


def test_noise_differs_per_image_copy_and_seed() -> None:
    n = 30
    index = torch.arange(n).repeat_interleave(3)
    copy = torch.arange(3).repeat(n)
    z = counter_normal(0, index, copy, 64)
    # no two (image, copy) pairs share a pattern, not even one value in the same place
    equal_somewhere = (z.unsqueeze(0) == z.unsqueeze(1)).any(dim=-1)
    assert int(equal_somewhere.sum()) == z.shape[0]  # only the diagonal
    assert not torch.equal(z, counter_normal(1, index, copy, 64))


def test_noise_is_standard_normal() -> None:
    # 2000 (image, copy) pairs x 256 values = 512000 draws.
    index = torch.arange(1000).repeat(2)
    copy = torch.arange(1, 3).repeat_interleave(1000)
    z = counter_normal(123, index, copy, 256).double().flatten()
    n = z.numel()
    k = 5.0  # 5 standard errors: a false alarm has probability < 1e-6 per check
    assert abs(float(z.mean())) < k / math.sqrt(n)
    assert abs(float(z.var()) - 1.0) < k * math.sqrt(2.0 / n)
    # fourth moment 3, standard error sqrt((E z^8 - 9) / n) = sqrt(96 / n)
    assert abs(float((z**4).mean()) - 3.0) < k * math.sqrt(96.0 / n)
    # tail mass beyond 1.96: binomial standard error
    p = 2 * stats.norm.sf(1.96)
    assert abs(float((z.abs() > 1.96).double().mean()) - p) < k * math.sqrt(p * (1 - p) / n)
    # different images are uncorrelated: the correlation of two images' 256-vectors has
    # standard error 1/sqrt(256); the mean over 999 neighbouring pairs 1/sqrt(256*999)
    rows = counter_normal(123, torch.arange(1000), torch.ones(1000, dtype=torch.long), 256)
    rows = (rows - rows.mean(1, keepdim=True)) / rows.std(1, keepdim=True)
    corr = (rows[1:] * rows[:-1]).mean(1).double()
    assert abs(float(corr.mean())) < k / math.sqrt(256 * 999)


def test_copy_zero_is_clean() -> None:
    noise = augmentation_noise(0, torch.tensor([3, 3]), torch.tensor([0, 1]), (1, 4, 4))
    assert noise.shape == (2, 1, 4, 4)
    assert bool((noise[0] == 0).all()) and bool((noise[1] != 0).all())


def test_augmented_epoch_visits_each_image_copy_pair_once() -> None:
    n, folds, sigma, seed = 12, 3, 0.25, 5
    images = torch.randint(0, 256, (n, 1, 5, 5), dtype=torch.uint8)
    data = ImageSet(images, torch.arange(n))
    clean = images.float() / 255
    generator = torch.Generator().manual_seed(0)
    outputs, labels = [], []
    for x, y in augmented_batches(data, 7, folds, sigma, seed, generator):
        outputs.append(x)
        labels.append(y)
    x, y = torch.cat(outputs), torch.cat(labels)
    assert x.shape == (folds * n, 1, 5, 5)
    # every expected image (clean + sigma * z(seed, i, c)) appears exactly once
    index = torch.arange(n).repeat(folds)
    copy = torch.arange(folds).repeat_interleave(n)
    expected = clean[index] + sigma * augmentation_noise(seed, index, copy, (1, 5, 5))
    matches = (x.flatten(1).unsqueeze(1) == expected.flatten(1).unsqueeze(0)).all(-1)
    assert matches.sum(1).tolist() == [1] * (folds * n)
    assert matches.sum(0).tolist() == [1] * (folds * n)
    assert sorted(y.tolist()) == sorted(index.tolist())
    # the noise added to the 24 noisy outputs (25 pixels each) is 24 linearly independent
    # patterns: no shared pattern, not even up to scale or in combination
    pair = matches.float().argmax(1)
    noisy = copy[pair] > 0
    added = (x[noisy] - clean[index[pair[noisy]]]).flatten(1).double()
    assert added.shape[0] == (folds - 1) * n
    assert int(torch.linalg.matrix_rank(added)) == added.shape[0]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_values"):
        counter_normal(0, torch.tensor([0]), torch.tensor([1]), 0)
    with pytest.raises(ValueError, match="index, copy"):
        counter_normal(0, torch.tensor([0, 1]), torch.tensor([1]), 4)
    data = ImageSet(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="folds"):
        next(augmented_batches(data, 2, 0, 0.1, 0, torch.Generator()))
