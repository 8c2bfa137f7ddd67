"""von Mises-Fisher: densities against closed forms and mpmath, samplers against moments,
reparameterized gradients against analytic / finite-difference / score-function values,
the concentration solver by round trip, errors and shapes.

Monte-Carlo checks use tolerances of 5 standard errors (estimated from the samples or
known in closed form), with fixed seeds, so a correct implementation fails with
probability ~1e-6 per check and a wrong one is caught when its bias exceeds ~5 se.
"""
from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
import torch

import diffkern as dk
from diffkern.distributions import (VonMisesFisher, concentration_from_mean_resultant_length,
                                    fit_von_mises_fisher)
from tests import op_contract as contract

F64 = torch.float64
PS = [2, 3, 10, 1000, 32768]
KAPPAS = [1e-6, 1e-2, 1.0, 1e3, 1e7]
EPS = torch.finfo(F64).eps


def _unit(*shape, seed=0, dtype=F64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=F64)
    return (x / x.norm(dim=-1, keepdim=True)).to(device=device, dtype=dtype)


def _ratio(p, k):
    return dk.bessel_iv_ratio(p / 2 - 1, torch.as_tensor(k, dtype=F64))


def _dratio(p, k):
    k = torch.as_tensor(k, dtype=F64)
    a = _ratio(p, k)
    return (1 - a) * (1 + a) - (p - 1) * a / k


# ------------------------------------------------------------------------ densities


@pytest.mark.parametrize("kappa", [1e-6, 1e-2, 1.0, 10.0, 300.0])
def test_p2_matches_torch_von_mises_and_normalizes(kappa):
    m = 0.7
    theta = torch.linspace(-math.pi, math.pi, 4097, dtype=F64)[:-1]
    x = torch.stack([theta.cos(), theta.sin()], -1)
    d = VonMisesFisher(torch.tensor([math.cos(m), math.sin(m)], dtype=F64),
                       torch.tensor(kappa, dtype=F64))
    ours = d.log_prob(x)
    ref = torch.distributions.VonMises(torch.tensor(m, dtype=F64),
                                       torch.tensor(kappa, dtype=F64)).log_prob(theta)
    # torch's VonMises uses a polynomial approximation of log I_0 (error up to ~3e-7)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-6)
    mp.mp.dps = 30
    exact_norm = float(-mp.log(2 * mp.pi) - mp.log(mp.besseli(0, kappa)))
    assert torch.allclose(ours, exact_norm + kappa * torch.cos(theta - m), rtol=1e-14,
                          atol=1e-14 * max(1.0, kappa))
    # periodic trapezoid rule: spectrally accurate for this smooth integrand
    total = ours.exp().sum() * (2 * math.pi / theta.numel())
    assert abs(total.item() - 1) < 1e-12


def _log_sinh(k):
    return k + math.log1p(-math.exp(-2 * k)) - math.log(2)


@pytest.mark.parametrize("kappa", [1e-6, 1e-2, 1.0, 30.0, 1e3, 1e7])
def test_p3_closed_form_and_normalizes(kappa):
    mu = _unit(3, seed=1)
    x = _unit(200, 3, seed=2)
    x[0] = mu
    x[1] = -mu
    d = VonMisesFisher(mu, torch.tensor(kappa, dtype=F64))
    ref_norm = math.log(kappa) - math.log(4 * math.pi) - _log_sinh(kappa) if kappa > 1e-3 \
        else -math.log(4 * math.pi) - kappa ** 2 / 6  # kappa/sinh(kappa) = 1 - k^2/6 + ...
    ref = ref_norm + kappa * (x @ mu)
    got = d.log_prob(x)
    assert torch.allclose(got, ref, rtol=1e-13, atol=1e-13 * max(1.0, kappa))
    if kappa <= 1e3:
        # integrate over the sphere: dA = 2 pi dw along w = mu.x (Gauss-Legendre in w,
        # on [1 - 60/kappa, 1] when concentrated)
        t, wts = np.polynomial.legendre.leggauss(200)
        lo = max(-1.0, 1 - 60 / kappa)
        w = torch.tensor((t + 1) / 2 * (1 - lo) + lo, dtype=F64)
        pts = torch.stack([w, torch.sqrt(1 - w * w), torch.zeros_like(w)], -1)
        d1 = VonMisesFisher(torch.tensor([1.0, 0, 0], dtype=F64), torch.tensor(kappa, dtype=F64))
        total = 2 * math.pi * (d1.log_prob(pts).exp() * torch.tensor(wts)).sum() * (1 - lo) / 2
        assert abs(total.item() - 1) < 1e-12


