"""Each branch point of momentkit.relu, imported by name, at the switch and one ulp
either side (numpy.nextafter), against the mpmath references: values and first
derivatives, per dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from momentkit._relu_kernels import (
    RECOMPUTE_Z_FLOAT64,
    RECOMPUTE_Z_LOW_PRECISION,
    TAIL_SWITCH,
    Z_CLAMP,
)
from momentkit.relu import relu_mean, relu_mean_std, relu_moments
from tests.mp_reference import mp, relu_moments_ref

F32, F64 = torch.float32, torch.float64
# The accuracy contract per dtype (relative, where the true value is a normal number).
REL_TOL = {F64: 1e-12, F32: 1e-5}
# Powers of two: mu = z * s and var = s * s are exact, so mu / s is z itself and each
# point lies on the intended side of its switch.
SCALES = [2.0**-20, 0.5, 1.0, 4.0, 2.0**20]
NP = {F32: np.float32, F64: np.float64}


def _bracket(z0: float, dtype) -> list[float]:
    t = NP[dtype](z0)
    return [float(np.nextafter(t, NP[dtype](-np.inf))), float(t),
            float(np.nextafter(t, NP[dtype](np.inf)))]


def _failures(z_values, dtype):
    bad = []
    for z in z_values:
        for s in SCALES:
            mu_t = torch.tensor([z * s], dtype=dtype, requires_grad=True)
            s_t = torch.tensor([s], dtype=dtype, requires_grad=True)
            assert mu_t.item() / s_t.item() == z
            ref_mean, ref_var = relu_moments_ref(z * s, s)
            zz = mp.mpf(z)
            mean_std = relu_mean_std(mu_t, s_t)
            d_mu, d_s = torch.autograd.grad(mean_std.sum(), (mu_t, s_t))
            mean_var = relu_mean(mu_t, s_t.detach() ** 2)
            m, v = relu_moments(mu_t, s_t.detach() ** 2)
            for name, got, ref, tol in (
                ("relu_mean_std", mean_std, ref_mean, REL_TOL[dtype]),
                ("relu_mean", mean_var, ref_mean, REL_TOL[dtype]),
                ("relu_moments.mean", m, ref_mean, REL_TOL[dtype]),
                ("relu_moments.var", v, ref_var, REL_TOL[dtype]),
                # Phi(z), phi(z) through erfc and exp: a few ulps of the dtype each,
                # times 1 + z^2 for the rounding of z in the Gaussian's exponent.
                ("dT/dmu", d_mu, mp.ncdf(zz), 8 * (1 + z * z) * torch.finfo(dtype).eps),
                ("dT/ds", d_s, mp.npdf(zz), 8 * (1 + z * z) * torch.finfo(dtype).eps),
            ):
                ref = float(ref)
                err = abs(got.item() - ref) / abs(ref)
                if err > tol:
                    bad.append((name, z, s, float(got), ref, err))
    return bad


@pytest.mark.parametrize("z0", [RECOMPUTE_Z_FLOAT64, TAIL_SWITCH])
def test_float64_switches(z0):
    bad = _failures(_bracket(z0, F64), F64)
    assert not bad, "\n".join(map(str, bad))


@pytest.mark.parametrize("z0", [RECOMPUTE_Z_LOW_PRECISION, -TAIL_SWITCH, TAIL_SWITCH])
def test_float32_switches(z0):
    bad = _failures(_bracket(z0, F32), F32)
    assert not bad, "\n".join(map(str, bad))


def test_the_switches_are_where_the_docs_say():
    # The float32 recompute covers the region where float32's direct formula fails the
    # contract (z below -2), the float64 one the continued-fraction tail.
    assert RECOMPUTE_Z_LOW_PRECISION == -2.0
    assert RECOMPUTE_Z_FLOAT64 == -TAIL_SWITCH == -3.0


@pytest.mark.parametrize("dtype", [F32, F64])
def test_z_clamp_changes_no_value(dtype):
    # Either side of |z| = Z_CLAMP the mean is ReLU(mu) exactly (phi underflowed long
    # before) and the derivatives are Phi = 0 or 1 and phi = 0.
    for sign in (-1.0, 1.0):
        for z in _bracket(sign * Z_CLAMP, F64):
            s = torch.tensor([2.0**-40], dtype=dtype, requires_grad=True)
            mu = (torch.tensor([z], dtype=F64) * 2.0**-40).to(dtype).requires_grad_()
            out = relu_mean_std(mu, s)
            assert torch.equal(out, torch.relu(mu))
            d_mu, d_s = torch.autograd.grad(out.sum(), (mu, s))
            assert d_mu.item() == (1.0 if sign > 0 else 0.0) and d_s.item() == 0.0
