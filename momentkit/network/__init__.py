"""Gaussian moments of a whole network's output under Gaussian input noise.

:func:`network_moments` (see :mod:`momentkit.network.propagate`) and
:func:`network_mode`, the mode it would use; the maximum of two
correlated Gaussians in :mod:`momentkit.network.gaussian_max`.
"""

from momentkit.network.gaussian_max import clark_max, stein_weight
from momentkit.network.propagate import NetworkMoments, network_mode, network_moments

__all__ = ["NetworkMoments", "clark_max", "network_mode", "network_moments", "stein_weight"]