@pytest.mark.parametrize("p,kappa", [(10, 1e3), (1000, 1e-2), (1000, 1e3), (1000, 1e7),
                                     (32768, 1e-6), (32768, 1.0), (32768, 1e3),
                                     (32768, 1e7), (2, 1e7), (5, 123.4)])
def test_log_normalizer_and_entropy_vs_mpmath(p, kappa):
    mp.mp.dps = 40
    nu = mp.mpf(p) / 2 - 1
    k = mp.mpf(kappa)
    log_c = nu * mp.log(k) - mp.mpf(p) / 2 * mp.log(2 * mp.pi) - mp.log(mp.besseli(nu, k))
    a = mp.besseli(nu + 1, k) / mp.besseli(nu, k)
    mu = torch.zeros(p, dtype=F64)
    mu[0] = 1
    d = VonMisesFisher(mu, torch.tensor(kappa, dtype=F64))
    got = d.log_prob(mu).item()  # log C + kappa
    want = float(log_c + k)
    assert abs(got - want) <= 1e-14 * max(1.0, abs(want)) * 4
    ent, want_ent = d.entropy().item(), float(-log_c - k * a)
    # -log C and kappa*A nearly cancel for huge kappa: allow the error of kappa*A
    assert abs(ent - want_ent) <= 4e-15 * (abs(want_ent) + kappa + abs(float(log_c)))
    assert abs(d.mean[0].item() - float(a)) <= 4e-16


@pytest.mark.parametrize("p", PS)
def test_everything_finite_over_the_range(p, device):
    torch.manual_seed(0)
    kap = torch.tensor(KAPPAS, dtype=F64, device=device)
    mu = _unit(len(KAPPAS), p, seed=p, device=device)
    d = VonMisesFisher(mu, kap)
    for val in (mu, -mu, _unit(len(KAPPAS), p, seed=p + 1, device=device)):
        assert torch.isfinite(d.log_prob(val)).all()
    for t in (d.entropy(), d.mean, d.variance):
        assert torch.isfinite(t).all()
    assert (d.variance >= 0).all()
    x = d.sample((4 if p == 32768 else 64,))
    assert torch.isfinite(x).all()
    assert ((x.norm(dim=-1) - 1).abs() <= 8 * EPS).all()
    assert torch.isfinite(d.log_prob(x)).all()
    k32 = VonMisesFisher(mu.float(), kap.float())
    x32 = k32.sample((4,))
    assert torch.isfinite(x32).all() and ((x32.norm(dim=-1) - 1).abs() <= 1e-5).all()
    assert torch.isfinite(k32.log_prob(x32)).all() and torch.isfinite(k32.entropy()).all()


# ------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("p,kappa", [(2, 1e-6), (2, 1.0), (3, 0.5), (3, 30.0), (10, 1e-2),
                                     (10, 1e3), (1000, 1.0), (1000, 1e3), (32768, 1e4),
                                     (2, 1e7), (32768, 1e7)])
def test_sample_moments(p, kappa):
    torch.manual_seed(1)
    n = 400 if p > 1000 else 4000 if p == 1000 else 40000
    mu = _unit(p, seed=3)
    d = VonMisesFisher(mu, torch.tensor(kappa, dtype=F64))
    x = d.sample((n,))
    # 1 - w from the geometry, to keep its relative precision when kappa is huge
    one_minus_w = 0.5 * (x - mu).pow(2).sum(-1)
    a = _ratio(p, kappa).item()
    se = math.sqrt(max(_dratio(p, kappa).item(), 0.0) / n)  # Var[w] = A'
    assert abs((1 - one_minus_w.mean().item()) - a) <= 5 * se + 1e-15
    if kappa >= 1e3:  # the relative check that matters when A is within 1e-7 of 1
        rel_se = one_minus_w.std().item() / math.sqrt(n) / (1 - a)
        assert abs(one_minus_w.mean().item() / (1 - a) - 1) <= 5 * rel_se
    # whole mean vector (tangent part centered) and coordinate variances
    if p <= 1000:
        var = d.variance
        assert (x.mean(0) - d.mean).abs().max() <= 5 * (var / n).sqrt().max() + 1e-15
        if p <= 10:
            assert torch.allclose(x.var(0), var, rtol=0.1, atol=1e-12)


def test_entropy_vs_monte_carlo():
    torch.manual_seed(2)
    for p, kappa in [(2, 0.3), (3, 4.0), (50, 20.0), (1000, 1e3)]:
        d = VonMisesFisher(_unit(p, seed=p), torch.tensor(kappa, dtype=F64))
        lp = d.log_prob(d.sample((20000,)))
        se = lp.std().item() / math.sqrt(lp.numel())
        assert abs(-lp.mean().item() - d.entropy().item()) <= 5 * se + 1e-12


