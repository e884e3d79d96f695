"""Noisy data augmentation with counter-based Gaussian noise (the ``N~``-fold baseline).

``N~``-fold augmentation trains on the clean training set plus ``N~ - 1`` noisy copies
of every image: copy ``c`` of image ``i`` is ``x_i + sigma * z(seed, i, c)`` for
``c = 1 .. N~-1`` and ``x_i`` itself for ``c = 0``. The noisy copies are never
materialized: an epoch visits the ``N~ * n`` pairs ``(i, c)`` in a shuffled order and
draws ``z(seed, i, c)`` when the pair's batch is formed. Noisy images are not clipped
to [0, 1]: ``sigma`` is a standard deviation in pixel units (images in [0, 1]), as
in the paper, and the noise is added before the model's normalization.

The noise is a pure function of ``(seed, i, c, pixel)``, so every image and every
copy gets its own pattern, and the same pattern again in every epoch, whatever batch
the pair lands in, on a resumed run as well. It is produced by the counter-based
generator Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy
as 1, 2, 3", SC 2011) evaluated on the counter ``(i, c, block, 0)`` with the 64-bit
``seed`` as its key: one evaluation gives four 32-bit words, that is two Box-Muller
pairs, so four normal values for pixels ``4 * block .. 4 * block + 3``. On the CPU a
compiled loop (:mod:`experiments._philox_numba`) evaluates it; on other devices
vectorized integer arithmetic on tensors of the batch's device does.

Accuracy: the 32-bit words match Random123's known-answer vectors exactly, on both
paths. Uniforms use the top 24 bits, ``u = (float32(w >> 8) + 1/2) * 2**-24`` in float32
arithmetic: exact for ``w >> 8 < 2**23``, rounded to an even multiple of ``2**-24``
above, so ``u`` lies in ``[2**-25, 1]`` and is the same float on every path. The
normals are Box-Muller transforms of these uniforms in float32: their tails are cut at
``sqrt(2 ln 2**25) = 5.9`` standard deviations (probability ``4e-9`` per value). The
integer stream and the uniforms are identical on every device and path; the float
transform (log, cos, sin) may differ by a few float32 ulps between the CPU kernel, the
torch path on the CPU and CUDA (the test suite bounds the CPU kernel against the torch
path by 4 ulps of the value).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import numpy as np
import torch

from experiments.data import ImageSet

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
PHILOX_ROUNDS = 10


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * m`` for ``a`` in [0, 2**32) held in int64.

    The 64-bit product would overflow int64, so ``m`` is split into 16-bit halves:
    ``a * m = (a * m_hi) * 2**16 + a * m_lo`` with both partial products below 2**48.
    """
    p_lo = a * (m & 0xFFFF)
    p_hi = a * (m >> 16)
    t = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (t >> 32), t & _MASK32


