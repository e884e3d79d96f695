"""Robustness to additive Gaussian noise (paper Sec. 4.1, Eq. 6).

For a classifier with predicted label ``psi(x) = argmax_i Psi_i(x)``, the robustness
of an image is ``R(x) = P_n{psi(x + n) = psi(x)}`` (Eq. 6), relaxed in the paper to a
0/1 score: an image is robust at noise level ``sigma`` if none of ``m`` noise draws
changes its prediction. The robustness of a test set at ``sigma`` is the fraction of
robust images (the *curve*); the robustness of the classifier is the area under the
curve over ``sigma`` in ``linspace(0, 0.5, 30)`` by the trapezoid rule, divided by the
width of the sigma range (*auc*), as in the authors' code. The plain mean of the curve
is reported as well.

Two noise models:

* ``"ring"`` (the paper's default, ``m = 1``): one vector of norm exactly
  ``sigma * sqrt(n)`` (``n`` = number of input values) in a uniformly random direction,
  the typical norm of ``N(0, sigma^2 I)`` noise (:func:`ring_noise`);
* ``"gaussian"``: ``m`` independent draws of ``N(0, sigma^2 I)``.

Noise is in input (pixel) units and the noisy input is not clipped.

Determinism. The standard normal draws behind the noise of image ``i`` (its position
in ``data``), sigma index ``k`` and sample ``j`` depend only on ``(seed, i, k, j)``
(and the number of samples ``m``): they are row ``i mod 64`` of a block of 64 images
drawn on the CPU by a ``torch.Generator`` seeded from ``(seed, i // 64, k, j)``
through ``numpy.random.SeedSequence``. The result is therefore the same for any batch
size and, up to the model's own rounding, on any device.

Uncertainty. ``ci`` is a percentile bootstrap interval of ``auc`` over test images
(``scipy.stats.bootstrap``; ``auc`` is the mean over images of each image's own area
under its 0/1 curve, and images are resampled with their whole curve), seeded by
``seed``. It covers the sampling of test images and of the noise, not the training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy import stats
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, SequentialSampler
from tqdm.auto import tqdm

from momentkit._validate import check_count, check_scalar, check_seed, check_sigmas
from momentkit.errors import MomentInputError

__all__ = [
    "DEFAULT_SIGMAS",
    "RobustnessResult",
    "area_under_curve",
    "gaussian_robustness",
    "ring_noise",
]

#: The paper's test noise levels: 30 evenly spaced values in [0, 0.5] (Sec. 4.1).
DEFAULT_SIGMAS: tuple[float, ...] = tuple(float(s) for s in np.linspace(0.0, 0.5, 30))

# Images per noise block: the unit of generation that makes the noise independent of
# the batch size (see the module docstring).
_BLOCK = 64

NoiseKind = Literal["ring", "gaussian"]


@dataclass(frozen=True)
class RobustnessResult:
    """Gaussian robustness of a classifier on a test set.

    Attributes:
        sigmas: noise levels, float64 ``(S,)``.
        curve: fraction of images whose prediction survives the noise, float64 ``(S,)``.
        auc: trapezoid area under ``curve`` divided by ``sigmas[-1] - sigmas[0]``
            (``curve[0]`` when there is a single sigma).
        mean: plain mean of ``curve``.
        ci: percentile bootstrap confidence interval ``(low, high)`` of ``auc`` over
            test images (NaN for a single image).
        per_image: bool ``(S, N)``, ``True`` where image ``i`` is robust at ``sigmas[k]``.
        n_images: ``N``.
        samples: noise draws per image and sigma (``m``).
        noise: ``"ring"`` or ``"gaussian"``.
        seed: the seed of the noise and of the bootstrap.
        confidence: the level of ``ci``.
    """

    sigmas: torch.Tensor
    curve: torch.Tensor
    auc: float
    mean: float
    ci: tuple[float, float]
    per_image: torch.Tensor
    n_images: int
    samples: int
    noise: str
    seed: int
    confidence: float


def ring_noise(
    shape: Sequence[int],
    sigma: float,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Noise of norm exactly ``sigma * sqrt(n)`` in uniformly random directions.

    ``shape = (B, *event)``: ``B`` independent vectors of ``n = prod(event)`` values,
    each ``sigma * sqrt(n) * z / ||z||`` for ``z ~ N(0, I_n)``, which is uniform on the
    sphere of that radius. ``sqrt(n)`` is the large-``n`` limit of the mean norm of
    ``N(0, sigma^2 I_n)`` noise (Sec. 4.1). Norms are exact up to rounding (a few eps of
    ``dtype``).

    Raises:
        MomentInputError: ``shape`` without an event dimension or with a zero size;
            ``sigma`` negative or not finite.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2 or any(d <= 0 for d in shape):
        raise MomentInputError(
            f"ring_noise: shape must be (B, *event) with positive sizes, got {shape}"
        )
    sigma = check_scalar(sigma, "sigma", "ring_noise")
    z = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    return _to_ring(z, sigma)


def _to_ring(z: torch.Tensor, sigma: float) -> torch.Tensor:
    """Rescale each ``z[b]`` to norm ``sigma * sqrt(n)``, ``n = z[b].numel()``."""
    flat = z.reshape(z.shape[0], -1)
    radius = sigma * math.sqrt(flat.shape[1])
    return (flat * (radius / flat.norm(dim=1, keepdim=True))).view_as(z)


def area_under_curve(curve: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Trapezoid area under ``curve`` over ``sigmas`` divided by the sigma range.

    ``curve`` has shape ``(S, ...)`` (the sigma axis first), ``sigmas`` shape ``(S,)``,
    increasing. Returns shape ``curve.shape[1:]``; with a single sigma, ``curve[0]``.
    """
    curve = curve.double()
    sigmas = sigmas.to(dtype=torch.float64, device=curve.device)
    if sigmas.numel() == 1:
        return curve[0]
    return torch.trapezoid(curve, sigmas, dim=0) / (sigmas[-1] - sigmas[0])