# --------------------------------------------------------------------- rsample gradients


def _per_sample_grads(p, kappa, f, n, corrected, seed):
    """Per-sample gradient estimates of d/dkappa E[f(x)] (loc fixed)."""
    torch.manual_seed(seed)
    k = torch.full((n,), kappa, dtype=F64, requires_grad=True)
    mu = _unit(p, seed=5)
    d = VonMisesFisher(mu.expand(n, p), k)
    x, log_ratio = d.rsample_with_correction()
    fx = f(x, mu)
    surrogate = fx + fx.detach() * (log_ratio - log_ratio.detach()) if corrected else fx
    (g,) = torch.autograd.grad(surrogate.sum(), k)
    return g


@pytest.mark.parametrize("p,kappa", [(3, 1.5), (2, 0.7), (10, 8.0), (100, 300.0)])
def test_rsample_concentration_gradient_unbiased_with_correction(p, kappa):
    # f = mu.x: E = A_p(kappa), d/dkappa = A'(kappa) (closed form via the Riccati eq.)
    g = _per_sample_grads(p, kappa, lambda x, mu: x @ mu, 200000, True, seed=3)
    want = _dratio(p, kappa).item()
    se = g.std().item() / math.sqrt(g.numel())
    assert abs(g.mean().item() - want) <= 5 * se, (g.mean().item(), want, se)


def test_rsample_alone_is_the_biased_g_rep_part():
    # documented behaviour: plain rsample gives only g_rep, biased low for small p
    g = _per_sample_grads(3, 1.5, lambda x, mu: x @ mu, 50000, False, seed=8)
    want = _dratio(3, 1.5).item()
    assert 0.2 < 1 - g.mean().item() / want < 0.35


def test_rsample_concentration_gradient_vs_finite_difference_and_score_function():
    p, kappa, n = 3, 2.0, 200000
    # f = (mu.x)^2: E[w^2] = 1 - (p-1) A / kappa; reference by a central difference
    def ew2(k):
        return 1 - (p - 1) * _ratio(p, k).item() / k
    h = 1e-5
    fd = (ew2(kappa + h) - ew2(kappa - h)) / (2 * h)
    g = _per_sample_grads(p, kappa, lambda x, mu: (x @ mu) ** 2, n, True, seed=4)
    se = g.std().item() / math.sqrt(n)
    assert abs(g.mean().item() - fd) <= 5 * se + 1e-8
    # a non-polynomial f against the score-function estimate E[f(x) (w - A)]
    c = torch.tensor([0.3, -1.2, 0.8], dtype=F64)
    f = lambda x, mu: torch.exp(x @ c)  # noqa: E731
    g = _per_sample_grads(p, kappa, f, n, True, seed=5)
    torch.manual_seed(6)
    mu = _unit(p, seed=5)
    x = VonMisesFisher(mu, torch.tensor(kappa, dtype=F64)).sample((n,))
    sf = f(x, mu) * ((x @ mu) - _ratio(p, kappa))
    se = math.sqrt(g.var().item() / n + sf.var().item() / n)
    assert abs(g.mean().item() - sf.mean().item()) <= 5 * se


def test_rsample_loc_gradient():
    # mu = theta/|theta|, f = c.x: E = A c.mu, gradient A (I - mu mu^T) c / |theta|
    p, kappa = 4, 3.0
    torch.manual_seed(7)
    theta = torch.tensor([0.5, -1.0, 2.0, 0.3], dtype=F64, requires_grad=True)
    c = torch.tensor([1.0, 2.0, -0.5, 0.7], dtype=F64)
    grads = []
    for _ in range(20):
        mu = theta / theta.norm()
        x = VonMisesFisher(mu, torch.tensor(kappa, dtype=F64)).rsample((5000,))
        (g,) = torch.autograd.grad((x @ c).mean(), theta)
        grads.append(g)
    grads = torch.stack(grads)
    mu = (theta / theta.norm()).detach()
    want = _ratio(p, kappa) * (c - mu * (mu @ c)) / theta.norm().detach()
    se = grads.std(0) / math.sqrt(grads.shape[0])
    assert ((grads.mean(0) - want).abs() <= 5 * se + 1e-12).all()


def test_rsample_shapes_and_grad_flow():
    mu = _unit(2, 1, 5).requires_grad_()
    k = torch.tensor([1.0, 10.0, 100.0], dtype=F64, requires_grad=True)
    d = VonMisesFisher(mu, k)
    x, lr = d.rsample_with_correction((7,))
    assert x.shape == (7, 2, 3, 5) and lr.shape == (7, 2, 3)
    (x.sum() + lr.sum()).backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(k.grad).all()
    assert d.sample((2,)).requires_grad is False


