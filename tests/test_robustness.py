"""Tests of momentkit.robustness: the Eq. 6 metric, its noise and its bootstrap interval.

References are analytic: a constant classifier is always robust; for a linear
two-class classifier with margin ``d`` and weight norm ``|w|`` an image survives

* one ``N(0, sigma^2 I)`` draw with probability ``Phi(d / (sigma |w|))`` (so ``m``
  draws with its ``m``-th power), and
* one ring draw of radius ``r = sigma sqrt(n)`` with probability
  ``P(t < d / (|w| r))`` where ``t`` is a coordinate of a uniform unit vector in
  ``R^n``: ``(t + 1) / 2 ~ Beta((n - 1) / 2, (n - 1) / 2)``.

Monte Carlo comparisons use ``4 * standard error`` (per image the outcome is Bernoulli
and images are independent, so the curve's standard error is
``sqrt(sum p (1 - p)) / N``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from momentkit.errors import MomentInputError
from momentkit.robustness import (
    DEFAULT_SIGMAS,
    area_under_curve,
    gaussian_robustness,
    ring_noise,
)

EPS64 = torch.finfo(torch.float64).eps


class Constant(nn.Module):
    """Ignores its input: the same logits for every image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([0.0, 2.0, 1.0], dtype=x.dtype).expand(x.shape[0], 3)


