"""Input checks shared by momentkit's public functions: each written once.

Every check takes the name of the public function the user called (``fn``) and the
name of the argument (``name``) and raises :class:`~momentkit.errors.MomentInputError`
with the message ``"{fn}: {name} ..."``, so that an error always names the function
that was called and the argument at fault, however deep the check runs.

Non-finite values. NaN is always refused. Infinity is refused wherever it would be the
parameter of a Gaussian (a mean, a variance, a covariance, a standard deviation) or an
input to a network: ``N(inf, 1)`` is not a distribution, and the answers (``inf - inf``
in a covariance, the arg-max of an infinite logit) would be NaN or meaningless.

Positive semi-definiteness (:func:`check_covariance_matrix`). A covariance ``C`` of
size ``n`` and dtype ``t`` is accepted when its smallest eigenvalue is at least

    -tol,  tol = n * max_i |C_ii| * (PSD_ULPS * eps(w) + eps(t)),

``w`` the working dtype (``t`` promoted to at least float32: half precision is
computed in float32) and :data:`PSD_ULPS` = 64. Derivation: a covariance that is
computed, e.g. the Gram matrix ``fl(A A^T)`` of a ``(n, m)`` matrix, has an error
``E`` with ``|E_ij| <= gamma_m (|A| |A|^T)_ij <= m eps sqrt(C_ii C_jj)`` (the standard
dot-product bound, then Cauchy-Schwarz), so ``||E||_2 <= ||E||_F <= m n eps max C_ii``
and its eigenvalues may fall that far below those of the exact, PSD matrix. The
first term admits, in the worst case, any Gram matrix formed in ``w`` with an inner
dimension up to 64 (every entry wrong by up to 64 ulps of the largest variance); the
second admits the rounding of each entry to ``t`` for storage (half an ulp of
``max C_ii`` per entry, ``n eps(t) / 2`` in norm, doubled). In practice rounding
errors are not aligned: for ``A @ A.T`` with random ``A`` in float32 and float64
(``n`` up to 300, inner dimension up to 2000, rank-deficient included) the measured
smallest eigenvalue was at most 0.2 ``n eps max C_ii`` below zero. In bfloat16 the
tolerance for ``n = 2`` is 1.6% of the largest variance, so ``[[1, 2], [2, 1]]``
(smallest eigenvalue -1) is refused in every dtype. The test runs in float64 on the
matrix scaled by its largest entry: a Cholesky factorization of ``C + tol I`` (cheap);
only when that fails are the eigenvalues computed, to decide and to report the
smallest. It implies ``|C_ij| <= sqrt(C_ii C_jj)`` up to the same tolerance (a 2x2
principal minor).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from momentkit.errors import MomentInputError

#: Ulps of the largest variance by which each entry of a covariance may be wrong
#: (see the module docstring for the derivation of the PSD tolerance).
PSD_ULPS = 64


# ----------------------------------------------------------------------------------
# Python scalars


def check_count(value: object, name: str, fn: str, minimum: int = 1) -> int:
    """An integer ``>= minimum`` (``bool`` is refused), as a Python ``int``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise MomentInputError(f"{fn}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_seed(value: object, fn: str, name: str = "seed", bits: int | None = None) -> int:
    """A non-negative integer seed (below ``2**bits`` when ``bits`` is given)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | np.integer)
        or value < 0
        or (bits is not None and value >= 2**bits)
    ):
        upper = f" below 2**{bits}" if bits is not None else ""
        raise MomentInputError(
            f"{fn}: {name} must be a non-negative integer{upper}, got {value!r}"
        )
    return int(value)


def check_scalar(value: object, name: str, fn: str, *, upper: float = math.inf) -> float:
    """A finite real number in ``[0, upper)`` (a noise level, a weight), as a float."""
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise MomentInputError(f"{fn}: {name} must be a number, got {value!r}") from exc
    if isinstance(value, bool) or not math.isfinite(out) or out < 0 or out >= upper:
        bound = "finite and >= 0" if upper == math.inf else f"in [0, {upper:g})"
        raise MomentInputError(f"{fn}: {name} must be {bound}, got {value!r}")
    return out


# ----------------------------------------------------------------------------------
# Tensors


def as_float_tensor(
    x: object, name: str, fn: str, like: torch.Tensor | None = None, *, finite: bool = False
) -> torch.Tensor:
    """``x`` as a floating-point tensor (numbers and lists are converted with the dtype
    and device of ``like``, else the default dtype); integer tensors and NaN are refused,
    and infinity too with ``finite=True`` (one pass over ``x`` either way)."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(
                x,
                dtype=like.dtype if like is not None else torch.get_default_dtype(),
                device=like.device if like is not None else None,
            )
        except (TypeError, ValueError, RuntimeError) as exc:
            raise MomentInputError(f"{fn}: {name} must be a tensor, got {x!r}") from exc
    if not x.is_floating_point():
        raise MomentInputError(f"{fn}: {name} must be a floating-point tensor, got {x.dtype}")
    if finite:
        check_finite(x, name, fn)
    else:
        check_not_nan(x, name, fn)
    return x


