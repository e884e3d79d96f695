"""Certified L2 robustness by randomized smoothing (Cohen, Rosenfeld, Kolter, ICML 2019).

The *smoothed classifier* of a base classifier ``f`` is
``g(x) = argmax_c P(f(x + eps) = c)``, ``eps ~ N(0, sigma^2 I)``. If the top class
``c_A`` has probability at least ``p_A >= 1/2``, then ``g`` predicts ``c_A`` everywhere
within the L2 ball of radius ``R = sigma * Phi^-1(p_A)`` around ``x`` (their Theorem 1,
the two-class form with ``p_B = 1 - p_A``).

* :func:`certify` is their CERTIFY: the top class from ``n0`` noisy copies, then a
  one-sided Clopper-Pearson lower confidence bound ``p_lower`` on its probability from
  ``n`` fresh copies, radius ``sigma * Phi^-1(p_lower)``, abstain (``-1``) when
  ``p_lower < 1/2``. Guarantee: with probability at least ``1 - alpha`` (over the
  noise), a non-abstaining answer is ``g(x)`` and ``g`` is constant within the radius.
* :func:`smoothed_predict` is their PREDICT: the top two counts from ``n`` copies,
  abstain unless a two-sided binomial test at level ``alpha`` separates them. With
  probability at least ``1 - alpha`` a non-abstaining answer equals ``g(x)``.
* The data-set level numbers (certified accuracy at given radii, the curve, ACR,
  abstention rate) are in :mod:`momentkit.certification`.

Noise. ``sigma`` is in the units of ``x`` (pixels in [0, 1] for the experiments' models,
which normalize inside their first module), so the noise is added to ``x`` as given;
noisy inputs are not clipped. The standard normals of sample ``j`` of image ``i`` are a
function of ``(seed, i, stage, j)`` only (``stage``: 0 for CERTIFY's selection copies,
1 for its estimation copies, 2 for PREDICT), so results do not depend on
``batch_size``: samples come in blocks of :data:`SAMPLE_BLOCK`, block ``b`` drawn by a
``torch.Generator`` on the model's device seeded with a 64-bit value derived from
``(seed, i, stage, b)`` through ``numpy.random.SeedSequence``. Whole blocks are always
drawn (unused samples of the last block are dropped), so sample ``j``'s noise does not
depend on ``n`` either. CPU and CUDA generators produce different streams: results
agree across devices in distribution, not bit for bit. The model's own rounding may
differ with the batch size in the last bit (different kernels), which can flip a
prediction only at an exact tie of logits.

Cost and memory: one forward pass per noisy copy, in batches of at most
``max(batch_size, SAMPLE_BLOCK)`` copies of one image, whatever ``n`` is; generating
the noise costs one ``normal_`` per value (see ``benchmarks/bench_certify.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import nn
from tqdm.auto import tqdm

from momentkit._validate import check_batch, check_count, check_finite, check_scalar
from momentkit.errors import MomentInputError

__all__ = [
    "SAMPLE_BLOCK",
    "CertifyResult",
    "certify",
    "lower_confidence_bound",
    "smoothed_predict",
]

#: Noisy copies per generator block: the unit of noise generation (see the module docstring).
SAMPLE_BLOCK = 100


_SELECT, _ESTIMATE, _PREDICT = 0, 1, 2
_TAG = 0x63657274  # "cert": keeps these streams apart from other seeded noise


@dataclass(frozen=True)
class CertifyResult:
    """Certificates of a batch of ``B`` images (:func:`certify`).

    Attributes:
        prediction: int64 ``(B,)``, the certified class or ``-1`` (abstain).
        radius: float64 ``(B,)``, ``sigma * Phi^-1(p_lower)``; 0 where abstaining.
        p_lower: float64 ``(B,)``, the one-sided ``1 - alpha`` Clopper-Pearson lower
            bound on the probability of the selected class.
        top_class: int64 ``(B,)``, the class selected from the ``n0`` copies.
        counts_selection: int64 ``(B, C)``, class counts of the ``n0`` selection copies.
        counts: int64 ``(B, C)``, class counts of the ``n`` estimation copies.
        sigma, n0, n, alpha, seed: the settings used.
    """

    prediction: torch.Tensor
    radius: torch.Tensor
    p_lower: torch.Tensor
    top_class: torch.Tensor
    counts_selection: torch.Tensor
    counts: torch.Tensor
    sigma: float
    n0: int
    n: int
    alpha: float
    seed: int


def lower_confidence_bound(
    k: int | np.ndarray, n: int, alpha: float
) -> float | np.ndarray:
    """One-sided Clopper-Pearson lower bound on a binomial ``p`` from ``k`` successes in ``n``.

    ``p_lower = Beta^-1(alpha; k, n - k + 1)`` (``scipy.stats.beta.ppf``), and 0 for
    ``k = 0``. Guarantee: ``P(p_lower > p) <= alpha`` for every ``p`` (exact, i.e.
    conservative, coverage). It equals the lower end of the two-sided exact interval at
    level ``1 - 2 alpha`` (``binomtest(k, n).proportion_ci(1 - 2 alpha, "exact").low``,
    Cohen et al.'s ``proportion_confint(k, n, alpha=2 alpha, method="beta")[0]``); the
    closed form is used because CERTIFY needs only the one-sided bound. ``k`` may be an
    integer array (elementwise; returns an array).
    """
    k_arr = np.asarray(k)
    with np.errstate(invalid="ignore"):
        bound = np.where(k_arr > 0, stats.beta.ppf(alpha, np.maximum(k_arr, 1), n - k_arr + 1),
                         0.0)
    return float(bound) if bound.ndim == 0 else bound


def _check_args(
    fn: str, x: torch.Tensor, sigma: float, alpha: float, batch_size: int, seed: int
) -> tuple[float, float, int, int]:
    check_batch(x, fn)
    if x.shape[0] == 0:
        raise MomentInputError(f"{fn}: x holds no images (batch size 0)")
    check_finite(x, "x", fn)
    sigma_f = check_scalar(sigma, "sigma", fn)
    alpha_f = check_scalar(alpha, "alpha", fn, upper=1.0)
    if alpha_f == 0.0:
        raise MomentInputError(f"{fn}: alpha must lie in (0, 1), got {alpha!r}")
    return (sigma_f, alpha_f, check_count(batch_size, "batch_size", fn, 1),
            check_count(seed, "seed", fn, 0))


def _check_indices(fn: str, indices: Sequence[int] | torch.Tensor | None, b: int) -> list[int]:
    if indices is None:
        return list(range(b))
    idx = [int(i) for i in torch.as_tensor(indices).reshape(-1).tolist()]
    if len(idx) != b or any(i < 0 for i in idx):
        raise MomentInputError(
            f"{fn}: indices must hold {b} non-negative integers (one per image), got {len(idx)}"
        )
    return idx


def _device_of(model: nn.Module, x: torch.Tensor) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return x.device


def _block_generator(device: torch.device, seed: int, image: int, stage: int, block: int
                     ) -> torch.Generator:
    state = np.random.SeedSequence([_TAG, seed, image, stage, block]).generate_state(
        2, dtype=np.uint32)
    generator = torch.Generator(device=device)
    generator.manual_seed((int(state[0]) << 32 | int(state[1])) >> 1)
    return generator


def _count(
    model: nn.Module, x: torch.Tensor, sigma: float, num: int, *, seed: int, image: int,
    stage: int, batch_size: int, bar: tqdm,
) -> torch.Tensor:
    """Class counts (int64 on ``x``'s device) of ``model(x + sigma z_j)``, ``j < num``.

    ``x``: one image ``(*image)`` on the model's device. Noise is drawn in chunks of
    whole blocks (``max(1, batch_size // SAMPLE_BLOCK)`` blocks, so at most
    ``max(batch_size, SAMPLE_BLOCK)`` copies in memory) and sent through the model in
    batches of at most ``batch_size`` copies.
    """
    blocks_per_chunk = max(1, batch_size // SAMPLE_BLOCK)
    n_blocks = -(-num // SAMPLE_BLOCK)
    counts: torch.Tensor | None = None
    for first in range(0, n_blocks, blocks_per_chunk):
        last = min(first + blocks_per_chunk, n_blocks)
        noise = torch.empty((last - first) * SAMPLE_BLOCK, *x.shape, dtype=x.dtype,
                            device=x.device)
        for b in range(first, last):
            rows = noise[(b - first) * SAMPLE_BLOCK : (b - first + 1) * SAMPLE_BLOCK]
            rows.normal_(generator=_block_generator(x.device, seed, image, stage, b))
        used = min(noise.shape[0], num - first * SAMPLE_BLOCK)
        noisy = noise[:used].mul_(sigma).add_(x)
        for start in range(0, used, batch_size):
            out = model(noisy[start : start + batch_size])
            if out.dim() != 2 or out.shape[0] != min(batch_size, used - start):
                raise MomentInputError(
                    f"model: expected logits (batch, classes), got shape {tuple(out.shape)}")
            c = torch.bincount(out.argmax(dim=1), minlength=out.shape[1])
            counts = c if counts is None else counts + c
        bar.update(used)
    assert counts is not None  # num >= 1
    return counts


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` and no gradients inside; the previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def certify(
    model: nn.Module,
    x: torch.Tensor,
    sigma: float,
    *,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    seed: int = 0,
    indices: Sequence[int] | torch.Tensor | None = None,
    progress: bool = False,
) -> CertifyResult:
    """Cohen et al.'s CERTIFY for every image of the batch ``x``.

    For image ``x_i``: ``c_A`` = the most frequent class of ``f(x_i + eps)`` over ``n0``
    copies (ties: the lowest class index); ``k`` = the count of ``c_A`` over ``n`` fresh
    copies; ``p_lower`` = :func:`lower_confidence_bound` ``(k, n, alpha)``; if
    ``p_lower < 1/2`` abstain (prediction ``-1``, radius 0), else predict ``c_A`` with
    radius ``sigma * Phi^-1(p_lower)``. With probability at least ``1 - alpha`` per
    image, the smoothed classifier ``g`` predicts ``c_A`` within that L2 radius. The
    radius is capped by ``n``: at most ``sigma * Phi^-1(alpha^(1/n))`` (about
    ``3.8 sigma`` for ``n = 1e5``, ``3.2 sigma`` for ``n = 1e4`` at ``alpha = 0.001``).

    Args:
        model: the base classifier ``f``; logits ``(batch, classes)``. Evaluated in eval
            mode without gradients; its mode is restored. It runs on its own device
            (that of its first parameter or buffer, else ``x``'s).
        x: images ``(B, *image)``, floating point, in the units of ``sigma``.
        sigma: noise standard deviation, >= 0 (``0``: no noise).
        n0, n: selection and estimation copies per image, >= 1.
        alpha: failure probability, in (0, 1).
        batch_size: noisy copies per forward pass, >= 1.
        seed: non-negative seed of the noise.
        indices: the identity of each image in the noise (default ``0 .. B-1``); pass
            the images' positions in a data set to get the same noise whichever batch
            an image is certified in.
        progress: show a progress bar over the noisy copies.

    Returns:
        A :class:`CertifyResult` (tensors on the CPU).

    Raises:
        MomentInputError: ``sigma`` negative or NaN; ``alpha`` outside (0, 1); ``n0``,
            ``n`` or ``batch_size`` below 1; ``seed`` negative; ``x`` without a batch
            dimension, empty, not floating point or not finite; ``indices`` of the
            wrong length; model output not ``(batch, classes)``.
    """
    fn = "certify"
    sigma, alpha, batch_size, seed = _check_args(fn, x, sigma, alpha, batch_size, seed)
    n0, n = check_count(n0, "n0", fn, 1), check_count(n, "n", fn, 1)
    idx = _check_indices(fn, indices, x.shape[0])
    device = _device_of(model, x)
    rows_sel, rows_est, top = [], [], []
    with _eval_mode(model), tqdm(total=len(idx) * (n0 + n), disable=not progress,
                                desc="certify", unit="copy") as bar:
        for i, image in enumerate(idx):
            xi = x[i].to(device)
            kw = dict(seed=seed, image=image, batch_size=batch_size, bar=bar)
            sel = _count(model, xi, sigma, n0, stage=_SELECT, **kw).cpu()
            est = _count(model, xi, sigma, n, stage=_ESTIMATE, **kw).cpu()
            rows_sel.append(sel)
            rows_est.append(est)
            top.append(int(sel.argmax()))
    top_class = torch.tensor(top, dtype=torch.int64)
    counts = torch.stack(rows_est)
    k = counts.gather(1, top_class[:, None])[:, 0].numpy()
    p_lower = torch.from_numpy(np.asarray(lower_confidence_bound(k, n, alpha), dtype=np.float64))
    certified = p_lower >= 0.5
    radius = torch.where(certified, sigma * torch.from_numpy(stats.norm.ppf(p_lower.numpy())),
                         torch.zeros_like(p_lower))
    prediction = torch.where(certified, top_class, torch.full_like(top_class, -1))
    return CertifyResult(
        prediction=prediction, radius=radius, p_lower=p_lower, top_class=top_class,
        counts_selection=torch.stack(rows_sel), counts=counts, sigma=sigma, n0=n0, n=n,
        alpha=alpha, seed=seed,
    )


def smoothed_predict(
    model: nn.Module,
    x: torch.Tensor,
    sigma: float,
    *,
    n: int = 1000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    seed: int = 0,
    indices: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Cohen et al.'s PREDICT: the smoothed classifier's class for each image, or ``-1``.

    Counts the classes of ``f(x_i + eps)`` over ``n`` copies; with ``n_A >= n_B`` the top
    two counts (ties: lower class index first), returns ``c_A`` if the two-sided
    binomial test of ``n_A`` successes in ``n_A + n_B`` trials against ``p = 1/2``
    (``scipy.stats.binomtest``) has p-value at most ``alpha``, else ``-1``. Guarantee:
    the probability of returning a class other than ``g(x_i)`` is at most ``alpha``.

    Arguments, noise and errors as in :func:`certify` (the error messages name
    ``smoothed_predict``). Returns int64 ``(B,)`` on the CPU.
    """
    fn = "smoothed_predict"
    sigma, alpha, batch_size, seed = _check_args(fn, x, sigma, alpha, batch_size, seed)
    n = check_count(n, "n", fn, 1)
    idx = _check_indices(fn, indices, x.shape[0])
    device = _device_of(model, x)
    out = []
    with _eval_mode(model), tqdm(disable=True) as bar:
        for i, image in enumerate(idx):
            counts = _count(model, x[i].to(device), sigma, n, seed=seed, image=image,
                            stage=_PREDICT, batch_size=batch_size, bar=bar).cpu()
            order = torch.sort(counts, descending=True, stable=True).indices
            n_a = int(counts[order[0]])
            n_b = int(counts[order[1]]) if counts.numel() > 1 else 0
            p_value = stats.binomtest(n_a, n_a + n_b, 0.5).pvalue
            out.append(int(order[0]) if p_value <= alpha else -1)
    return torch.tensor(out, dtype=torch.int64)