def test_log_prob_gradcheck():
    mu = _unit(4, seed=8)
    x = _unit(6, 4, seed=9)

    def fn(theta, k):
        return VonMisesFisher(theta / theta.norm(), k, validate_args=False).log_prob(x)
    assert torch.autograd.gradcheck(fn, (mu.clone().requires_grad_(),
                                         torch.tensor(2.5, dtype=F64, requires_grad=True)))
    assert torch.autograd.gradcheck(
        lambda k: VonMisesFisher(mu, k).entropy(),
        (torch.tensor([0.1, 2.5, 40.0], dtype=F64, requires_grad=True),))


# --------------------------------------------------------------- concentration solver


def _roundtrip_grid(ps, kappas):
    P, K = torch.meshgrid(torch.tensor(ps, dtype=F64), kappas, indexing="ij")
    r = dk.bessel_iv_ratio(P / 2 - 1, K)
    return P, K, r


def _data_limit(r):
    # what rbar in float64 determines: |d kappa / kappa| = ulp(rbar) / (kappa A'),
    # and kappa A' >= ~(1 - rbar) r / 2 over the whole range, so 4 eps / (1 - rbar) bounds it
    return torch.clamp(4 * EPS / (1 - r), min=1e-12)


@pytest.mark.parametrize("iterations", [None, 4])
def test_concentration_roundtrip(iterations):
    ps = [2, 3, 4, 5, 7, 10, 33, 100, 1000, 4097, 32768]
    kappas = torch.logspace(-6, 7, 400, dtype=F64)
    P, K, r = _roundtrip_grid(ps, kappas)
    est = concentration_from_mean_resultant_length(r, P, iterations=iterations)
    rel = ((est - K) / K).abs()
    assert (rel <= _data_limit(r)).all(), rel.max()
    well = 4 * EPS / (1 - r) <= 1e-13
    assert well.float().mean() > 0.6
    assert rel[well].max() <= 1e-12


def test_concentration_random_batch_and_float32():
    g = torch.Generator().manual_seed(0)
    n = 20000
    p = torch.randint(2, 32769, (n,), generator=g).to(F64)
    k = 10 ** (torch.rand(n, generator=g, dtype=F64) * 13 - 6)
    r = dk.bessel_iv_ratio(p / 2 - 1, k)
    est = concentration_from_mean_resultant_length(r.reshape(100, 200), p.reshape(100, 200))
    assert est.shape == (100, 200) and est.dtype == F64
    assert (((est.reshape(-1) - k) / k).abs() <= _data_limit(r)).all()
    # float32 where float32 rbar determines kappa to ~1e-5
    r32 = r.float()
    est32 = concentration_from_mean_resultant_length(r32, p.float())
    assert est32.dtype == torch.float32
    ok = (1 - r) > 1e-2
    assert (((est32.double() - k) / k).abs()[ok] <= 2e-5).all()


def test_concentration_special_values_and_grad():
    r = torch.tensor([0.0, 1.0, 1.5, -0.1, float("nan")], dtype=F64)
    out = concentration_from_mean_resultant_length(r, 3)
    assert out[0] == 0 and out[1] == float("inf") and out[2:].isnan().all()
    out = concentration_from_mean_resultant_length(r, 3, iterations=4)
    assert out[0] == 0 and out[1] == float("inf") and out[2:].isnan().all()
    rr = torch.tensor([1e-3, 0.3, 0.9, 0.999], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: concentration_from_mean_resultant_length(t, 7), (rr,))
    assert concentration_from_mean_resultant_length(torch.tensor(0.5), 3).shape == ()


def test_fit_on_samples_batched_and_weighted():
    torch.manual_seed(3)
    mus = _unit(2, 3, 5, seed=11)
    kap = torch.tensor([[1.0, 20.0, 500.0], [0.1, 5.0, 1e5]], dtype=F64)
    n = 20000
    x = VonMisesFisher(mus, kap).sample((n,)).permute(1, 2, 0, 3)  # (2, 3, n, 5)
    mu_hat, k_hat = fit_von_mises_fisher(x)
    assert mu_hat.shape == (2, 3, 5) and k_hat.shape == (2, 3)
    # kappa-hat has relative sd ~ 1/sqrt(n) for kappa >> 1, larger as kappa -> 0
    big = kap >= 1
    assert ((k_hat[big] / kap[big] - 1).abs() <= 0.05).all()
    assert (k_hat[~big] < 0.5).all()
    cosang = (mu_hat * mus).sum(-1)
    assert (cosang[kap >= 5] > 0.99).all()
    # dim argument and weights: integer weights == replicated rows
    mu2, k2 = fit_von_mises_fisher(x.transpose(-2, -3), dim=-3)
    assert torch.allclose(mu2, mu_hat) and torch.allclose(k2, k_hat)
    xs = x[0, 1, :50]
    w = torch.randint(1, 4, (50,)).to(F64)
    mu_w, k_w = fit_von_mises_fisher(xs, w)
    mu_r, k_r = fit_von_mises_fisher(xs.repeat_interleave(w.long(), 0))
    assert torch.allclose(mu_w, mu_r, rtol=1e-12) and torch.allclose(k_w, k_r, rtol=1e-10)