def _block_normals(
    seed: int, block: int, k: int, j: int, event: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Standard normals ``(_BLOCK, *event)`` for images ``[64 block, 64 block + 64)``."""
    state = np.random.SeedSequence([seed, block, k, j]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randn((_BLOCK, *event), generator=generator, dtype=dtype)


def _standard_normals(
    seed: int, start: int, stop: int, k: int, j: int, event: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Standard normals ``(stop - start, *event)`` for images ``[start, stop)`` (CPU)."""
    first, last = start // _BLOCK, (stop - 1) // _BLOCK
    blocks = [_block_normals(seed, b, k, j, event, dtype) for b in range(first, last + 1)]
    rows = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
    offset = start - first * _BLOCK
    return rows[offset : offset + stop - start]


def _n_batches(data: torch.Tensor | Iterable, batch_size: int) -> int | None:
    if isinstance(data, torch.Tensor):
        return math.ceil(data.shape[0] / batch_size)
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


def _check_order(data: object, fn: str) -> None:
    """Refuse a DataLoader that does not visit its dataset in order: the noise of an
    image is tied to its position, so a shuffled loader would score differently on
    every run (and differently from the unshuffled one)."""
    if not isinstance(data, DataLoader) or isinstance(data.dataset, IterableDataset):
        return
    if data.batch_sampler is None:
        sampler = data.sampler
    elif type(data.batch_sampler) is BatchSampler:
        sampler = data.batch_sampler.sampler
    else:
        sampler = data.batch_sampler
    if type(sampler) is not SequentialSampler:
        raise MomentInputError(
            f"{fn}: data is a DataLoader with a {type(sampler).__name__}, which does not "
            "visit the images in order; the noise is tied to each image's position, so the "
            "result would depend on the order. Pass a DataLoader with shuffle=False (and "
            "no sampler) or a tensor of inputs"
        )


def _batches(
    data: torch.Tensor | Iterable, batch_size: int, fn: str
) -> Iterator[torch.Tensor]:
    if isinstance(data, Dataset):
        raise MomentInputError(
            f"{fn}: data is a Dataset, whose items are single images; pass a DataLoader "
            "(shuffle=False) or a tensor of inputs"
        )
    _check_order(data, fn)
    if isinstance(data, torch.Tensor):
        for start in range(0, data.shape[0], batch_size):
            yield data[start : start + batch_size]
        return
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor):
            raise MomentInputError(
                f"{fn}: data must yield batches of tensors or (input, label) pairs, got "
                f"{type(x).__name__}"
            )
        yield x