def philox4x32(
    counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    key: tuple[int, int],
    rounds: int = PHILOX_ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 block function, elementwise over broadcastable int64 counter words.

    ``counter``: four int64 tensors with values in [0, 2**32); ``key``: two ints in
    [0, 2**32). Returns the four output words as int64 tensors in [0, 2**32), the
    broadcast shape of the counter words. Round ``r`` uses the key
    ``key + r * (0x9E3779B9, 0xBB67AE85) mod 2**32`` (Random123's schedule).
    """
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    k0, k1 = key[0] & _MASK32, key[1] & _MASK32
    for r in range(rounds):
        if r:
            k0 = (k0 + _PHILOX_W[0]) & _MASK32
            k1 = (k1 + _PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo(c0, _PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def counter_normal(
    seed: int,
    index: torch.Tensor,
    copy: torch.Tensor,
    num_values: int,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal values ``z(seed, index[b], copy[b], j)`` for ``j < num_values``.

    ``index``, ``copy``: 1-D integer tensors ``(B,)`` with values in [0, 2**32); the
    result ``(B, num_values)`` lives on their device. A pure function of its arguments:
    the same ``(seed, index, copy, j)`` always gives the same value on a given device.
    ``seed`` is reduced modulo ``2**64``; ``dtype`` is the result's dtype (the values
    are computed in float32). Raises ``ValueError`` for mismatched shapes or
    ``num_values < 1``.
    """
    _check_pairs(index, copy, num_values)
    if index.device.type == "cpu":
        return _counter_normal_cpu(seed, index, copy, num_values).to(dtype)
    return _counter_normal_torch(seed, index, copy, num_values).to(dtype)


def _check_pairs(index: torch.Tensor, copy: torch.Tensor, num_values: int) -> None:
    if index.dim() != 1 or index.shape != copy.shape:
        raise ValueError(
            f"index, copy: expected equal 1-D shapes, got {tuple(index.shape)} and "
            f"{tuple(copy.shape)}"
        )
    if num_values < 1:
        raise ValueError(f"num_values: must be positive, got {num_values}")


def add_counter_normal_(
    x: torch.Tensor,
    seed: int,
    index: torch.Tensor,
    copy: torch.Tensor,
    sigma: float,
    *,
    clean_copy_zero: bool = False,
) -> torch.Tensor:
    """``x[b] += sigma * z(seed, index[b], copy[b])`` in place; returns ``x``.

    ``x``: ``(B, ...)`` with ``B = len(index)``; the noise has ``x[b].numel()`` values per
    row (see :func:`counter_normal`), reshaped to ``x.shape[1:]``. With
    ``clean_copy_zero`` the rows with ``copy == 0`` are left as they are. The result is
    ``x + sigma * noise`` in float32 arithmetic, the same floats as adding the output
    of :func:`counter_normal`. On the CPU, for a contiguous float32 ``x``, it is one
    compiled pass over ``x`` (no temporary tensors: on a busy CPU every extra tensor
    operation of a batch costs milliseconds). Raises ``ValueError`` as
    :func:`counter_normal` does, or when ``x`` has not ``len(index)`` rows.
    """
    if x.dim() < 1 or x.shape[0] != index.shape[0]:
        raise ValueError(
            f"x: expected {tuple(index.shape)[:1]} rows, got shape {tuple(x.shape)}"
        )
    num_values = math.prod(x.shape[1:])
    compiled = x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad
    if compiled and x.is_contiguous():
        _check_pairs(index, copy, num_values)
        _counter_normal_cpu(seed, index, copy, num_values,
                            x.numpy().reshape(x.shape[0], num_values), sigma, clean_copy_zero)
        return x
    noise = counter_normal(seed, index, copy, num_values)
    if clean_copy_zero:
        noise = noise * (copy != 0).to(noise.dtype).unsqueeze(1)
    return x.add_(sigma * noise.reshape(x.shape).to(x.dtype))


def _counter_normal_cpu(
    seed: int,
    index: torch.Tensor,
    copy: torch.Tensor,
    num_values: int,
    add_to: np.ndarray | None = None,
    scale: float = 1.0,
    skip_copy_zero: bool = False,
) -> torch.Tensor:
    """float32 ``(B, num_values)`` from the compiled kernel (:mod:`experiments._philox_numba`).

    With ``add_to`` (float32 ``(B, num_values)``, C-contiguous) it adds ``scale * z`` to
    its rows in place (not to rows with ``copy == 0`` if ``skip_copy_zero``) and returns
    it as a tensor.
    """
    from experiments import _philox_numba  # imports numba: only when noise is drawn

    seed &= (1 << 64) - 1
    out = np.empty((index.shape[0], num_values), dtype=np.float32) if add_to is None else add_to
    _philox_numba.counter_normal_kernel(
        index.to(torch.int64).numpy().astype(np.uint64),
        copy.to(device="cpu", dtype=torch.int64).numpy().astype(np.uint64),
        seed & _MASK32,
        seed >> 32,
        PHILOX_ROUNDS,
        out,
        np.float32(scale),
        add_to is not None,
        skip_copy_zero,
    )
    return torch.from_numpy(out)


def _counter_normal_torch(
    seed: int, index: torch.Tensor, copy: torch.Tensor, num_values: int
) -> torch.Tensor:
    """float32 ``(B, num_values)`` by tensor operations on ``index``'s device."""
    device = index.device
    blocks = (num_values + 3) // 4
    seed &= (1 << 64) - 1
    words = philox4x32(
        (
            index.to(torch.int64).unsqueeze(1),
            copy.to(device=device, dtype=torch.int64).unsqueeze(1),
            torch.arange(blocks, dtype=torch.int64, device=device).unsqueeze(0),
            torch.zeros((), dtype=torch.int64, device=device),
        ),
        (seed & _MASK32, seed >> 32),
    )
    # top 24 bits -> (0, 1]; float32 arithmetic (see the module docstring)
    u = [((w >> 8).to(torch.float32) + 0.5) * 2.0**-24 for w in words]
    normals = []
    for u1, u2 in ((u[0], u[1]), (u[2], u[3])):
        radius = torch.sqrt(-2.0 * torch.log(u1))
        angle = (2.0 * math.pi) * u2
        normals += [radius * torch.cos(angle), radius * torch.sin(angle)]
    z = torch.stack(normals, dim=-1).reshape(index.shape[0], 4 * blocks)
    return z[:, :num_values]


def augmentation_noise(
    seed: int, index: torch.Tensor, copy: torch.Tensor, shape: tuple[int, ...]
) -> torch.Tensor:
    """Unit-variance noise ``(B, *shape)`` for pairs ``(index, copy)``; zero where ``copy == 0``."""
    num_values = math.prod(shape)
    z = counter_normal(seed, index, copy, num_values)
    z = z * (copy != 0).to(z.dtype).unsqueeze(1)
    return z.reshape(index.shape[0], *shape)


def augmented_batches(
    data: ImageSet,
    batch_size: int,
    folds: int,
    sigma: float,
    seed: int,
    generator: torch.Generator,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of ``folds``-fold augmentation: batches ``(x, y)`` over ``folds * n`` pairs.

    The pairs ``(i, c)``, ``i < n``, ``c < folds``, are visited in the order of a
    permutation drawn on the CPU from ``generator``; copy 0 is the clean image, copy
    ``c >= 1`` is ``x_i + sigma * z(seed, i, c)`` (see :func:`counter_normal`). ``seed``
    should be the run's seed; ``i`` is the image's position in ``data``.
    """
    if folds < 1:
        raise ValueError(f"folds: must be at least 1, got {folds}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be positive, got {batch_size}")
    n = len(data)
    order = torch.randperm(folds * n, generator=generator)
    for start in range(0, folds * n, batch_size):
        pairs = order[start : start + batch_size].to(data.device)
        index, copy = pairs % n, pairs // n
        x, y = data.batch(index)
        if sigma != 0.0 and folds > 1:
            add_counter_normal_(x, seed, index, copy, sigma, clean_copy_zero=True)
        yield x, y


# --------------------------------------------------------------------------- noise training

_GAUSSIAN_TAG = "momentkit-gaussian-training"


def _gaussian_training_key(seed: int) -> int:
    """64-bit Philox key of noise training: a hash of ``seed``, so that its stream differs
    from the augmentation copies' (which use ``seed`` itself as the key)."""
    digest = hashlib.sha256(f"{_GAUSSIAN_TAG}:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def gaussian_training_noise(
    seed: int, index: torch.Tensor, epoch: int, shape: tuple[int, ...]
) -> torch.Tensor:
    """Unit-variance noise ``(B, *shape)`` of noise training for images ``index`` at ``epoch``.

    ``z(seed, i, epoch)`` is :func:`counter_normal` on the counter ``(i, epoch, block, 0)``
    with the key :func:`_gaussian_training_key` ``(seed)``: a pure function of
    ``(seed, i, epoch, pixel)``, so an image gets one fresh draw per epoch, the same
    whichever batch it lands in and on a resumed run. ``index``: 1-D integer tensor with
    values in [0, 2**32); ``epoch`` in [0, 2**32). The result lives on ``index``'s device.
    """
    if not 0 <= epoch < 2**32:
        raise ValueError(f"epoch: must lie in [0, 2**32), got {epoch}")
    copy = torch.full_like(index, epoch, dtype=torch.int64)
    z = counter_normal(_gaussian_training_key(seed), index, copy, math.prod(shape))
    return z.reshape(index.shape[0], *shape)


def gaussian_noise_batches(
    data: ImageSet,
    batch_size: int,
    sigma: float,
    seed: int,
    epoch: int,
    generator: torch.Generator,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of Gaussian noise training (Cohen et al. 2019): batches ``(x + sigma z, y)``.

    Every training image is visited once, in the order of a permutation drawn on the CPU
    from ``generator``, with one fresh draw ``z = gaussian_training_noise(seed, i, epoch)``
    (``i``: its position in ``data``); no clean copies. Noisy images are not clipped.
    ``seed`` should be the run's seed and ``sigma`` the certification sigma.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be positive, got {batch_size}")
    order = torch.randperm(len(data), generator=generator)
    for start in range(0, len(data), batch_size):
        index = order[start : start + batch_size].to(data.device)
        x, y = data.batch(index)
        if sigma != 0.0:
            copy = torch.full_like(index, epoch, dtype=torch.int64)
            add_counter_normal_(x, _gaussian_training_key(seed), index, copy, sigma)
        yield x, y