def test_fit_is_differentiable():
    x = _unit(30, 4, seed=12) + torch.tensor([3.0, 0, 0, 0], dtype=F64)
    x = (x / x.norm(dim=-1, keepdim=True)).requires_grad_()
    mu, k = fit_von_mises_fisher(x)
    (k + mu.sum()).backward()
    assert torch.isfinite(x.grad).all()


# ------------------------------------------------------------------- errors and shapes


def test_errors_name_the_argument():
    # Value checks run with validate_args; pass it explicitly, since torch's default is
    # process-wide state (the first torch.compile in a process turns it off).
    mu = _unit(3)
    with pytest.raises(ValueError, match="loc"):
        VonMisesFisher(torch.ones(4, 1, dtype=F64), 1.0)
    with pytest.raises(ValueError, match="loc"):
        VonMisesFisher(torch.tensor(1.0, dtype=F64), 1.0)
    with pytest.raises(ValueError, match="loc"):
        VonMisesFisher(mu * 1.1, 1.0, validate_args=True)
    with pytest.raises(ValueError, match="concentration"):
        VonMisesFisher(mu, 0.0, validate_args=True)
    with pytest.raises(ValueError, match="concentration"):
        VonMisesFisher(mu, torch.tensor([1.0, -2.0], dtype=F64), validate_args=True)
    with pytest.raises(ValueError, match="concentration"):
        VonMisesFisher(_unit(4, 3), torch.ones(3, dtype=F64))
    with pytest.raises(TypeError, match="loc"):
        VonMisesFisher([1.0, 0.0], 1.0)
    d = VonMisesFisher(mu, 1.0, validate_args=True)
    with pytest.raises(ValueError, match="value"):
        d.log_prob(torch.ones(3, dtype=F64))
    # value checks are skipped on request
    VonMisesFisher(mu * 1.1, -1.0, validate_args=False)
    with pytest.raises(ValueError, match="p"):
        concentration_from_mean_resultant_length(torch.tensor([0.5]), 1)
    with pytest.raises(ValueError, match="p"):
        concentration_from_mean_resultant_length(torch.tensor([0.5]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="dim"):
        fit_von_mises_fisher(_unit(10, 3), dim=-1)
    with pytest.raises(ValueError, match="weights"):
        fit_von_mises_fisher(_unit(10, 3), torch.ones(7))


def test_batch_shapes_and_expand():
    mu = _unit(2, 1, 3)
    k = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=F64)
    d = VonMisesFisher(mu, k)
    assert d.batch_shape == (2, 4) and d.event_shape == (3,)
    x = d.sample((5,))
    assert x.shape == (5, 2, 4, 3)
    assert d.log_prob(x).shape == (5, 2, 4)
    assert d.entropy().shape == (2, 4)
    assert d.mean.shape == d.variance.shape == d.mode.shape == (2, 4, 3)
    e = d.expand((6, 2, 4))
    assert e.batch_shape == (6, 2, 4) and e.sample().shape == (6, 2, 4, 3)
    assert torch.allclose(e.log_prob(x[0]), d.log_prob(x[0]).expand(6, 2, 4))
    # float32 in, float32 out; a Python-number concentration
    d32 = VonMisesFisher(_unit(3, dtype=torch.float32), 2.0)
    assert d32.sample((2,)).dtype == torch.float32 and d32.batch_shape == ()
    assert d32.log_prob(d32.sample()).dtype == torch.float32


# ---------------------------------------------------------------------- op contract


def _log_prob(x, loc, kappa):
    return VonMisesFisher(loc, kappa, validate_args=False).log_prob(x)


def _contract_inputs(device):
    loc = _unit(3, 5, seed=20, device=device)
    kappa = torch.tensor([0.5, 20.0, 1e4], dtype=F64, device=device, requires_grad=True)
    x = _unit(4, 3, 5, seed=21, device=device).requires_grad_()
    return x, loc, kappa


