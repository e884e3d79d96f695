"""momentkit.network._chain: the diagonal pooling chain's analytic backward pass.

The forward values are those of the chain of ``clark_max`` calls bit for bit; the
gradients are checked against finite differences (float64, where the analytic formulas
are the only thing under test) and against autograd through the forward operations
(float32 and half, the production dtypes), including selections (zero variance), ties,
padding and dead units; second derivatives go through autograd and match it to rounding.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from momentkit import network_moments
from momentkit.network import pooling
from momentkit.network._chain import DiagonalChain, diagonal_chain, diagonal_chain_reference

F64 = torch.float64


def _inputs(n, kk, dtype, seed, pad, degenerate):
    g = torch.Generator().manual_seed(seed)
    ms = 2.0 * torch.randn(n, kk, generator=g, dtype=F64)
    vs = torch.rand(n, kk, generator=g, dtype=F64) + 0.05
    if degenerate:
        vs[: n // 8] = 0.0  # every merge of these windows is a selection
        ms[n // 8 : n // 4] = 0.0  # ties of the means
        vs[n // 4 : 3 * n // 8, 1] = 0.0  # one unit without variance
        ms[3 * n // 8 : n // 2, 0] = 40.0  # a winner by 40 standard deviations
        ms[n // 2 : 5 * n // 8] = -0.3  # tied means and tied variances
        vs[n // 2 : 5 * n // 8] = 0.2
    oks = torch.rand(n, kk, generator=g) > 0.3 if pad else None
    return ms.to(dtype), vs.to(dtype), oks


@pytest.mark.parametrize("zero_first", [False, True])
@pytest.mark.parametrize("pad", [False, True])
def test_gradients_match_finite_differences_in_float64(zero_first, pad):
    # The Function itself in float64 (production uses the accurate path there), so the
    # closed-form derivatives are checked against central differences at 1e-6.
    ms, vs, oks = _inputs(24, 4, F64, 0, pad, degenerate=False)
    ms.requires_grad_(True)
    vs.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: DiagonalChain.apply(a, b, oks, zero_first), (ms, vs), atol=1e-8
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("zero_first", [False, True])
@pytest.mark.parametrize("pad", [False, True])
def test_values_equal_and_gradients_match_autograd_below_float64(dtype, zero_first, pad):
    ms, vs, oks = _inputs(4000, 4, dtype, 1, pad, degenerate=True)
    a, b = ms.clone().requires_grad_(True), vs.clone().requires_grad_(True)
    ar, br = ms.clone().requires_grad_(True), vs.clone().requires_grad_(True)
    m, v = DiagonalChain.apply(a, b, oks, zero_first)
    mr, vr = diagonal_chain_reference(ar, br, oks, zero_first)
    assert torch.equal(m, mr) and torch.equal(v, vr)  # the same operations
    g = torch.Generator().manual_seed(2)
    gm, gv = (torch.randn(m.shape, generator=g).to(dtype) for _ in range(2))
    torch.autograd.backward((m, v), (gm, gv))
    torch.autograd.backward((mr, vr), (gm, gv))
    # Both are the exact derivative up to rounding: autograd through about 30 rounded
    # operations per merge, the closed forms through about 20, over 4 merges (each
    # gradient is a sum over the chain). Working precision float32 for both dtypes; in
    # half each result is rounded to half once (eps 2^-11) on output.
    eps = 2.0**-23 if dtype == torch.float32 else 2.0**-10
    for got, ref in ((a.grad, ar.grad), (b.grad, br.grad)):
        assert torch.isfinite(got).all()
        scale = ref.float().abs().amax(-1, keepdim=True).clamp_min(1.0)
        err = ((got.float() - ref.float()).abs() / scale).max()
        assert err <= 64 * eps, float(err)


def test_selections_follow_autograd_exactly():
    # theta = 0 everywhere: every merge is a selection, whose derivatives are 0 and 1
    # (1 for the first input at a tie of the means, as autograd through where()).
    ms = torch.tensor([[1.0, 1.0, 0.5], [0.0, 2.0, 2.0], [-1.0, -1.0, -1.0]])
    vs = torch.zeros_like(ms)
    a, b = ms.clone().requires_grad_(True), vs.clone().requires_grad_(True)
    ar, br = ms.clone().requires_grad_(True), vs.clone().requires_grad_(True)
    m, v = DiagonalChain.apply(a, b, None, False)
    mr, vr = diagonal_chain_reference(ar, br, None, False)
    (m.sum() + 3.0 * v.sum()).backward()
    (mr.sum() + 3.0 * vr.sum()).backward()
    assert torch.equal(a.grad, ar.grad) and torch.equal(b.grad, br.grad)


@pytest.mark.parametrize("zero_first", [False, True])
def test_second_derivatives_are_those_of_autograd(zero_first):
    # A graph of the backward pass (create_graph=True) is built by autograd through the
    # forward operations.
    ms, vs, oks = _inputs(200, 4, torch.float32, 3, True, degenerate=True)
    out = []
    for fn in (lambda a, b: DiagonalChain.apply(a, b, oks, zero_first),
               lambda a, b: diagonal_chain_reference(a, b, oks, zero_first)):
        a, b = ms.clone().requires_grad_(True), vs.clone().requires_grad_(True)
        m, v = fn(a, b)
        ga, gb = torch.autograd.grad((m * m).sum() + v.sum(), (a, b), create_graph=True)
        (ga.square().sum() + (gb * a).sum()).backward()
        out.append((ga.detach(), gb.detach(), a.grad, b.grad))
    # The first derivatives are autograd's own (bit for bit); the second ones come from
    # the same graph, summed in another order: equal to float32 rounding.
    (ga, gb, *second), (ga_ref, gb_ref, *second_ref) = out
    assert torch.equal(ga, ga_ref) and torch.equal(gb, gb_ref)
    for got, ref in zip(second, second_ref, strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=64 * 2.0**-23 * float(ref.abs().max()))


def test_float64_keeps_the_accurate_operations(monkeypatch):
    calls = []
    monkeypatch.setattr(DiagonalChain, "apply", lambda *a: calls.append(a))
    ms, vs, _ = _inputs(8, 4, F64, 4, False, degenerate=False)
    diagonal_chain(ms, vs, None)
    assert not calls
    diagonal_chain(ms.float(), vs.float(), None)
    assert len(calls) == 1


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, 2, 1, ceil_mode=True)])
def test_network_gradients_match_the_chain_through_autograd(monkeypatch, pool):
    # A float32 network through network_moments (diagonal): the parameters' gradients
    # with the analytic chain against the same network with the chain left to autograd.
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), pool, nn.Conv2d(4, 3, 3), pool,
        nn.ReLU(), nn.Flatten(), nn.LazyLinear(5),
    )
    x = torch.rand(6, 1, 12, 12)
    net(x)
    grads = []
    for fn in (diagonal_chain, lambda *a, **k: diagonal_chain_reference(
            *a, zero_first=k.get("zero_first", False))):
        monkeypatch.setattr(pooling, "diagonal_chain", fn)
        net.zero_grad()
        res = network_moments(net, x, 0.3, covariance="diagonal")
        (res.mean.square().sum() + res.var.sum()).backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for got, ref in zip(*grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))

