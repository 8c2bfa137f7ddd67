"""Property tests (Hypothesis) over dk.zo.grad's and dk.fd.jacobian's input space: shapes
(empty, scalar, odd sizes), storage dtypes, non-contiguous views, estimators and
distributions, the list and the module path.

The contract checked: after any call every parameter holds its exact bits (NaN payloads
and signed zeros included); estimates come back shaped like the parameters and finite for
a finite loss; CGE on a quadratic is its exact gradient up to the step rounding; the batched
path gives the sequential path's estimate; the Jacobian matches autograd. Bounded "ci"
profile by default (tests/conftest.py), "long" with HYPOTHESIS_PROFILE=long.
"""
from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

import diffkern as dk  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64,
         torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _bits(t):
    return t.detach().contiguous().view(_BITS[t.dtype]).clone()


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=3)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    t = torch.randn(shape, generator=gen, dtype=torch.float64)
    # Extreme but finite stored values: zeros of both signs, tiny and large entries.
    if t.numel():
        flat = t.view(-1)
        picks = draw(st.lists(st.integers(0, t.numel() - 1), max_size=3))
        for i, v in zip(picks, (-0.0, 1e-30, 3e3)):
            flat[i] = v
    t = t.to(dtype)
    if t.dim() == 2 and draw(st.booleans()):
        t = t.t()  # a non-contiguous view
    return t


def _loss(params, weights):
    # A smooth loss reading every parameter (fp64 accumulation).
    return sum(((p.double() - w) ** 2).sum() * 0.5 for p, w in zip(params, weights))


@given(st.lists(tensors(), min_size=1, max_size=4),
       st.sampled_from(["spsa", "rge", "cge"]),
       st.sampled_from(["gaussian", "rademacher", "sphere"]),
       st.sampled_from([1e-3, 1e-2, 0.25]),
       st.integers(1, 3), st.integers(0, 2**63 - 1))
def test_grad_restores_bits_and_returns_finite_estimates(params, estimator, distribution,
                                                         eps, n, seed):
    weights = [torch.full(p.shape, 0.3, dtype=torch.float64) for p in params]
    before = [_bits(p) for p in params]
    kwargs = dict(estimator=estimator, eps=eps, seed=seed)
    if estimator != "cge":
        kwargs.update(num_directions=n, distribution=distribution)
    if distribution == "sphere" and estimator != "cge" and not sum(p.numel() for p in params):
        with pytest.raises(ValueError, match="sphere"):  # no sphere in zero dimensions
            dk.zo.grad(lambda: _loss(params, weights), params, **kwargs)
        return
    est = dk.zo.grad(lambda: _loss(params, weights), params, **kwargs)
    for p, b in zip(params, before):
        assert torch.equal(_bits(p), b)
    assert len(est.grads) == len(params)
    for g, p in zip(est.grads, params):
        assert g.shape == p.shape
        assert bool(torch.isfinite(g).all())


@given(st.lists(tensors(), min_size=1, max_size=3), st.integers(0, 2**31 - 1))
def test_cge_on_a_quadratic_is_the_gradient(params, seed):
    params = [p for p in params if p.numel()] or [torch.ones(3)]
    weights = [torch.full(p.shape, 0.3, dtype=torch.float64) for p in params]
    est = dk.zo.grad(lambda: _loss(params, weights), params, estimator="cge", eps=1e-2,
                     seed=seed)
    # The float64 rounding of the losses (a few ulps of L) over a step of eps = 1e-2.
    loss_noise = 4 * 2.2e-16 * float(_loss(params, weights)) / 1e-2
    for g, p, w in zip(est.grads, params, weights):
        exact = p.double() - w  # d/dp of 0.5 (p - w)^2
        # Central differences are exact for a quadratic, but in low precision the two steps
        # round to different sizes h1, h2 (CGE divides by h1 + h2): the estimate is the
        # gradient at p + (h1 - h2) / 2, at most half an ulp of p away; plus the float32
        # estimate's own rounding.
        ulp = torch.finfo(p.dtype).eps * p.double().abs().clamp(min=1.0)
        tol = ulp + 1e-6 * exact.abs() + loss_noise + 1e-9
        assert bool(((g.double() - exact).abs() <= tol).all()), \
            (p.dtype, g, exact)


@given(st.lists(st.integers(1, 6), min_size=1, max_size=3), st.sampled_from(DTYPES[:3]),
       st.sampled_from(["spsa", "rge"]), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_module_path_restores_bits_and_matches_the_batched_path(widths, dtype, estimator, n,
                                                                seed):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip([4] + widths, widths + [1]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers).to(dtype)
    x = torch.randn(5, 4).to(dtype)
    before = [_bits(p) for p in model.parameters()]
    loss = lambda: model(x).double().square().sum()  # noqa: E731
    seq = dk.zo.grad(loss, model, estimator=estimator, num_directions=n, seed=seed)
    bat = dk.zo.grad(loss, model, estimator=estimator, num_directions=n, seed=seed,
                     batch_size=2 * n)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(_bits(p), b)
    # The same points (bit-identical perturbed weights); a batched matmul may sum in
    # another order, so the losses (and the estimates built from them) agree to rounding.
    # (In bf16/fp16 the forward itself rounds at ~eps of the dtype.)
    tol = 8 * torch.finfo(dtype).eps
    for a, b in zip(seq.losses, bat.losses):
        assert abs(float(a) - float(b)) <= tol * max(1.0, abs(float(a))), (dtype, a, b)


@given(st.integers(1, 40), st.integers(1, 7), st.integers(0, 2**31 - 1),
       st.sampled_from([torch.float64, torch.float32]))
def test_jacobian_matches_autograd(n, m, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=gen, dtype=torch.float64).to(dtype)
    x = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)

    def f(xb):  # batched: (B, n) -> (B, m)
        return torch.sin(xb) @ A.t() + 0.5 * xb[..., :1] ** 2

    J = dk.fd.jacobian(f, x)
    want = torch.autograd.functional.jacobian(lambda y: f(y[None])[0], x.double().clone()
                                              if dtype == torch.float64 else x.clone())
    tol = 1e-7 if dtype == torch.float64 else 2e-2
    assert J.shape == (m, n)
    assert torch.allclose(J.double(), want.double(), rtol=tol, atol=tol)