def test_log_prob_contract(device):
    x, loc, kappa = _contract_inputs(device)
    # log_prob's reductions are torch ops, whose order on the GPU follows the layout.
    tol = dict(rtol=1e-14, atol=1e-14) if device == "cuda" else {}
    contract.check_noncontiguous(_log_prob, x, loc, kappa, **tol)
    contract.check_zero_size(_log_prob, x[:0], loc, kappa, shape=(0, 3))
    contract.check_poisoned_outputs(_log_prob, x, loc, kappa, outputs_allocated=False)
    contract.check_compile(_log_prob, x, loc, kappa)


@pytest.mark.parametrize("iterations", [None, 4])
def test_concentration_contract(iterations, device):
    r = torch.tensor([[1e-3, 0.3, 0.5], [0.9, 0.999, 1 - 1e-9]], dtype=F64, device=device,
                     requires_grad=True)

    def fn(r):
        return concentration_from_mean_resultant_length(r, 7, iterations=iterations)

    contract.check_noncontiguous(fn, r)
    contract.check_zero_size(fn, r[:0], shape=(0, 3))
    contract.check_poisoned_outputs(fn, r.detach(), outputs_allocated=False)
    if iterations is not None:  # a fixed iteration count has no data-dependent shapes
        contract.check_compile(fn, r)


@pytest.mark.cuda
def test_side_stream(cuda_device):
    x, loc, kappa = _contract_inputs(cuda_device)
    contract.check_side_stream(_log_prob, x, loc, kappa)
    r = dk.bessel_iv_ratio(torch.full((1000,), 4.0, dtype=F64, device=cuda_device),
                           torch.logspace(-3, 5, 1000, dtype=F64, device=cuda_device))
    contract.check_side_stream(lambda r: concentration_from_mean_resultant_length(r, 10), r)


# ------------------------------------------------- extreme concentrations (issue 9 #1)

_HANG_SCRIPT = r"""
import math, torch
from diffkern.distributions import VonMisesFisher as V
e = lambda p, dt: torch.eye(p, dtype=dt)[0]
f64, f32 = torch.float64, torch.float32
cases = [(3, f32, 1e19, True), (3, f32, 3e38, True), (3, f64, 1e154, True),
         (2, f64, 1e300, True), (5, f64, torch.finfo(f64).max, True), (3, f64, math.inf, True),
         (1000, f32, 1e30, True), (3, f64, math.nan, False), (3, f64, -2.0, False),
         (2, f64, 0.0, False)]
for p, dt, k, va in cases:
    x = V(e(p, dt), torch.tensor(k, dtype=dt), validate_args=va).sample((3,))
    print(p, dt, k, bool(torch.isfinite(x).all()), flush=True)
# one bad element in a batch: its own row NaN, the others untouched
k = torch.tensor([1.0, math.nan, 1e300, math.inf], dtype=f64)
x = V(torch.eye(3, dtype=f64)[0].expand(4, 3), k, validate_args=False).sample((5,))
print("batch", torch.isfinite(x).all(-1).all(0).tolist(), flush=True)
"""


def test_sampler_never_hangs_on_extreme_concentration():
    # In a subprocess with a deadline: a regression shows as a failure, not a hung suite.
    import subprocess
    import sys

    try:
        out = subprocess.run([sys.executable, "-c", _HANG_SCRIPT], capture_output=True,
                             text=True, timeout=120)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"VonMisesFisher.sample hung; finished lines:\n{e.stdout}")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    finite = [ln.rsplit(" ", 1)[1] for ln in lines[:-1]]
    assert finite == ["True"] * 7 + ["False", "False", "True"], out.stdout
    assert lines[-1] == "batch [True, False, True, True]"


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("p", [2, 3, 5, 50])
def test_sampler_moments_across_regimes(p, dtype):
    """kappa (1 - w) has mean kappa (1 - A_p) and variance kappa^2 A_p' on both sides of
    the huge-kappa switch (Wood below, Gamma(a)/kappa above) and far beyond it. loc is a
    coordinate axis, so tangent components far below eps stay measurable."""
    from diffkern.distributions import _dratio, _huge_kappa_threshold, _kappa_one_minus_ratio

    torch.manual_seed(p)
    th = _huge_kappa_threshold(p, dtype)
    n = 20000
    for k in (0.5 * th, 2 * th, 1e6, 0.01 * torch.finfo(dtype).max):
        mu = torch.zeros(p, dtype=dtype)
        mu[-1] = 1
        x = VonMisesFisher(mu, torch.tensor(k, dtype=dtype)).sample((n,)).double()
        assert ((x.norm(dim=-1) - 1).abs() <= 4 * torch.finfo(dtype).eps).all()
        s = 0.5 * ((x - mu.double()) ** 2).sum(-1) * k   # kappa (1 - w), no cancellation
        kt = torch.tensor(k, dtype=F64)
        mean = _kappa_one_minus_ratio(p, kt).item()
        var = _dratio(p, kt).item() * k * k if k < 1e100 else (p - 1) / 2
        assert abs(s.mean().item() - mean) <= 5 * math.sqrt(var / n), (k, s.mean(), mean)
        assert abs(s.var().item() / var - 1) < 0.1, (k, s.var(), var)


