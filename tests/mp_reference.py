"""High-precision references (mpmath, 30 digits) shared by the core tests."""

from __future__ import annotations

import mpmath as mp

mp.mp.dps = 30


def relu_moments_ref(mu: float, s: float) -> tuple[mp.mpf, mp.mpf]:
    """Mean and variance of ReLU(N(mu, s^2)) from the textbook formulas, at 30 digits."""
    mu, s = mp.mpf(mu), mp.mpf(s)
    if s == 0:
        return max(mu, mp.mpf(0)), mp.mpf(0)
    z = mu / s
    cdf, pdf = mp.ncdf(z), mp.npdf(z)
    mean = mu * cdf + s * pdf
    second = (mu * mu + s * s) * cdf + mu * s * pdf
    return mean, second - mean * mean


def bvn_ref(h: float, k: float, r: float) -> mp.mpf:
    """P(X < h, Y < k), standard bivariate normal with correlation r, by 1-D quadrature
    of phi(x) Phi((k - r x) / sqrt(1 - r^2)), split where the integrand turns."""
    h, k, r = mp.mpf(h), mp.mpf(k), mp.mpf(r)
    if r == 1:
        return mp.ncdf(min(h, k))
    if r == -1:
        return max(mp.mpf(0), mp.ncdf(h) - mp.ncdf(-k))
    s = mp.sqrt(1 - r * r)
    pts = [-mp.inf]
    if r != 0:
        x0 = k / r
        for w in (x0 - 8 * s / abs(r), x0 - s / abs(r), x0, x0 + s / abs(r), x0 + 8 * s / abs(r)):
            if pts[-1] < w < h:
                pts.append(w)
    pts.append(h)
    return mp.quad(lambda x: mp.npdf(x) * mp.ncdf((k - r * x) / s), pts)


def relu_cross_moment_ref(m1: float, m2: float, s1: float, s2: float, r: float) -> mp.mpf:
    """E[ReLU(X1) ReLU(X2)] by conditioning on X1 and integrating in one dimension:
    E[X1+ E[X2+ | X1]], with X2 | X1 = x normal, and E[ReLU] of it in closed form."""
    m1, m2, s1, s2, r = map(mp.mpf, (m1, m2, s1, s2, r))
    cs = s2 * mp.sqrt(1 - r * r)

    def integrand(x):
        cm = m2 + r * s2 / s1 * (x - m1)
        inner = relu_moments_ref(cm, cs)[0] if cs > 0 else max(cm, mp.mpf(0))
        return x * inner * mp.npdf((x - m1) / s1) / s1

    pts = {mp.mpf(0), max(m1, mp.mpf(0)) + s1, m1 + 10 * s1}
    for k in (-10, -1, 0, 1, 10):  # around m1 +- k s1: the density's bulk
        pts.add(m1 + k * s1)
    if r != 0:
        # E[X2+ | X1 = x] turns at x0, where the conditional mean crosses 0, over a width
        # w in x; at high |r| that width is narrow and must be bracketed for quad.
        x0 = m1 - m2 * s1 / (r * s2)
        w = cs * s1 / abs(r * s2)
        for k in (-10, -1, 0, 1, 10):
            pts.add(x0 + k * w)
    pts = sorted(p for p in pts if p >= 0) + [mp.inf]
    return mp.quad(integrand, pts)


def relu_covariance_ref(m1, m2, s1, s2, r) -> mp.mpf:
    e1 = relu_moments_ref(m1, s1)[0]
    e2 = relu_moments_ref(m2, s2)[0]
    return relu_cross_moment_ref(m1, m2, s1, s2, r) - e1 * e2