def linear_problem(n_images: int, seed: int = 0, n: int = 20):
    """A linear classifier on ``n`` inputs (4x5 images for n = 20, vectors otherwise)
    and images with margins in [0.1, 1.5]."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=gen, dtype=torch.float64)
    model = nn.Sequential(nn.Flatten(), nn.Linear(n, 2)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([w, torch.zeros_like(w)]))
        model[1].bias.zero_()
    # x = d * w / |w|^2 * sign + (component orthogonal to w): margin |w . x| = d.
    d = 0.1 + 1.4 * torch.rand(n_images, generator=gen, dtype=torch.float64)
    sign = torch.where(torch.rand(n_images, generator=gen) < 0.5, -1.0, 1.0).double()
    x = torch.randn(n_images, n, generator=gen, dtype=torch.float64)
    x -= (x @ w)[:, None] * w / (w @ w)
    x += (sign * d)[:, None] * w / (w @ w)
    shape = (4, 5) if n == 20 else (n,)
    return model, x.view(n_images, *shape), d, float(w.norm()), n


def analytic_survival(d, w_norm, n, sigma, samples, noise):
    """P(image with margin d stays robust) for the linear classifier."""
    d = d.numpy()
    if sigma == 0:
        return np.ones_like(d)
    if noise == "gaussian":
        return stats.norm.cdf(d / (sigma * w_norm)) ** samples
    c = d / (w_norm * sigma * math.sqrt(n))
    a = (n - 1) / 2
    return stats.beta.cdf(np.clip((1 + c) / 2, 0, 1), a, a) ** samples


# --- ring noise ---------------------------------------------------------------------------


def test_ring_noise_has_the_stated_norm() -> None:
    gen = torch.Generator().manual_seed(1)
    for sigma in (0.0, 1e-3, 0.37, 20.0):
        noise = ring_noise((40, 3, 4, 5), sigma, gen, dtype=torch.float64)
        assert noise.shape == (40, 3, 4, 5)
        radius = sigma * math.sqrt(60)
        norms = noise.flatten(1).norm(dim=1)
        # one division and a 60-term norm: a few eps relative.
        torch.testing.assert_close(
            norms, torch.full_like(norms, radius), rtol=8 * EPS64, atol=0.0
        )


def test_ring_noise_directions_are_distinct_and_centred() -> None:
    gen = torch.Generator().manual_seed(2)
    noise = ring_noise((500, 10), 1.0, gen, dtype=torch.float64)
    unit = noise / noise.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    off_diagonal = cos[~torch.eye(500, dtype=torch.bool)]
    assert float(off_diagonal.max()) < 1 - 1e-6
    # Uniform directions: each coordinate of a unit vector in R^10 has variance 1/10
    # and mean 0, so the mean of 500 has standard error sqrt(1/10/500).
    assert float(unit.mean(0).abs().max()) < 4 * math.sqrt(0.1 / 500)


def test_ring_noise_rejects_bad_input() -> None:
    with pytest.raises(MomentInputError, match="sigma"):
        ring_noise((4, 3), -0.1)
    with pytest.raises(MomentInputError, match="sigma"):
        ring_noise((4, 3), float("nan"))
    with pytest.raises(MomentInputError, match="shape"):
        ring_noise((4,), 0.1)


# --- the metric on classifiers whose answer is known ---------------------------------------


def test_constant_classifier_is_perfectly_robust() -> None:
    x = torch.rand(70, 1, 6, 6)
    result = gaussian_robustness(Constant(), x, batch_size=32)
    assert result.sigmas.tolist() == list(DEFAULT_SIGMAS)
    assert result.n_images == 70
    assert result.per_image.shape == (30, 70) and result.per_image.dtype == torch.bool
    assert bool(result.per_image.all())
    assert result.curve.tolist() == [1.0] * 30
    assert result.auc == 1.0 and result.mean == 1.0
    assert result.ci == (1.0, 1.0)
    assert result.samples == 1 and result.noise == "ring"


# In 3 dimensions a ring draw projects to a uniform, not a normal, variable: the
# survival curves of the two noise models differ by up to 5-6 standard errors there (3000
# images, sigma up to 0.5), so these cases also tell the two noises apart.
@pytest.mark.parametrize(
    ("samples", "noise", "n"),
    [(1, "ring", 3), (1, "ring", 20), (2, "ring", 20), (1, "gaussian", 3), (3, "gaussian", 20)],
)
def test_linear_classifier_matches_analytic_survival(samples: int, noise: str, n: int) -> None:
    n_images = 3000
    model, x, d, w_norm, n = linear_problem(n_images, n=n)
    sigmas = np.linspace(0.0, 0.5, 11)
    result = gaussian_robustness(
        model, x, sigmas=sigmas, samples=samples, noise=noise, seed=3, batch_size=1000
    )
    assert result.noise == noise
    bad = []
    for k, sigma in enumerate(sigmas):
        p = analytic_survival(d, w_norm, n, float(sigma), samples, noise)
        expected = p.mean()
        stderr = math.sqrt(float((p * (1 - p)).sum())) / n_images
        got = float(result.curve[k])
        if abs(got - expected) > 4 * stderr:
            bad.append((float(sigma), got, expected, stderr))
    assert not bad, f"(sigma, curve, analytic, stderr) outside 4 stderr: {bad}"


def test_default_noise_is_ring_for_one_sample_and_gaussian_for_several() -> None:
    model, x, _, _, _ = linear_problem(10)
    assert gaussian_robustness(model, x, sigmas=[0.1], n_boot=10).noise == "ring"
    assert gaussian_robustness(model, x, sigmas=[0.1], samples=4, n_boot=10).noise == "gaussian"


def test_result_does_not_depend_on_batch_size_and_is_seeded() -> None:
    # 150 images cross the 64-image noise blocks at several offsets.
    model, x, _, _, _ = linear_problem(150, seed=5)
    sigmas = np.linspace(0.0, 1.0, 7)

    def run(data, seed=11, **kw):
        return gaussian_robustness(model, data, sigmas=sigmas, seed=seed, n_boot=50, **kw)

    reference = run(x, batch_size=150)
    for batch_size in (1, 7, 64, 100):
        other = run(x, batch_size=batch_size)
        assert torch.equal(other.per_image, reference.per_image), batch_size
    loader = DataLoader(TensorDataset(x, torch.zeros(150)), batch_size=33, shuffle=False)
    from_loader = run(loader)
    assert torch.equal(from_loader.per_image, reference.per_image)
    assert from_loader.ci == reference.ci
    # The test is not vacuous: some images flip, and another seed gives other noise.
    assert 0 < int(reference.per_image.sum()) < reference.per_image.numel()
    assert not torch.equal(run(x, seed=12).per_image, reference.per_image)


def test_noise_is_tied_to_the_image_position() -> None:
    model, x, _, _, _ = linear_problem(130, seed=6)
    sigmas = [0.0, 0.3, 0.6, 0.9]
    full = gaussian_robustness(model, x, sigmas=sigmas, seed=4, n_boot=10, samples=2)
    again = gaussian_robustness(model, x, sigmas=sigmas, seed=4, n_boot=10, samples=2,
                                batch_size=9)
    assert torch.equal(full.per_image, again.per_image)
    # Changing the images after position 70 leaves the noise (and results) of the
    # first 70 unchanged.
    x2 = x.clone()
    x2[70:] = torch.flip(x2[70:], dims=[0])
    partial = gaussian_robustness(model, x2, sigmas=sigmas, seed=4, n_boot=10, samples=2)
    assert torch.equal(partial.per_image[:, :70], full.per_image[:, :70])


def test_auc_is_the_trapezoid_and_mean_the_plain_mean() -> None:
    model, x, _, _, _ = linear_problem(400, seed=7)
    result = gaussian_robustness(model, x, seed=1, n_boot=20)
    curve, sigmas = result.curve.numpy(), result.sigmas.numpy()
    trapezoid = float(np.trapezoid(curve, sigmas) / (sigmas[-1] - sigmas[0]))
    assert result.auc == pytest.approx(trapezoid, rel=8 * EPS64, abs=0)
    assert result.mean == pytest.approx(float(curve.mean()), rel=8 * EPS64, abs=0)
    assert 0.0 < result.auc < 1.0
    assert result.per_image.double().mean(1).tolist() == result.curve.tolist()


def test_area_under_curve_closed_form() -> None:
    # f(s) = 1 - (s / 0.5)^2 on 30 even sigmas in [0, 0.5]: the exact mean value over
    # the range is 2/3; the trapezoid rule underestimates a concave quadratic by
    # h^2 |f''| / 12 = h^2 * 8 / 12; the plain mean is 1 - 59 / (6 * 29).
    sigmas = torch.tensor(DEFAULT_SIGMAS, dtype=torch.float64)
    curve = 1 - (sigmas / 0.5) ** 2
    h = 0.5 / 29
    auc = float(area_under_curve(curve, sigmas))
    assert auc == pytest.approx(2 / 3 - h * h * 8 / 12, rel=16 * EPS64, abs=0)
    assert float(curve.mean()) == pytest.approx(1 - 59 / (6 * 29), rel=16 * EPS64, abs=0)
    # Several curves at once (the sigma axis first), and a single sigma.
    both = area_under_curve(torch.stack([curve, 2 * curve], dim=1), sigmas)
    torch.testing.assert_close(both, torch.tensor([auc, 2 * auc], dtype=torch.float64))
    assert float(area_under_curve(torch.tensor([0.25]), torch.tensor([0.1]))) == 0.25


def test_bootstrap_interval_contains_estimate_and_shrinks() -> None:
    model, x, _, _, _ = linear_problem(1600, seed=8)
    sigmas = np.linspace(0.0, 0.5, 10)
    small = gaussian_robustness(model, x[:100], sigmas=sigmas, seed=2, n_boot=2000)
    large = gaussian_robustness(model, x, sigmas=sigmas, seed=2, n_boot=2000)
    for result in (small, large):
        assert result.ci[0] <= result.auc <= result.ci[1]
        assert result.ci[0] < result.ci[1]
    width_small = small.ci[1] - small.ci[0]
    width_large = large.ci[1] - large.ci[0]
    # 16 times the images: about a quarter of the width.
    assert width_large < width_small / 2
    # Against the normal approximation 2 z sd / sqrt(N) of the mean of per-image areas;
    # 15 % allows the quantile noise of 2000 resamples (about 3 % of the width).
    per_image_auc = area_under_curve(large.per_image, large.sigmas).numpy()
    normal = 2 * stats.norm.ppf(0.975) * per_image_auc.std() / math.sqrt(1600)
    assert width_large == pytest.approx(normal, rel=0.15)


def test_single_image_has_no_interval() -> None:
    model, x, _, _, _ = linear_problem(1)
    result = gaussian_robustness(model, x, sigmas=[0.0, 0.5], n_boot=10)
    assert result.n_images == 1
    assert all(math.isnan(c) for c in result.ci)


def test_model_mode_is_restored_and_device_argument_accepted() -> None:
    model, x, _, _, _ = linear_problem(20)
    model.train()
    gaussian_robustness(model, x, sigmas=[0.0, 0.2], n_boot=10, device="cpu")
    assert model.training
    model.eval()
    gaussian_robustness(model, x, sigmas=[0.0, 0.2], n_boot=10)
    assert not model.training


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"sigmas": [0.0, -0.1]}, "sigmas"),
        ({"sigmas": [0.0, float("nan")]}, "sigmas"),
        ({"sigmas": [0.2, 0.1]}, "sigmas"),
        ({"sigmas": [[0.1, 0.2]]}, "sigmas"),
        ({"sigmas": []}, "sigmas"),
        ({"samples": 0}, "samples"),
        ({"samples": 1.5}, "samples"),
        ({"seed": -1}, "seed"),
        ({"batch_size": 0}, "batch_size"),
        ({"n_boot": 0}, "n_boot"),
        ({"noise": "uniform"}, "noise"),
        ({"confidence": 1.0}, "confidence"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs: dict, name: str) -> None:
    model, x, _, _, _ = linear_problem(5)
    with pytest.raises(MomentInputError, match=name):
        gaussian_robustness(model, x, **kwargs)


def test_bad_data_raises() -> None:
    model, x, _, _, _ = linear_problem(5)
    x_nan = x.clone()
    x_nan[2, 0, 0] = float("nan")
    with pytest.raises(MomentInputError, match="data"):
        gaussian_robustness(model, x_nan)
    with pytest.raises(MomentInputError, match="data"):
        gaussian_robustness(model, x[:0])
    with pytest.raises(MomentInputError, match="data"):
        gaussian_robustness(model, x.long())
    with pytest.raises(MomentInputError, match="data"):
        gaussian_robustness(model, [x[:2], x[2:].reshape(3, 20)])
    with pytest.raises(MomentInputError, match="model"):
        gaussian_robustness(SumAll(), x)
    with pytest.raises(MomentInputError, match="DataLoader"):
        gaussian_robustness(model, TensorDataset(x, torch.zeros(5)))


class SumAll(nn.Module):
    """A scalar output, not (batch, classes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum()


def test_shuffled_loader_is_refused() -> None:
    """Noise is tied to an image's position: a shuffled loader used to be scored
    silently, and differently from the same images in order."""
    model, x, _, _, _ = linear_problem(24)
    data = TensorDataset(x, torch.zeros(24))
    in_order = gaussian_robustness(model, DataLoader(data, batch_size=8), sigmas=[0.0, 0.5])
    assert in_order.n_images == 24
    shuffled = DataLoader(data, batch_size=8, shuffle=True)
    with pytest.raises(MomentInputError, match="^gaussian_robustness: data .*RandomSampler"):
        gaussian_robustness(model, shuffled, sigmas=[0.0, 0.5])
    sampler = torch.utils.data.SubsetRandomSampler(range(24))
    with pytest.raises(MomentInputError, match="SubsetRandomSampler"):
        gaussian_robustness(model, DataLoader(data, batch_size=8, sampler=sampler))
    batches = torch.utils.data.BatchSampler(sampler, batch_size=8, drop_last=False)
    with pytest.raises(MomentInputError, match="SubsetRandomSampler"):
        gaussian_robustness(model, DataLoader(data, batch_sampler=batches))


def test_infinite_images_are_refused_and_empty_batches_skipped() -> None:
    model, x, _, _, _ = linear_problem(6)
    x_inf = x.clone()
    x_inf[3, 1, 1] = float("inf")
    with pytest.raises(MomentInputError, match="^gaussian_robustness: data contains inf"):
        gaussian_robustness(model, x_inf)
    sigmas = [0.0, 0.3, 0.6]
    whole = gaussian_robustness(model, [x], sigmas=sigmas)
    with_empty = gaussian_robustness(model, [x[:0], x[:2], x[2:2], x[2:]], sigmas=sigmas)
    assert torch.equal(whole.per_image, with_empty.per_image)
    with pytest.raises(MomentInputError, match="no images"):
        gaussian_robustness(model, [x[:0]])


def test_nan_model_output_is_refused() -> None:
    model, x, _, _, _ = linear_problem(4)
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(MomentInputError, match="^gaussian_robustness: model gives NaN"):
        gaussian_robustness(model, x)