def test_infinite_concentration_is_the_point_mass():
    mu = _unit(2, 4, seed=3)
    d = VonMisesFisher(mu, torch.tensor([math.inf, 2.0], dtype=F64), validate_args=True)
    x = d.sample((6,))
    assert torch.equal(x[:, 0], mu[0].expand(6, 4)) and torch.isfinite(x).all()
    lp = d.log_prob(torch.stack([mu[0], mu[1]]))
    assert lp[0] == math.inf and torch.isfinite(lp[1])
    assert d.log_prob(mu[1].expand(2, 4))[0] == -math.inf
    assert d.entropy()[0] == -math.inf and torch.isfinite(d.entropy()[1])
    assert torch.equal(d.mean[0], mu[0]) and (d.variance[0] == 0).all()


def test_nan_and_zero_concentration():
    mu = _unit(3, seed=4)
    with pytest.raises(ValueError, match="concentration"):
        VonMisesFisher(mu, math.nan, validate_args=True)
    d = VonMisesFisher(mu.expand(3, 3), torch.tensor([math.nan, -1.0, 3.0], dtype=F64),
                       validate_args=False)
    x = d.sample((4,))
    assert torch.isnan(x[:, :2]).all() and torch.isfinite(x[:, 2]).all()
    assert torch.isnan(d.log_prob(mu)[:2]).all() and torch.isfinite(d.log_prob(mu)[2])
    # kappa = 0 (unvalidated) is the uniform distribution: the limits, not NaN
    for p in (2, 3, 7):
        u = VonMisesFisher(_unit(p, seed=p), 0.0, validate_args=False)
        log_area = math.log(2) + (p / 2) * math.log(math.pi) - math.lgamma(p / 2)
        assert abs(u.log_prob(_unit(p, seed=9)).item() + log_area) < 1e-14
        assert abs(u.entropy().item() - log_area) < 1e-14
        assert torch.allclose(u.variance, torch.full((p,), 1 / p, dtype=F64), rtol=1e-15)
        x = u.sample((20000,))
        assert (x.mean(0).abs() <= 5 * math.sqrt(1 / p / 20000)).all()


def _entropy_mp(p, k):
    """Entropy and A' from mpmath with the working precision raised for the size of k."""
    with mp.workdps(60 + 2 * int(math.log10(max(k, 10)))):
        nu, K = mp.mpf(p) / 2 - 1, mp.mpf(k)
        i0, i1 = mp.besseli(nu, K), mp.besseli(nu + 1, K)
        a = i1 / i0
        log_c = nu * mp.log(K) - mp.mpf(p) / 2 * mp.log(2 * mp.pi) - mp.log(i0)
        return float(-log_c - K * a), float(1 - a * a - (p - 1) * a / K)


@pytest.mark.parametrize("p", [2, 3, 10, 200])
def test_entropy_and_variance_at_large_concentration_vs_mpmath(p):
    # 1 - A_p computed directly loses log10(2 kappa/(p-1)) digits; the series keeps them.
    for k in (60.0 * p, 1e4 * p, 1e9, 1e14):
        d = VonMisesFisher(_unit(p, seed=1), torch.tensor(k, dtype=F64))
        h, dadk = _entropy_mp(p, k)
        assert abs(d.entropy().item() - h) <= 1e-13 * max(1, abs(h)), (k, d.entropy(), h)
        e1 = torch.zeros(p, dtype=F64)
        e1[0] = 1
        var_w = VonMisesFisher(e1, torch.tensor(k, dtype=F64)).variance[0].item()
        assert abs(var_w - dadk) <= 1e-9 * dadk, (k, var_w, dadk)


def test_huge_concentration_regime_gradients():
    mu = _unit(3, seed=2).requires_grad_()
    k = torch.tensor([5.0, 1e20], dtype=F64, requires_grad=True)
    x, lr = VonMisesFisher(mu, k).rsample_with_correction((16,))
    (gk,) = torch.autograd.grad(lr.sum(), k, retain_graph=True)
    assert torch.isfinite(gk).all() and gk[1] == 0  # exact reparameterization there
    gm, gk2 = torch.autograd.grad((x @ torch.tensor([1.0, 2, 3], dtype=F64)).sum(), (mu, k))
    assert torch.isfinite(gm).all() and torch.isfinite(gk2).all()