def as_float64_array(value: object, name: str, fn: str) -> np.ndarray:
    """``value`` (a tensor, an array, numbers) as a finite float64 NumPy array."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MomentInputError(f"{fn}: {name} cannot be converted to float64 ({exc})") from exc
    if not np.all(np.isfinite(arr)):
        what = "NaN" if np.any(np.isnan(arr)) else "inf"
        raise MomentInputError(f"{fn}: {name} contains {what}")
    return arr


def check_not_nan(x: torch.Tensor, name: str, fn: str) -> None:
    """Refuse NaN in ``x`` (infinity is let through: for elementwise maps such as
    ``Phi`` it has a limit that is the right answer)."""
    if x.numel() and bool(torch.isnan(x).any()):
        raise MomentInputError(f"{fn}: {name} contains NaN")


def check_finite(x: torch.Tensor, name: str, fn: str) -> None:
    """Refuse NaN and infinity in ``x``."""
    if x.numel() and not bool(torch.isfinite(x).all()):
        what = "NaN" if bool(torch.isnan(x).any()) else "inf"
        raise MomentInputError(f"{fn}: {name} contains {what}")


def check_nonnegative(x: torch.Tensor, name: str, fn: str) -> None:
    """Refuse negative entries (a variance, a standard deviation)."""
    if bool((x < 0).any()):
        raise MomentInputError(f"{fn}: {name} must be non-negative, found negative values")


def check_spread(x: torch.Tensor, name: str, fn: str) -> None:
    """A variance or standard deviation: finite and non-negative."""
    check_finite(x, name, fn)
    check_nonnegative(x, name, fn)


def as_spread(x: object, name: str, fn: str, like: torch.Tensor | None = None) -> torch.Tensor:
    """A variance or standard deviation as a floating tensor: finite, non-negative."""
    x = as_float_tensor(x, name, fn, like, finite=True)
    check_nonnegative(x, name, fn)
    return x


def broadcast_shape(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str], fn: str):
    """``torch.broadcast_shapes`` of the two, or an error naming both arguments."""
    try:
        return torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError as exc:
        raise MomentInputError(
            f"{fn}: {names[0]} of shape {tuple(a.shape)} and {names[1]} of shape "
            f"{tuple(b.shape)} do not broadcast"
        ) from exc


def check_result(out: torch.Tensor, what: str, fn: str, hint: str = "") -> torch.Tensor:
    """Refuse a result that over- or underflowed to a non-finite value (the inputs were
    finite), so that no NaN or inf is ever returned silently."""
    if out.numel() and not bool(torch.isfinite(out).all()):
        raise MomentInputError(
            f"{fn}: {what} overflows {out.dtype} (the input is finite){hint}"
        )
    return out


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The promoted dtype of the arguments, at least float32 (half precision is
    computed in float32 and returned in its own dtype)."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def check_batch(x: torch.Tensor, fn: str) -> None:
    """A batch ``(N, ...)``: a floating tensor with at least 2 dimensions."""
    if not isinstance(x, torch.Tensor):
        raise MomentInputError(f"{fn}: x must be a tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise MomentInputError(
            f"{fn}: x must be a batch (N, ...) with at least 2 dimensions, got shape "
            f"{tuple(x.shape)}; pass a single input as x[None]"
        )
    if not x.is_floating_point():
        raise MomentInputError(f"{fn}: x must be a floating point tensor, got dtype {x.dtype}")


def check_covariance_matrix(cov: torch.Tensor, fn: str, name: str = "cov") -> None:
    """Raise :class:`MomentInputError` unless ``cov`` is a covariance ``(..., n, n)``:
    finite, symmetric (to 64 eps of each matrix's largest entry, which leaves room for
    the rounding of ``A Sigma A^T``), a non-negative diagonal and positive
    semi-definite to the tolerance of the module docstring."""
    if cov.dim() < 2 or cov.shape[-1] != cov.shape[-2]:
        raise MomentInputError(
            f"{fn}: {name} must have shape (..., n, n), got {tuple(cov.shape)} (not square)"
        )
    check_finite(cov, name, fn)
    if cov.numel() == 0:
        return
    sym_tol = 64 * torch.finfo(cov.dtype).eps * cov.abs().amax(dim=(-1, -2), keepdim=True)
    if bool(((cov - cov.transpose(-1, -2)).abs() > sym_tol).any()):
        raise MomentInputError(f"{fn}: {name} is not symmetric")
    if bool((torch.diagonal(cov, dim1=-2, dim2=-1) < 0).any()):
        raise MomentInputError(f"{fn}: {name} has a negative variance on its diagonal")
    _check_psd(cov.detach(), fn, name)


def _check_psd(cov: torch.Tensor, fn: str, name: str) -> None:
    n = cov.shape[-1]
    c = cov.to(torch.float64).reshape(-1, n, n)
    scale = c.abs().amax(dim=(-1, -2), keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    c = c / scale
    c = 0.5 * (c + c.transpose(-1, -2))
    max_var = torch.diagonal(c, dim1=-2, dim2=-1).amax(dim=-1)
    ulps = PSD_ULPS * torch.finfo(compute_dtype(cov.dtype)).eps + torch.finfo(cov.dtype).eps
    tol = n * ulps * max_var  # (batch,), module docstring
    eye = torch.eye(n, dtype=c.dtype, device=c.device)
    shifted = c + (tol + torch.finfo(torch.float64).tiny)[:, None, None] * eye
    _, info = torch.linalg.cholesky_ex(shifted)
    if not bool((info != 0).any()):
        return
    smallest = torch.linalg.eigvalsh(c).amin(dim=-1)
    bad = smallest < -tol
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        raise MomentInputError(
            f"{fn}: {name} is not positive semi-definite: smallest eigenvalue "
            f"{float(smallest[k] * scale.flatten()[k]):.3e} (matrix {k} of the batch; "
            f"rounding-level values down to -{float(tol[k] * scale.flatten()[k]):.3e} are "
            "accepted)"
        )


def check_mean_and_spread(
    mean: object, spread: object, fn: str, names: tuple[str, str] = ("mean", "var_or_cov")
) -> bool:
    """A Gaussian's mean and its diagonal variance (the mean's shape) or full covariance
    (``(..., n, n)``): finite floating tensors, the variance non-negative, the covariance
    as :func:`check_covariance_matrix`. Returns True for a diagonal variance."""
    mean_name, spread_name = names
    for name, t in ((mean_name, mean), (spread_name, spread)):
        if not isinstance(t, torch.Tensor):
            raise MomentInputError(
                f"{fn}: {name} must be a floating-point tensor, got {type(t).__name__}"
            )
        as_float_tensor(t, name, fn, finite=True)
    if spread.shape == mean.shape:
        check_nonnegative(spread, f"{spread_name} (a variance)", fn)
        return True
    if spread.dim() >= 2 and spread.shape[-1] == spread.shape[-2]:
        check_covariance_matrix(spread, fn, f"{spread_name} (a covariance)")
        return False
    raise MomentInputError(
        f"{fn}: {spread_name} of shape {tuple(spread.shape)} is neither a variance of "
        f"{mean_name}'s shape {tuple(mean.shape)} nor a covariance of shape (..., n, n)"
    )


def check_sigmas(sigmas: Iterable[float] | torch.Tensor, fn: str, name: str = "sigmas"):
    """A non-empty, strictly increasing 1-D float64 tensor of noise levels, finite, >= 0."""
    try:
        s = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise MomentInputError(
            f"{fn}: {name} must be a 1-D sequence of numbers, got {sigmas!r}"
        ) from exc
    if s.dim() != 1 or s.numel() == 0:
        raise MomentInputError(
            f"{fn}: {name} must be a non-empty 1-D sequence, got shape {tuple(s.shape)}"
        )
    check_spread(s, name, fn)
    if bool((s[1:] <= s[:-1]).any()):
        raise MomentInputError(f"{fn}: {name} must be strictly increasing")
    return s


def check_sigma_tensor(sigma: object, fn: str, name: str = "sigma") -> torch.Tensor:
    """A noise standard deviation (a number or a tensor of any shape) as a tensor:
    real, finite, non-negative. Python numbers become float64 so that float64 work
    sees them exactly."""
    try:
        sigma_t = sigma if isinstance(sigma, torch.Tensor) else torch.as_tensor(
            sigma, dtype=torch.float64
        )
    except (TypeError, ValueError, RuntimeError) as exc:
        raise MomentInputError(
            f"{fn}: {name} must be a number or a tensor, got {sigma!r}"
        ) from exc
    if not (sigma_t.is_floating_point() or sigma_t.dtype in (torch.int32, torch.int64)):
        raise MomentInputError(f"{fn}: {name} must hold real numbers, got dtype {sigma_t.dtype}")
    check_spread(sigma_t, name, fn)
    return sigma_t
