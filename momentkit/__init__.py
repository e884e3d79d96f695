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

Built on the core: :func:`split_at_first_relu` (``(Upsilon, Omega)``),
:func:`expected_prediction` and :func:`moment_regularized_loss` (the paper's Eq. 3-4),
:func:`gaussian_robustness` (Eq. 6). The independent references live in
:mod:`momentkit.references` (Monte Carlo, two-stage linearization).
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from momentkit.affine import Normalize, affine_moments
from momentkit.certification import certified_accuracy
from momentkit.errors import MomentInputError
from momentkit.network import NetworkMoments, network_moments
from momentkit.regularizer import (
    ExpectedPrediction,
    MomentRegularizedLoss,
    expected_prediction,
    input_variance,
    moment_regularized_loss,
)
from momentkit.relu import (
    relu_covariance,
    relu_covariance_zero_mean,
    relu_mean,
    relu_mean_std,
    relu_moments,
)
from momentkit.robustness import RobustnessResult, gaussian_robustness, ring_noise
from momentkit.shallow import affine_relu_affine_covariance, affine_relu_affine_mean
from momentkit.smoothing import CertifyResult, certify, smoothed_predict
from momentkit.special import (
    bivariate_normal_cdf,
    log_normal_cdf,
    mills_ratio,
    normal_cdf,
    normal_pdf,
)
from momentkit.split import Upsilon, split_at_first_relu

try:
    __version__ = _version("momentkit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "CertifyResult", "certified_accuracy", "certify", "smoothed_predict",
    "ExpectedPrediction",
    "MomentInputError",
    "MomentRegularizedLoss",
    "NetworkMoments", "network_moments",
    "RobustnessResult",
    "Upsilon",
    "Normalize",
    "__version__",
    "affine_moments",
    "affine_relu_affine_covariance",
    "affine_relu_affine_mean",
    "bivariate_normal_cdf",
    "expected_prediction",
    "gaussian_robustness",
    "input_variance",
    "log_normal_cdf",
    "mills_ratio",
    "moment_regularized_loss",
    "normal_cdf",
    "normal_pdf",
    "relu_covariance",
    "relu_covariance_zero_mean",
    "relu_mean",
    "relu_mean_std",
    "relu_moments",
    "ring_noise",
    "split_at_first_relu",
]
