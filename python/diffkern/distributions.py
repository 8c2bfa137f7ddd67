r"""The von Mises-Fisher distribution on the unit sphere, on top of the log-Bessel ops.

For a mean direction :math:`\mu` (unit vector in :math:`\mathbb{R}^p`, ``p >= 2``) and a
concentration :math:`\kappa > 0`, the density with respect to the surface measure of
:math:`S^{p-1}` is

.. math::  f(x) = C_p(\kappa)\, e^{\kappa \mu^\top x},\qquad
           \log C_p(\kappa) = \nu \log\kappa - \tfrac p2 \log 2\pi - \log I_\nu(\kappa),
           \quad \nu = p/2 - 1.

Everything is computed through :func:`diffkern.log_ive` (``log I_nu(k) - k``) and
:func:`diffkern.bessel_iv_ratio` (``A_p(k) = I_{p/2}(k) / I_{p/2-1}(k)``, the mean
resultant length), so nothing overflows for ``p`` up to 32768 and beyond and ``kappa``
from 1e-6 to 1e7 and beyond.

Domain: ``kappa`` in ``(0, inf]`` (what ``validate_args`` accepts). ``kappa = inf`` is the
limit of the family, the point mass at ``loc``: samples equal ``loc`` (renormalized to
unit length, as every sample is), ``log_prob`` is
``+inf`` at ``loc`` and ``-inf`` elsewhere, the entropy ``-inf``, the variance 0. With
``validate_args=False``, ``kappa = 0`` is the other limit, the uniform distribution on the
sphere, and a NaN or negative ``kappa`` gives NaN for its own elements (samples,
densities) and leaves the others alone.
Tensors must hold data on the CPU or a CUDA GPU (meta tensors are refused with a
``ValueError``); float16/bfloat16 parameters are computed in float32 and returned in
their own dtype, as the log-Bessel ops do.

Contents:

* :class:`VonMisesFisher` -- a ``torch.distributions.Distribution`` (``log_prob``,
  ``sample``, ``rsample``, ``rsample_with_correction``, ``entropy``, ``mean``, ``mode``,
  ``variance``).
* :func:`fit_von_mises_fisher` -- maximum-likelihood (mean direction, concentration),
  batched over independent fits.
* :func:`concentration_from_mean_resultant_length` -- the batched solver of
  ``A_p(kappa) = rbar`` underneath the fit.
"""
from __future__ import annotations

import functools
import math
import warnings
from numbers import Number
from typing import Optional, Tuple, Union

import torch
from torch.distributions import Distribution, constraints

from .special import bessel_iv_ratio, log_ive

__all__ = [
    "VonMisesFisher",
    "fit_von_mises_fisher",
    "concentration_from_mean_resultant_length",
    "sphere",
]

_LOG_2PI = math.log(2 * math.pi)
_HALF_LOG_PI = 0.5 * math.log(math.pi)


# ------------------------------------------------------------------- the constraint


class _Sphere(constraints.Constraint):
    """Unit vectors along the last dimension: ``| ||x|| - 1 | <= sqrt(eps(dtype))``.

    The tolerance (1.5e-8 for float64, 3.5e-4 for float32) accepts vectors normalized in
    the same precision and rejects anything that was not meant to be normalized.
    """

    is_discrete = False
    event_dim = 1

    def check(self, value: torch.Tensor) -> torch.Tensor:
        tol = math.sqrt(torch.finfo(value.dtype).eps) if value.is_floating_point() else 0.0
        return (torch.linalg.vector_norm(value, dim=-1) - 1).abs() <= tol

    def __repr__(self) -> str:
        return "Sphere(unit vectors along the last dimension, | ||x|| - 1 | <= sqrt(eps))"


sphere = _Sphere()


# -------------------------------------------------------------------- the distribution