def _predict(model: nn.Module, x: torch.Tensor, fn: str) -> torch.Tensor:
    out = model(x)
    if out.dim() < 2 or out.shape[0] != x.shape[0]:
        raise MomentInputError(
            f"{fn}: model must give an output (batch, classes), got shape {tuple(out.shape)}"
        )
    if bool(torch.isnan(out).any()):
        raise MomentInputError(
            f"{fn}: model gives NaN outputs (non-finite parameters?); its predictions, and "
            "so its robustness, are meaningless"
        )
    return out.reshape(out.shape[0], -1).argmax(dim=1)


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return None


def gaussian_robustness(
    model: nn.Module,
    data: torch.Tensor | Iterable,
    sigmas: Iterable[float] | torch.Tensor | None = None,
    samples: int = 1,
    seed: int = 0,
    *,
    noise: NoiseKind | None = None,
    batch_size: int = 500,
    n_boot: int = 1000,
    confidence: float = 0.95,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> RobustnessResult:
    """Robustness of ``model`` to additive Gaussian noise (Eq. 6) with a bootstrap CI.

    For every image ``x`` of ``data`` and every ``sigma`` in ``sigmas`` (default: the
    paper's ``linspace(0, 0.5, 30)``), draw ``samples`` noise vectors and call the
    image robust at ``sigma`` if ``argmax model(x + n) == argmax model(x)`` for all of
    them. ``sigma = 0`` adds nothing, so every image is robust there by definition and
    no forward pass is spent on it. The model runs in eval mode and without gradients;
    its mode is restored afterwards.

    Args:
        model: a classifier; its output ``(N, classes)``.
        data: a tensor of inputs ``(N, ...)`` (batched internally by ``batch_size``),
            or an iterable (e.g. an unshuffled ``DataLoader``) of input batches or
            ``(input, label)`` batches. Image ``i`` is the ``i``-th input in iteration
            order; noise is tied to that position, so a ``DataLoader`` whose sampler is
            not sequential (``shuffle=True``, a custom sampler or batch sampler) is
            refused: its result would depend on the order. Empty batches are skipped.
        sigmas: increasing, non-negative noise standard deviations in input units.
        samples: noise draws ``m`` per image and sigma, >= 1.
        seed: non-negative integer seed of the noise and of the bootstrap.
        noise: ``"ring"`` (:func:`ring_noise`) or ``"gaussian"`` (``N(0, sigma^2 I)``);
            default ``"ring"`` for ``samples == 1`` (the paper's metric) and
            ``"gaussian"`` otherwise (the paper's ``m``-sample variant).
        batch_size: batch size for tensor ``data``.
        n_boot: bootstrap resamples.
        confidence: level of the bootstrap interval, in (0, 1).
        device: where the model runs; default the device of its parameters (or of the
            data for a model without parameters).
        progress: show a progress bar over batches.

    Returns:
        A :class:`RobustnessResult`.

    Raises:
        MomentInputError: ``sigmas`` negative, NaN, not increasing or not 1-D;
            ``samples``, ``seed``, ``batch_size``, ``n_boot``, ``confidence`` or
            ``noise`` out of range; data without images, inputs that are not floating
            point or contain NaN or infinity (the prediction of an infinite image is
            meaningless), inputs of different shapes, a shuffled ``DataLoader``; a model
            output that is not ``(batch, classes)`` or contains NaN. Messages start with
            ``gaussian_robustness:``.
    """
    fn = "gaussian_robustness"
    sigma_t = (
        torch.tensor(DEFAULT_SIGMAS, dtype=torch.float64)
        if sigmas is None
        else check_sigmas(sigmas, fn)
    )
    samples = check_count(samples, "samples", fn)
    seed = check_seed(seed, fn)
    batch_size = check_count(batch_size, "batch_size", fn)
    n_boot = check_count(n_boot, "n_boot", fn)
    if noise is None:
        noise = "ring" if samples == 1 else "gaussian"
    if noise not in ("ring", "gaussian"):
        raise MomentInputError(f"{fn}: noise must be 'ring' or 'gaussian', got {noise!r}")
    if check_scalar(confidence, "confidence", fn, upper=1.0) == 0:
        raise MomentInputError(f"{fn}: confidence must lie in (0, 1), got {confidence!r}")
    if device is None:
        device = _model_device(model)

    was_training = model.training
    model.eval()
    rows: list[torch.Tensor] = []
    event: tuple[int, ...] | None = None
    start = 0
    try:
        with torch.no_grad():
            batches = tqdm(_batches(data, batch_size, fn), total=_n_batches(data, batch_size),
                           disable=not progress, desc="robustness")
            for x in batches:
                if event is None:
                    event = tuple(x.shape[1:])
                if x.dim() < 2 or tuple(x.shape[1:]) != event or not x.is_floating_point():
                    raise MomentInputError(
                        f"{fn}: every input batch of data must be floating point "
                        f"(N, *{event}); got {x.dtype} {tuple(x.shape)} at image {start}"
                    )
                if x.shape[0] == 0:
                    continue  # an empty batch holds no image and moves no position
                if not bool(torch.isfinite(x).all()):
                    kind = "NaN" if bool(torch.isnan(x).any()) else "inf"
                    raise MomentInputError(
                        f"{fn}: data contains {kind} in the batch starting at image {start}"
                    )
                x = x.to(device) if device is not None else x
                rows.append(_robust_batch(model, x, sigma_t, samples, noise, seed, start, fn))
                start += x.shape[0]
    finally:
        model.train(was_training)
    if start == 0:
        raise MomentInputError(f"{fn}: data holds no images")

    per_image = torch.cat(rows, dim=1)  # (S, N)
    curve = per_image.double().mean(dim=1)
    per_image_auc = area_under_curve(per_image, sigma_t)
    auc = float(per_image_auc.mean())
    if start > 1:
        boot = stats.bootstrap(
            (per_image_auc.numpy(),), np.mean, n_resamples=n_boot, vectorized=True,
            confidence_level=confidence, method="percentile",
            rng=np.random.default_rng(seed),
        )
        ci = (float(boot.confidence_interval.low), float(boot.confidence_interval.high))
    else:
        ci = (math.nan, math.nan)
    return RobustnessResult(
        sigmas=sigma_t, curve=curve, auc=auc, mean=float(curve.mean()), ci=ci,
        per_image=per_image, n_images=start, samples=samples, noise=noise, seed=seed,
        confidence=float(confidence),
    )


def _robust_batch(
    model: nn.Module,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    samples: int,
    noise: str,
    seed: int,
    start: int,
    fn: str,
) -> torch.Tensor:
    """Bool ``(S, B)``: robust or not, for images ``[start, start + B)`` of the data."""
    batch = x.shape[0]
    clean = _predict(model, x, fn)
    robust = torch.ones(len(sigmas), batch, dtype=torch.bool)
    draw_dtype = torch.promote_types(x.dtype, torch.float32)
    for k, sigma in enumerate(sigmas.tolist()):
        if sigma == 0.0:
            continue  # x + 0 = x: robust by definition
        for j in range(samples):
            z = _standard_normals(seed, start, start + batch, k, j, tuple(x.shape[1:]), draw_dtype)
            n = _to_ring(z, sigma) if noise == "ring" else z * sigma
            pred = _predict(model, x + n.to(device=x.device, dtype=x.dtype), fn)
            robust[k] &= (pred == clean).cpu()
    return robust
