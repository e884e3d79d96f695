"""momentkit: analytic Gaussian moments of ReLU networks, verified against references.

The verified core (pure functions on tensors; CPU and CUDA; float32 and float64;
batched; autograd-safe):

* :func:`relu_mean`, :func:`relu_mean_std`, :func:`relu_moments`: moments of
  ``ReLU(X)`` for ``X ~ N(mean, var)`` (paper Eq. 1);
* :func:`relu_covariance` (exact for non-zero means) and
  :func:`relu_covariance_zero_mean` (Bibi et al.);
* :func:`affine_moments`: through ``nn.Linear``, ``nn.Conv2d``, :class:`Normalize`
  or a matrix (Eq. 5), diagonal or full covariance;
* :func:`affine_relu_affine_mean` (Theorem 1) and
  :func:`affine_relu_affine_covariance`;
* :class:`MomentInputError`: the one exception raised for bad input.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from momentkit.affine import Normalize, affine_moments
from momentkit.errors import MomentInputError
from momentkit.relu import (
    relu_covariance,
    relu_covariance_zero_mean,
    relu_mean,
    relu_mean_std,
    relu_moments,
)
from momentkit.shallow import affine_relu_affine_covariance, affine_relu_affine_mean
from momentkit.special import (
    bivariate_normal_cdf,
    log_normal_cdf,
    mills_ratio,
    normal_cdf,
    normal_pdf,
)

try:
    __version__ = _version("momentkit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "MomentInputError",
    "Normalize",
    "__version__",
    "affine_moments",
    "affine_relu_affine_covariance",
    "affine_relu_affine_mean",
    "bivariate_normal_cdf",
    "log_normal_cdf",
    "mills_ratio",
    "normal_cdf",
    "normal_pdf",
    "relu_covariance",
    "relu_covariance_zero_mean",
    "relu_mean",
    "relu_mean_std",
    "relu_moments",
]