class VonMisesFisher(Distribution):
    r"""von Mises-Fisher distribution on the unit sphere :math:`S^{p-1} \subset \mathbb{R}^p`.

    Density :math:`C_p(\kappa) \exp(\kappa \mu^\top x)` with
    :math:`\log C_p = (p/2-1)\log\kappa - (p/2)\log 2\pi - \log I_{p/2-1}(\kappa)`.

    Args:
        loc: mean direction :math:`\mu`, shape ``(..., p)`` with ``p >= 2``, unit norm along
            the last dimension (checked when ``validate_args``). float32 or float64
            (float16/bfloat16: computed in float32, results in their dtype).
        concentration: :math:`\kappa \in (0, \infty]`, shape broadcastable with
            ``loc.shape[:-1]`` (checked when ``validate_args``; inf is the point-mass
            limit, and 0 the uniform one when not validating: see the module
            docstring). A Python number is allowed.
        validate_args: as in ``torch.distributions`` (default: on unless Python runs with
            ``-O``; note that the first ``torch.compile`` in a process turns torch's
            default off for every distribution, so pass ``True`` to be sure). Structural checks (``p >= 2``, shapes, dtypes, devices) always run;
            value checks (unit norm, ``kappa > 0``, samples on the sphere) only when on.

    ``batch_shape = broadcast(loc.shape[:-1], concentration.shape)``,
    ``event_shape = (p,)``. Works on CPU and CUDA (other devices, meta included, raise
    ``ValueError``); float32 and float64 natively.

    Gradients: ``log_prob``, ``entropy``, ``mean``, ``variance`` are differentiable in
    ``loc`` and ``concentration`` (the latter through the log-Bessel ops). For ``rsample``
    see its docstring: the sample is an exact reparameterization in ``loc`` and a
    reparameterized rejection sampler in ``concentration``.
    """

    arg_constraints = {"loc": sphere, "concentration": constraints.positive}
    support = sphere
    has_rsample = True

    def __init__(self, loc: torch.Tensor, concentration: Union[torch.Tensor, float],
                 validate_args: Optional[bool] = None):
        if not isinstance(loc, torch.Tensor):
            raise TypeError(f"VonMisesFisher: loc: expected a torch.Tensor of shape (..., p), "
                            f"got {type(loc).__name__}")
        if loc.dim() < 1:
            raise ValueError("VonMisesFisher: loc: expected shape (..., p) with p >= 2, got a "
                             "0-dim tensor")
        p = loc.shape[-1]
        if p < 2:
            raise ValueError(f"VonMisesFisher: loc: expected the last dimension p >= 2 (the "
                             f"sphere S^(p-1) in R^p), got p = {p} (shape {tuple(loc.shape)})")
        _check_device("VonMisesFisher", "loc", loc)
        if not loc.is_floating_point() or loc.dtype.itemsize == 1:
            raise TypeError(f"VonMisesFisher: loc: expected float16, bfloat16, float32 or "
                            f"float64, got {loc.dtype}")
        if isinstance(concentration, Number) and not isinstance(concentration, bool):
            concentration = torch.tensor(float(concentration), dtype=loc.dtype,
                                         device=loc.device)
        if not isinstance(concentration, torch.Tensor):
            raise TypeError(f"VonMisesFisher: concentration: expected a torch.Tensor or a real "
                            f"number, got {type(concentration).__name__}")
        if concentration.is_complex() or concentration.dtype is torch.bool or (
                concentration.is_floating_point() and concentration.dtype.itemsize == 1):
            raise TypeError(f"VonMisesFisher: concentration: expected a real floating or integer "
                            f"tensor, got dtype {concentration.dtype}")
        if not concentration.is_floating_point():
            concentration = concentration.to(loc.dtype)
        _check_device("VonMisesFisher", "concentration", concentration)
        if concentration.device != loc.device:
            raise ValueError(f"VonMisesFisher: loc and concentration must be on one device, got "
                             f"loc on {loc.device} and concentration on {concentration.device}")
        try:
            batch_shape = torch.broadcast_shapes(loc.shape[:-1], concentration.shape)
        except RuntimeError:
            raise ValueError(
                f"VonMisesFisher: the batch shape of loc, {tuple(loc.shape[:-1])} (loc has shape "
                f"{tuple(loc.shape)} = batch + (p,)), does not broadcast with concentration's "
                f"shape {tuple(concentration.shape)}") from None
        dtype = torch.promote_types(loc.dtype, concentration.dtype)
        self.loc = loc.to(dtype).expand(batch_shape + (p,))
        self.concentration = concentration.to(dtype).expand(batch_shape)
        self._p = p
        self._cdtype = _compute_dtype(dtype)
        super().__init__(batch_shape, torch.Size((p,)), validate_args=validate_args)

    # ---- torch.distributions plumbing

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(VonMisesFisher, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + (self._p,))
        new.concentration = self.concentration.expand(batch_shape)
        new._p = self._p
        new._cdtype = self._cdtype
        super(VonMisesFisher, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def _nu(self) -> float:
        return self._p / 2 - 1

    def _params(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(loc, concentration) in the compute dtype (float32 for float16/bfloat16)."""
        return self.loc.to(self._cdtype), self.concentration.to(self._cdtype)

    # ---- moments

    @property
    def mean(self) -> torch.Tensor:
        r""":math:`E[x] = A_p(\kappa)\,\mu`, shape ``batch + (p,)``."""
        mu, k = self._params()
        return (bessel_iv_ratio(self._nu, k).unsqueeze(-1) * mu).to(self.loc.dtype)

    @property
    def mode(self) -> torch.Tensor:
        r""":math:`\mu`, shape ``batch + (p,)``."""
        return self.loc

    @property
    def variance(self) -> torch.Tensor:
        r"""Per-coordinate variance, the diagonal of the covariance, shape ``batch + (p,)``.

        :math:`\mathrm{Cov}[x] = \frac{A}{\kappa} I + (A' - \frac{A}{\kappa})\mu\mu^\top`, so
        :math:`\mathrm{Var}[x_i] = \frac{A}{\kappa}(1-\mu_i^2) + A'\mu_i^2` with
        :math:`A' = 1 - A^2 - (p-1)A/\kappa` (the variance of :math:`\mu^\top x`).
        Limits: :math:`1/p` at :math:`\kappa = 0`, 0 at :math:`\kappa = \infty`.
        """
        mu, k = self._params()
        p = self._p
        zero = k == 0
        ks = torch.where(zero, torch.ones_like(k), k)
        a_over_k = torch.where(zero, torch.full_like(k, 1 / p), bessel_iv_ratio(self._nu, ks) / ks)
        dadk = torch.where(zero, torch.full_like(k, 1 / p), _dratio(p, ks))
        mu2 = mu * mu
        out = a_over_k.unsqueeze(-1) * (1 - mu2) + dadk.unsqueeze(-1) * mu2
        return out.to(self.loc.dtype)

    # ---- densities

    def _log_normalizer_minus_kappa(self, k: torch.Tensor) -> torch.Tensor:
        # log C_p(k) + k = nu log k - (p/2) log 2pi - log_ive(nu, k)
        nu = self._nu
        return _log_prefactor(nu, k) + nu * math.log(2) - (self._p / 2) * _LOG_2PI

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        r"""Log density, shape ``broadcast(value.shape[:-1], batch_shape)``.

        :math:`\log C_p(\kappa) + \kappa(\mu^\top x - 1) + \kappa`, with
        :math:`\mu^\top x - 1 = -\tfrac12\lVert x - \mu\rVert^2` for unit vectors (no
        cancellation when x is close to mu and kappa is huge). At ``kappa = inf``:
        ``+inf`` where ``value == loc`` exactly, ``-inf`` elsewhere.
        """
        if self._validate_args:
            self._validate_sample(value)
        mu, k = self._params()
        dist2 = (value.to(self._cdtype) - mu).pow(2).sum(-1)
        point = k == math.inf
        ks = torch.where(point, torch.zeros_like(k), k)
        out = self._log_normalizer_minus_kappa(ks) - 0.5 * ks * dist2
        out = torch.where(point, torch.where(dist2 == 0, math.inf, -math.inf), out)
        return out.to(torch.promote_types(self.loc.dtype, value.dtype)
                      if value.is_floating_point() else self.loc.dtype)

    def entropy(self) -> torch.Tensor:
        r""":math:`-\log C_p(\kappa) - \kappa A_p(\kappa)`, shape ``batch_shape``
        (``-inf`` at ``kappa = inf``). :math:`\kappa(1 - A_p)` comes from its large-kappa
        series where ``1 - A_p`` would lose digits."""
        _, k = self._params()
        out = _kappa_one_minus_ratio(self._p, k) - self._log_normalizer_minus_kappa(k)
        return torch.where(k == math.inf, -math.inf, out).to(self.loc.dtype)

    # ---- sampling

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Samples of shape ``sample_shape + batch_shape + (p,)``, no gradient."""
        with torch.no_grad():
            return self.rsample(sample_shape)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        r"""Reparameterized samples, shape ``sample_shape + batch_shape + (p,)``.

        Algorithm (Wood 1994): the component :math:`w = \mu^\top x` comes from a rejection
        sampler with a transformed Beta((p-1)/2, (p-1)/2) proposal
        :math:`w = h(z, \kappa) = \frac{1-(1+b)z}{1-(1-b)z}`,
        :math:`b = \frac{p-1}{2\kappa + \sqrt{4\kappa^2+(p-1)^2}}`; the tangent part is
        uniform on the sphere orthogonal to :math:`\mu` (a standard normal vector projected
        off :math:`\mu` and normalized), :math:`x = w\mu + \sqrt{1-w^2}\,t`, so components
        of size below eps (huge kappa) keep their relative precision. Every round of the rejection loop accepts with probability above
        1/2 for every (p, kappa); the loop is capped at 200 rounds (reaching the cap,
        probability below 2^-200 per element, raises ``RuntimeError``).

        Huge kappa (above ``max(|a-1|(a+1)/eps, 40(a+1))``, ``a = (p-1)/2``; e.g. 3.4e15
        for p = 2 and 80 for p = 3 in float64): :math:`1 - w = g/\kappa` with
        :math:`g \sim \mathrm{Gamma}(a, 1)`, the large-kappa law of :math:`1 - w`, whose
        density differs from the exact one by a factor :math:`(1-(1-w)/2)^{a-1}` that is
        within rounding of 1 there; no rejection, no overflow, ``kappa = inf`` gives
        ``loc``. This part is an exact reparameterization in kappa too.

        Gradient estimator: the accepted Beta draw ``z`` and the tangent direction are the
        noise; gradients flow through ``h(z, kappa)`` and through the reflection. In ``loc``
        this is an exact (unbiased) reparameterization. In ``concentration`` it is only the
        reparameterization part :math:`g_{rep} = E[\nabla_\kappa f(h(z,\kappa))]` of the
        reparameterized-rejection estimator (Naesseth et al., 2017; used for vMF by
        Davidson et al., 2018). The full, unbiased gradient adds the correction
        :math:`g_{cor} = E[f(x)\,\nabla_\kappa \log(q(h(z,\kappa);\kappa)/r(h(z,\kappa);\kappa))]`
        (q: the density of w, r: the proposal density). Without it the kappa-gradient is
        biased, strongly for small p and kappa of order 1 (measured for f = mu.x: -28 % at
        p = 3, kappa = 1.5; -35 % at p = 2, kappa = 0.7; -8 % at p = 10, kappa = 8; below
        1 % at p = 100, kappa = 300). Use :meth:`rsample_with_correction` for the unbiased
        estimator.
        """
        if self.concentration.requires_grad and torch.is_grad_enabled():
            warnings.warn(
                "VonMisesFisher.rsample: the gradient in `concentration` is the pathwise "
                "part of the reparameterized rejection sampler only and is biased for small "
                "p * kappa (e.g. -28% at p = 3, kappa = 1.5); use rsample_with_correction() "
                "for the unbiased estimator. Gradients in `loc` are exact.",
                stacklevel=2)
        x, _ = self._rsample(sample_shape, want_log_ratio=False)
        return x

    def rsample_with_correction(self, sample_shape=torch.Size()
                                ) -> Tuple[torch.Tensor, torch.Tensor]:
        r"""Samples plus the log-ratio that makes the concentration gradient unbiased.

        Returns ``(x, log_ratio)``: ``x`` as :meth:`rsample`, shape
        ``sample_shape + batch_shape + (p,)``; ``log_ratio`` of shape
        ``sample_shape + batch_shape`` is
        :math:`L(\kappa) = \log q(h(z,\kappa);\kappa) + \log |\partial h/\partial z|`
        (:math:`= \log(q/r)` up to the Beta density of z, which does not depend on kappa),
        differentiable in ``concentration``. For a per-sample objective ``f = f(x)``, the
        surrogate ``f + f.detach() * (log_ratio - log_ratio.detach())`` has the value of
        ``f`` and, in expectation, the exact gradient :math:`g_{rep} + g_{cor}` of
        :math:`E[f(x)]` (Naesseth et al., 2017). In the huge-kappa regime (see
        :meth:`rsample`) the reparameterization is exact, and ``log_ratio`` is the
        Gamma(a, 1) log density of the noise, constant in kappa.
        """
        return self._rsample(sample_shape, want_log_ratio=True)

    def _rsample(self, sample_shape, want_log_ratio: bool):
        shape = self._extended_shape(sample_shape)  # sample + batch + (p,)
        p = self._p
        mu, kappa = self._params()
        kappa = kappa.expand(shape[:-1])
        z, omz, g, huge, bad = _sampler_noise(kappa.detach(), p)
        one = torch.ones_like(kappa)
        # Each regime on its own safe copy of kappa: where() would otherwise route the
        # other regime's inf/NaN derivatives into the gradient.
        k_w = torch.where(huge | bad, one, kappa)
        k_g = torch.where(huge, kappa, one)
        b = _wood_b(k_w, p)
        bz = b * z
        den = omz + bz                       # 1 - (1 - b) z
        omw_g = (g / k_g).clamp_max(2)       # Gamma(a)/kappa: the huge-kappa law of 1 - w
        omw = torch.where(huge, omw_g, 2 * bz / den)   # 1 - w, exact even when w -> 1
        opw = torch.where(huge, 2 - omw_g, 2 * omz / den)  # 1 + w
        w = torch.where(omw <= 1, 1 - omw, opw - 1)
        rho = torch.sqrt(omw * opw)          # sqrt(1 - w^2)

        # x = w mu + rho t with t uniform on the unit sphere orthogonal to mu (a Gaussian
        # projected off mu, twice, so t.mu is at rounding level even when v is nearly
        # parallel to mu). Unlike a reflection of (w, rho v), this keeps the tangent
        # components to full relative precision when rho is below eps (huge kappa).
        mu = mu / torch.linalg.vector_norm(mu, dim=-1, keepdim=True)
        v = torch.randn(shape, dtype=mu.dtype, device=mu.device)
        t = v - (v * mu).sum(-1, keepdim=True) * mu
        t = t - (t * mu).sum(-1, keepdim=True) * mu  # twice is enough (Kahan/Parlett)
        t = t / torch.linalg.vector_norm(t, dim=-1, keepdim=True).clamp_min(
            torch.finfo(t.dtype).tiny)
        x = w.unsqueeze(-1) * mu + rho.unsqueeze(-1) * t
        x = torch.where(bad.unsqueeze(-1), math.nan, x).to(self.loc.dtype)

        log_ratio = None
        if want_log_ratio:
            nu = self._nu
            k = k_w
            log_q = (-k * omw + (nu - 0.5) * torch.log(omw * opw) + _log_prefactor(nu, k)
                     - _HALF_LOG_PI - math.lgamma(nu + 0.5))
            log_dh = torch.log(2 * b) - 2 * torch.log(den)
            a = (p - 1) / 2
            log_gamma = (a - 1) * torch.log(g) - g - math.lgamma(a)
            # log q(h) - log r(h) + const, r(h) = s(z)/|dh/dz|
            log_ratio = torch.where(huge, log_gamma, log_q + log_dh)
            log_ratio = torch.where(bad, math.nan, log_ratio).to(self.loc.dtype)
        return x, log_ratio

    def __repr__(self) -> str:
        return (f"VonMisesFisher(p: {self._p}, batch_shape: {tuple(self.batch_shape)}, "
                f"dtype: {self.loc.dtype})")


# ------------------------------------------------------------------------- helpers

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def _check_device(fn: str, name: str, t: torch.Tensor) -> None:
    # The log-Bessel ops, the sampler's data-dependent loop and the solver need real data.
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{fn}: {name}: expected a cpu or cuda tensor, got device {t.device} "
                         f"(meta and other devices are not supported)")


def _log_prefactor(nu: float, k: torch.Tensor) -> torch.Tensor:
    """``nu log(k/2) - log_ive(nu, k)``, with ``+inf`` at k = inf. For small k (0 included)
    from its series ``lgamma(nu+1) + k - k^2/(4(nu+1)) + O(k^4)``, exact to rounding
    there: computed directly, two terms of size ``nu log k`` would cancel (an error of
    ~eps nu |log k|, 7e-13 at p = 10, k = 5e-324)."""
    small = (k >= 0) & (k < 0.5 * torch.finfo(k.dtype).eps ** 0.25 * math.sqrt(nu + 1))
    inf = k == math.inf
    ks = torch.where(small | inf, torch.ones_like(k), k)
    val = nu * (torch.log(ks) - math.log(2)) - log_ive(nu, ks)
    series = math.lgamma(nu + 1) + k - k * k / (4 * (nu + 1))
    val = torch.where(small, series, val)
    return torch.where(inf, math.inf, val)


@functools.lru_cache(maxsize=256)
def _ratio_series(p: int, terms: int = 9) -> Tuple[float, ...]:
    r"""Scaled coefficients d_n of the large-kappa series
    :math:`1 - A_p(\kappa) = \sum_{n \ge 1} d_n u^n`, :math:`u = c_1/\kappa`,
    :math:`c_1 = (p-1)/2`.

    From the Riccati equation :math:`A' = 1 - A^2 - (p-1)A/\kappa`: :math:`y = 1 - A`
    obeys :math:`y' = -2y + y^2 + 2c_1(1-y)/\kappa`; with :math:`y = \sum c_n \kappa^{-n}`,
    :math:`c_{n+1} = (\sum_{i=1}^{n} c_i c_{n+1-i} + (n - 2c_1) c_n)/2`. Scaled by
    :math:`c_1^n` (so a Horner sum in u stays in range for any p), this is
    :math:`d_{n+1} = (\sum d_i d_{n+1-i} + (n/c_1 - 2) d_n)/2`, :math:`d_1 = 1`.
    The series is asymptotic; 9 terms reach double rounding for kappa >= 64 p
    (checked against mpmath for p from 2 to 1000).
    """
    c1 = (p - 1) / 2
    d = [0.0, 1.0]
    for n in range(1, terms):
        d.append((sum(d[i] * d[n + 1 - i] for i in range(1, n + 1)) + (n / c1 - 2) * d[n]) / 2)
    return tuple(d[1:])


def _series_cut(p: int, dtype: torch.dtype) -> float:
    # Where the 9-term series is at the dtype's rounding level (float32: from 16 p).
    return (64.0 if dtype == torch.float64 else 16.0) * p


def _kappa_one_minus_ratio(p: int, k: torch.Tensor) -> torch.Tensor:
    r""":math:`\kappa(1 - A_p(\kappa))` to full relative precision: directly below the
    series cut, from the series above it (``1 - A`` computed directly loses
    :math:`\log_{10}(2\kappa/(p-1))` digits); :math:`(p-1)/2` at kappa = inf."""
    cut = _series_cut(p, k.dtype)
    big = k >= cut
    k_small = torch.where(big, torch.ones_like(k), k)
    k_big = torch.where(big, k, torch.full_like(k, cut))
    direct = k_small * (1 - bessel_iv_ratio(p / 2 - 1, k_small))
    c1 = (p - 1) / 2
    u = c1 / k_big
    acc = torch.zeros_like(k_big)
    for d in reversed(_ratio_series(p)):
        acc = acc * u + d
    return torch.where(big, c1 * acc, direct)


def _dratio(p: int, k: torch.Tensor) -> torch.Tensor:
    r""":math:`A_p'(\kappa) = 1 - A^2 - (p-1)A/\kappa` (the variance of :math:`\mu^\top x`),
    for kappa > 0; from the derivative of the series above the series cut (directly the
    two terms cancel to :math:`\approx (p-1)/(2\kappa^2)`), 0 at kappa = inf."""
    cut = _series_cut(p, k.dtype)
    big = k >= cut
    k_small = torch.where(big, torch.ones_like(k), k)
    k_big = torch.where(big, k, torch.full_like(k, cut))
    a = bessel_iv_ratio(p / 2 - 1, k_small)
    # (1 - A)(1 + A) rather than 1 - A^2: 1 - A is exact, so only A's own error remains.
    direct = ((1 - a) * (1 + a) - (p - 1) * a / k_small).clamp_min(0)
    c1 = (p - 1) / 2
    u = c1 / k_big
    acc = torch.zeros_like(k_big)
    d = _ratio_series(p)
    for n in range(len(d), 0, -1):   # -dy/dk = (u / k) sum n d_n u^(n-1)
        acc = acc * u + n * d[n - 1]
    return torch.where(big, (u / k_big) * acc, direct)


def _wood_b(kappa: torch.Tensor, p: int) -> torch.Tensor:
    """Wood's b = (p-1) / (2 kappa + sqrt(4 kappa^2 + (p-1)^2)), overflow-free (hypot)."""
    m1 = p - 1
    return m1 / (2 * kappa + torch.hypot(2 * kappa, torch.full_like(kappa, m1)))


def _wood_constants(kappa: torch.Tensor, p: int):
    r"""b, 1 - b, x0 = (1-b)/(1+b) and 1 - x0 of Wood's sampler, without cancellation or
    overflow (for kappa below max/8, far above the huge-kappa threshold).

    With :math:`s = \sqrt{4\kappa^2 + (p-1)^2}` (hypot) and :math:`D = 2\kappa + s + p - 1`:
    :math:`b = (p-1)/(2\kappa+s)`,
    :math:`1-b = 2\kappa(1 + 2\kappa/(s+p-1))/(2\kappa+s)`,
    :math:`x_0 = 2\kappa(1 + 2\kappa/(s+p-1))/D`, :math:`1-x_0 = 2(p-1)/D`.
    """
    m1 = p - 1
    s = torch.hypot(2 * kappa, torch.full_like(kappa, m1))
    t = 2 * kappa * (1 + 2 * kappa / (s + m1))
    b = m1 / (2 * kappa + s)
    omb = t / (2 * kappa + s)
    dd = 2 * kappa + s + m1
    return b, omb, t / dd, 2 * m1 / dd


def _huge_kappa_threshold(p: int, dtype: torch.dtype) -> float:
    """From here on 1 - w ~ Gamma(a)/kappa (a = (p-1)/2) is exact to rounding: the exact
    density of t = 1 - w is that Gamma's times (1 - t/2)^(a-1), whose log varies by about
    |a-1| sqrt(a)/kappa over the bulk (below eps here), and t > 2 has probability below
    e^-70. Capped at max/16 so Wood's constants never overflow below it."""
    a = (p - 1) / 2
    fi = torch.finfo(dtype)
    return min(max(abs(a - 1) * (a + 1) / fi.eps, 40 * (a + 1)), fi.max / 16)


_MAX_ROUNDS = 200


def _sampler_noise(kappa: torch.Tensor, p: int):
    """The sampler's noise for (detached) kappa of any shape: ``(z, 1 - z, g, huge, bad)``.

    ``huge``: kappa at or above the huge-kappa threshold (inf included): those use the
    Gamma(a, 1) draw ``g``. ``bad``: NaN or negative kappa: NaN samples. The others get
    Wood's accepted Beta draw (z, 1 - z). Entries a regime does not use hold harmless
    finite values (z = 1 - z = 1/2, g = 1) so no inf/NaN reaches a gradient.
    """
    a = (p - 1) / 2
    bad = ~(kappa >= 0)
    huge = (kappa >= _huge_kappa_threshold(p, kappa.dtype)) & ~bad
    wood = ~(huge | bad)
    g = torch._standard_gamma(torch.full_like(kappa, a)) if kappa.numel() else \
        torch.ones_like(kappa)
    g = torch.where(huge, g, torch.ones_like(g))
    z, omz = _wood_accepted_beta(kappa, p, wood)
    return z, omz, g, huge, bad


def _wood_accepted_beta(kappa: torch.Tensor, p: int, active: Optional[torch.Tensor] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Accepted proposals (z, 1 - z) of Wood's rejection step, same shape as ``kappa``,
    for the ``active`` elements (default: all; the others get 1/2, 1/2).

    Batched: every round draws one proposal for each element still pending (two Gamma
    draws give z and 1 - z, both to full relative precision), tests all of them at once,
    and keeps going with the rejected ones. The log acceptance is
    :math:`(p-1)(\\log(1+y) - y) \\le 0`, :math:`y = \\kappa((1-w) - (1-x_0))/(p-1)`
    (Wood's test, simplified with :math:`(1-x_0^2)/x_0 = (p-1)/\\kappa`): no
    cancellation between terms of size p, and a NaN can only come from a NaN kappa (kept
    out by the caller). Each round accepts with probability above 1/2 for every (p,
    kappa >= 0), so rounds grow like log2(numel); after ``_MAX_ROUNDS`` rounds (never for
    valid input: probability below numel * 2^-200) it raises ``RuntimeError`` rather
    than loop on.
    """
    shape = kappa.shape
    kf = kappa.reshape(-1)
    n = kf.numel()
    z = torch.full_like(kf, 0.5)
    omz = torch.full_like(kf, 0.5)
    if n == 0:
        return z.reshape(shape), omz.reshape(shape)
    alpha = (p - 1) / 2
    m1 = p - 1
    if active is None:
        idx = torch.arange(n, device=kf.device)
    else:
        idx = active.reshape(-1).nonzero().squeeze(-1)
    k = kf[idx]
    b, _, _, omx0 = _wood_constants(k, p)
    conc = torch.full((2 * idx.numel(),), alpha, dtype=kf.dtype, device=kf.device)
    for _ in range(_MAX_ROUNDS):
        m = idx.numel()
        if m == 0:
            break
        g = torch._standard_gamma(conc[: 2 * m])
        g1, g2 = g[:m], g[m:]
        tot = g1 + g2
        zz, oz = g1 / tot, g2 / tot
        bz = b * zz
        omw = 2 * bz / (oz + bz)
        y = k * (omw - omx0) / m1
        t = m1 * (torch.log1p(y) - y)
        u = torch.rand(m, dtype=kf.dtype, device=kf.device)
        acc = (t >= torch.log(u)) & (tot > 0)
        z[idx[acc]] = zz[acc]
        omz[idx[acc]] = oz[acc]
        rej = ~acc
        idx, k, b, omx0 = (a[rej] for a in (idx, k, b, omx0))
    if idx.numel() == 0:
        return z.reshape(shape), omz.reshape(shape)
    raise RuntimeError(
        f"VonMisesFisher.sample: Wood's rejection sampler left {idx.numel()} element(s) "
        f"unaccepted after {_MAX_ROUNDS} rounds (p = {p}, first kappa = {k[0].item()!r}); "
        f"each round accepts with probability > 1/2 for valid kappa, so this is a bug: "
        f"please report it with these values")


# ------------------------------------------------------------ concentration from R-bar


def _solve_concentration(r: torch.Tensor, p: torch.Tensor, tol: float, max_iter: int,
                         iterations: Optional[int], stats: Optional[list] = None
                         ) -> torch.Tensor:
    """kappa with A_p(kappa) = r for 1-d tensors r, p of one dtype (see the public doc).

    ``stats`` (benchmarks only): gets the working-set size at each evaluation of A_p.
    """
    eps = torch.finfo(r.dtype).eps
    out = torch.full_like(r, float("nan"))
    # Exact special cases: r = 0 -> 0; r = 1 -> inf; outside [0, 1] or NaN -> NaN.
    out = torch.where(r == 0, torch.zeros_like(r), out)
    out = torch.where(r == 1, torch.full_like(r, float("inf")), out)
    regular = (r > 0) & (r < 1) & (p >= 2)

    def init(r, p):
        pm1 = p - 1
        den = (1 - r) * (1 + r)
        kap = r * (p - r * r) / den                       # Banerjee et al. (2005)
        lo = torch.maximum(pm1 * r / den, p * r) * (1 - 8 * eps)
        hi = kap * (1 + 8 * eps)
        return kap, lo, hi

    def step(r, p, kap, lo, hi):
        nu, pm1 = p / 2 - 1, p - 1
        a = bessel_iv_ratio(nu, kap)
        f = a - r
        hi = torch.where(f > 0, torch.minimum(hi, kap), hi)
        lo = torch.where(f < 0, torch.maximum(lo, kap), lo)
        d1 = (1 - a) * (1 + a) - pm1 * a / kap                 # A'
        d2 = -2 * a * d1 - pm1 * (d1 * kap - a) / (kap * kap)  # A'' (Riccati, differentiated)
        newton = f / d1
        delta = newton / (1 - 0.5 * newton * d2 / d1)          # Halley
        new = kap - delta
        ok = (new >= lo) & (new <= hi) & torch.isfinite(new)
        new = torch.where(ok, new, 0.5 * (lo + hi))
        # Converged when the Newton-predicted error of `new` (an upper estimate of Halley's)
        # is below tol, or when f is at the rounding level of r (nothing more to resolve).
        done = (((0.5 * d2 / d1).abs() * delta * delta <= tol * new) & ok) | \
               (f.abs() <= 2 * eps * r) | (f == 0) | (hi - lo <= tol * lo)
        return new, lo, hi, done

    if iterations is not None:  # fixed count: no data-dependent control flow, no host sync
        rr = torch.where(regular, r, torch.full_like(r, 0.5))
        pp = torch.where(regular, p, torch.full_like(p, 3.0))
        kap, lo, hi = init(rr, pp)
        for _ in range(iterations):
            kap, lo, hi, _ = step(rr, pp, kap, lo, hi)
        return torch.where(regular, kap, out)

    idx = regular.nonzero().squeeze(-1)
    rr, pp = r[idx], p[idx]
    kap, lo, hi = init(rr, pp)
    for _ in range(max_iter):
        if idx.numel() == 0:
            break
        if stats is not None:
            stats.append(idx.numel())
        kap, lo, hi, done = step(rr, pp, kap, lo, hi)
        out[idx[done]] = kap[done]
        keep = ~done
        idx, rr, pp, kap, lo, hi = (a[keep] for a in (idx, rr, pp, kap, lo, hi))
    out[idx] = kap  # not converged within max_iter (not observed): best iterate
    return out


class _ConcentrationFromRbar(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, p, tol, max_iter, iterations):
        kap = _solve_concentration(r.reshape(-1), p.reshape(-1), tol, max_iter, iterations)
        kap = kap.reshape(r.shape)
        ctx.save_for_backward(kap, p)
        return kap

    @staticmethod
    def backward(ctx, grad):
        kap, p = ctx.saved_tensors
        # Implicit function theorem: d kappa / d rbar = 1 / A'(kappa).
        a = bessel_iv_ratio(p / 2 - 1, kap)
        d1 = (1 - a) * (1 + a) - (p - 1) * a / kap
        d1 = torch.where(kap == 0, 1 / p, d1)  # A'(0) = 1/p
        return grad / d1, None, None, None, None


def concentration_from_mean_resultant_length(
        rbar: torch.Tensor, p: Union[int, float, torch.Tensor], *,
        tol: Optional[float] = None, max_iter: int = 30,
        iterations: Optional[int] = None) -> torch.Tensor:
    r"""Maximum-likelihood vMF concentration: the :math:`\kappa` with :math:`A_p(\kappa) = \bar R`.

    :math:`A_p(\kappa) = I_{p/2}(\kappa)/I_{p/2-1}(\kappa)` is increasing from 0 to 1, so
    the root is unique. Solver: Halley steps (A' and A'' from the Riccati equation
    :math:`A' = 1 - A^2 - (p-1)A/\kappa`) started from Banerjee et al.'s
    :math:`\bar R(p-\bar R^2)/(1-\bar R^2)` (an upper bound, within 6.5 % for p = 2 and
    closer for larger p), safeguarded by the bracket
    :math:`[\max(p\bar R, (p-1)\bar R/(1-\bar R^2)),\ \text{Banerjee}]` (bisection if a step
    leaves it; the bracket shrinks at every evaluation), so it always converges. Each
    element stops when the Newton-predicted error of its next iterate is below
    ``tol * kappa`` or when :math:`A_p(\kappa) - \bar R` is at the rounding level of
    :math:`\bar R`; finished elements are dropped from the working set. With the default
    tolerance every one of 1e6 random (p in [2, 32768], kappa in [1e-6, 1e7]) problems
    finishes within 3 evaluations of A_p (70 % after one).

    Accuracy: relative error in kappa below 1e-12 wherever :math:`\bar R` in float64
    determines kappa that well; near :math:`\bar R = 1` (kappa >> p) the data limit is
    :math:`\approx \mathrm{ulp}(\bar R) \cdot 2\kappa/(p-1)` (e.g. 1e-9 for p = 2,
    kappa = 1e7), and the solver reaches it.

    Args:
        rbar: mean resultant length(s) in [0, 1), any shape, float32 or float64
            (float16/bfloat16: solved in float32, returned in their dtype; integers: torch's
            default float dtype), CPU or CUDA.
        p: the dimension (``>= 2``): a number, or a tensor broadcastable with ``rbar``.
        tol: relative tolerance on kappa; default ``16 * eps(dtype)``.
        max_iter: cap on the evaluations of A_p per element in tolerance mode.
        iterations: if given, run exactly this many Halley steps on every element with no
            data-dependent control flow and no host synchronization (CUDA-graph capturable;
            4 is enough for float64 over the range above).

    Returns:
        kappa, shape ``broadcast(rbar.shape, p.shape)``, dtype of ``rbar``. ``rbar = 0``
        gives 0, ``rbar = 1`` gives inf, ``rbar`` outside [0, 1] or NaN gives NaN.
        Differentiable in ``rbar``: :math:`d\kappa/d\bar R = 1/A_p'(\kappa)`.
    """
    if not isinstance(rbar, torch.Tensor):
        rbar = torch.as_tensor(rbar, dtype=torch.get_default_dtype())
    _check_device("concentration_from_mean_resultant_length", "rbar", rbar)
    if not rbar.is_floating_point():
        rbar = rbar.to(torch.get_default_dtype())
    out_dtype = rbar.dtype
    if rbar.dtype not in (torch.float32, torch.float64):
        rbar = rbar.float()
    if isinstance(p, torch.Tensor):
        if p.device != rbar.device:
            raise ValueError(f"concentration_from_mean_resultant_length: p must be on rbar's "
                             f"device ({rbar.device}), got {p.device}")
        pt = p.to(rbar.dtype)
        if iterations is None and pt.numel() and bool((pt < 2).any()):
            raise ValueError(f"concentration_from_mean_resultant_length: p: expected every "
                             f"dimension >= 2, got min {pt.min().item()}")
    else:
        if not p >= 2:
            raise ValueError(f"concentration_from_mean_resultant_length: p: expected a "
                             f"dimension >= 2, got {p}")
        pt = torch.tensor(float(p), dtype=rbar.dtype, device=rbar.device)
    try:
        shape = torch.broadcast_shapes(rbar.shape, pt.shape)
    except RuntimeError:
        raise ValueError(f"concentration_from_mean_resultant_length: rbar (shape "
                         f"{tuple(rbar.shape)}) and p (shape {tuple(pt.shape)}) do not "
                         f"broadcast") from None
    if tol is None:
        tol = 16 * torch.finfo(rbar.dtype).eps
    r = rbar.expand(shape).contiguous()
    pp = pt.expand(shape).contiguous()
    kappa = _ConcentrationFromRbar.apply(r, pp, float(tol), int(max_iter), iterations)
    return kappa.to(out_dtype)


def fit_von_mises_fisher(x: torch.Tensor, weights: Optional[torch.Tensor] = None, *,
                         dim: int = -2, tol: Optional[float] = None, max_iter: int = 30,
                         iterations: Optional[int] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Maximum-likelihood von Mises-Fisher fit: (mean direction, concentration).

    :math:`S = \sum_i w_i x_i`, :math:`\hat\mu = S/\lVert S\rVert`,
    :math:`\bar R = \lVert S\rVert / \sum_i w_i`, and :math:`\hat\kappa` solves
    :math:`A_p(\hat\kappa) = \bar R` (:func:`concentration_from_mean_resultant_length`).

    Args:
        x: unit vectors, shape ``(..., n, p)`` (samples along ``dim``, the event along the
            last dimension), float32/float64 (float16/bfloat16: computed in float32, both
            results returned in the input's dtype). Rows are not re-normalized.
        weights: optional non-negative weights, broadcastable to ``x.shape[:-1]``.
        dim: the sample dimension (default -2); must not be the last one.
        tol, max_iter, iterations: passed to the concentration solver.

    Returns:
        ``(mu, kappa)`` with shapes ``x.shape`` minus ``dim`` (ending in ``p``) and that
        minus the last dimension. Independent fits are batched over the other dimensions.
        A zero resultant gives mu = NaN and kappa = 0; identical rows (mean resultant
        length 1 within the rows' rounding, sqrt(eps) of x's dtype) give kappa = inf. Differentiable in ``x`` and
        ``weights``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fit_von_mises_fisher: x: expected a torch.Tensor, got "
                        f"{type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"fit_von_mises_fisher: x: expected shape (..., n, p), got "
                         f"{tuple(x.shape)}")
    _check_device("fit_von_mises_fisher", "x", x)
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if x.dtype.itemsize == 1:
        raise TypeError(f"fit_von_mises_fisher: x: expected float16, bfloat16, float32 or "
                        f"float64, got {x.dtype}")
    out_dtype = x.dtype
    x = x.to(_compute_dtype(x.dtype))  # sums of many half-precision rows would overflow
    d = dim % x.dim()
    if d == x.dim() - 1:
        raise ValueError("fit_von_mises_fisher: dim: the sample dimension must not be the last "
                         "(event) dimension")
    p = x.shape[-1]
    if p < 2:
        raise ValueError(f"fit_von_mises_fisher: x: expected the last dimension p >= 2, got {p}")
    if weights is None:
        s = x.sum(d)
        total = torch.tensor(float(x.shape[d]), dtype=x.dtype, device=x.device)
    else:
        if not isinstance(weights, torch.Tensor):
            weights = torch.as_tensor(weights, dtype=x.dtype, device=x.device)
        try:
            wb = weights.to(x.dtype).expand(x.shape[:-1])
        except RuntimeError:
            raise ValueError(f"fit_von_mises_fisher: weights: shape {tuple(weights.shape)} does "
                             f"not broadcast to x.shape[:-1] = {tuple(x.shape[:-1])}") from None
        s = (wb.unsqueeze(-1) * x).sum(d)
        total = wb.sum(d)
    norm = torch.linalg.vector_norm(s, dim=-1)
    mu = s / norm.unsqueeze(-1)
    rbar = norm / total
    # Identical rows give rbar = 1 up to the rows' own rounding (their norms are 1 only
    # within the sphere constraint's sqrt(eps)): that is kappa = inf, not an invalid rbar.
    tol = math.sqrt(torch.finfo(out_dtype).eps)
    rbar = torch.where((rbar > 1) & (rbar <= 1 + tol), torch.ones_like(rbar), rbar)
    kappa = concentration_from_mean_resultant_length(rbar, p, tol=tol, max_iter=max_iter,
                                                     iterations=iterations)
    return mu.to(out_dtype), kappa.to(out_dtype)