def test_rejection_loop_is_capped(monkeypatch):
    import diffkern.distributions as dist

    monkeypatch.setattr(dist, "_MAX_ROUNDS", 0)
    with pytest.raises(RuntimeError, match="VonMisesFisher.sample"):
        VonMisesFisher(_unit(3), 1.0).sample()
    VonMisesFisher(_unit(3), math.inf).sample()  # no Wood element: nothing to cap


def test_wood_acceptance_is_finite_and_above_half():
    from diffkern.distributions import _huge_kappa_threshold, _wood_constants

    torch.manual_seed(0)
    for dtype in (torch.float32, F64):
        for p in (2, 3, 30, 10 ** 6):
            th = _huge_kappa_threshold(p, dtype)
            for k in (0.0, 1e-30, 1e-3, 1.0, 1e3, 0.9 * th):
                kk = torch.full((4000,), k, dtype=dtype)
                b, omb, x0, omx0 = _wood_constants(kk, p)
                assert all(torch.isfinite(t).all() for t in (b, omb, x0, omx0))
                g = torch._standard_gamma(torch.full((8000,), (p - 1) / 2, dtype=dtype))
                z, oz = g[:4000] / (g[:4000] + g[4000:]), g[4000:] / (g[:4000] + g[4000:])
                omw = 2 * b * z / (oz + b * z)
                y = kk * (omw - omx0) / (p - 1)
                t = (p - 1) * (torch.log1p(y) - y)
                # log acceptance <= 0 up to rounding
                assert torch.isfinite(t).all() and (t <= 1e-5).all()
                assert t.exp().mean() > 0.6, (dtype, p, k)


def test_meta_device_and_half_precision():
    with pytest.raises(ValueError, match="VonMisesFisher: loc: .*meta"):
        VonMisesFisher(torch.tensor([1.0, 0, 0], device="meta"), 2.0)
    with pytest.raises(ValueError, match="VonMisesFisher: concentration: .*meta"):
        VonMisesFisher(torch.tensor([1.0, 0, 0]), torch.tensor(2.0, device="meta"))
    with pytest.raises(ValueError, match="fit_von_mises_fisher: x: .*meta"):
        fit_von_mises_fisher(torch.ones(5, 3, device="meta"))
    x = _unit(2, 400, 3, seed=5)
    mu64, k64 = fit_von_mises_fisher(x)
    for dt in (torch.float16, torch.bfloat16):
        mu, k = fit_von_mises_fisher(x.to(dt))
        assert mu.dtype == k.dtype == dt
        assert torch.allclose(k.double(), k64, rtol=0.05)
        d = VonMisesFisher(mu, k)
        s = d.sample((3,))
        assert s.dtype == dt and torch.isfinite(s).all()
        for t in (d.log_prob(s), d.entropy(), d.mean, d.variance):
            assert t.dtype == dt and torch.isfinite(t).all()
    # more half rows than float16 can count: the sums run in float32
    big = _unit(70000, 3, seed=6).to(torch.float16)
    assert torch.isfinite(fit_von_mises_fisher(big)[1])


def test_subnormal_concentration_and_identical_rows():
    # nu log(k/2) would take log(0) at k = 5e-324 (k/2 rounds to 0): NaN for p = 2
    for p in (2, 3, 10):
        d = VonMisesFisher(_unit(p, seed=p), torch.tensor(5e-324, dtype=F64))
        log_area = math.log(2) + (p / 2) * math.log(math.pi) - math.lgamma(p / 2)
        assert abs(d.log_prob(_unit(p, seed=1)).item() + log_area) < 1e-13
        assert abs(d.entropy().item() - log_area) < 1e-13
    # identical rows: rbar is 1 up to the rows' rounding (a bit above gave NaN before):
    # kappa = inf, or as large as the rows' precision can tell
    for dt in (torch.float16, torch.float32, F64):
        row = _unit(7, seed=3).to(dt)
        mu, k = fit_value = fit_von_mises_fisher(row.expand(50, 7))
        assert k.item() >= 0.1 / torch.finfo(dt).eps and torch.isfinite(mu).all(), fit_value
    # clearly non-unit rows are still invalid input: NaN, not a silent inf
    assert torch.isnan(fit_von_mises_fisher((1.1 * _unit(3, seed=4)).expand(5, 3))[1])
