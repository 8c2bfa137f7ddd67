"""CBO (public as ``diffkern.zo.CBO``): consensus-based optimization of a batched loss."""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ._zo_optim import _number


def consensus_weights(losses: Tensor, alpha: float) -> Tensor:
    """softmax(-alpha * f): w_i = exp(-alpha f_i) / sum_j exp(-alpha f_j), in float64.

    The log-sum-exp shift: w = softmax(-alpha (f - min f)). Every exponent is <= 0 and the
    best particle's is exactly 0, so the sum is >= 1 and the weights are finite for any
    finite alpha and losses (alpha = 1e6 with losses near 1e4 is exp(-1e10) for every
    particle unshifted: 0/0). Shifting before multiplying keeps an overflow of
    alpha * (f - min f) at -inf (weight 0), never inf - inf."""
    f = losses.double()
    return torch.softmax((f - f.min()) * -float(alpha), dim=0)


class CBO:
    """Consensus-based optimization (Pinnau, Totzeck, Tse, Martin 2017; anisotropic noise
    by Carrillo, Jin, Li, Zhu 2021; analysed as a stochastic relaxation of gradient descent
    by Riedl, Klock, Geldhauser, Fornasier, "Gradient is All You Need?", 2023): a swarm of N
    particles that uses loss values only.

    One ``step()`` (Euler-Maruyama, xi ~ N(0, I) per particle and coordinate):
    v = sum_i w_i X_i with w = softmax(-alpha f(X)),
    X_i <- X_i - lam dt (X_i - v) + sigma sqrt(dt) (X_i - v) * xi_i   (anisotropic, elementwise)
    or ``noise="isotropic"``: ... + sigma sqrt(dt) ||X_i - v|| xi_i.

    ``f``: the batched loss: ``f(X)`` with X of shape (N, d) (one particle a row) returns N
    real losses, shape (N,). All N particles are one call (``chunk_size``: at most that
    many rows a call, for memory). To optimize the parameters of a module, write ``f`` with
    ``diffkern.zo.module_loss`` (``torch.func.functional_call`` + ``vmap`` over rows):
    ``f = dk.zo.module_loss(net, lambda model: F.mse_loss(model(x), y))``, then
    ``CBO(f, f.flatten()[None] + spread * torch.randn(N, f.dim))``; ``f.load_(cbo.best)``.
    ``particles``: the initial swarm, a float tensor (N, d), N >= 1; the swarm lives in a
    copy on its device and dtype. Spread it over the region to search: CBO finds minima
    that the swarm can see, not ones far outside it.

    ``alpha`` (>= 0): inverse temperature of the weights; large alpha makes v the best
    particle (the Laplace principle), small alpha the plain mean. ``lam`` (>= 0): drift
    towards v. ``sigma`` (>= 0): exploration noise. ``dt`` (> 0): step. Any of these can be
    changed between steps (e.g. an alpha schedule); ``state_dict`` carries them.
    ``batch_size`` (random-batch CBO, Carrillo et al. 2021): each step partitions the
    particles at random into batches of that size and moves each particle towards its own
    batch's consensus point; this keeps the swarm from collapsing on the first good basin
    and is what finds the global minimum of multimodal functions (tests: shifted Rastrigin
    d=10 and Ackley d=20 from a uniform start on [-3, 3]^d with N=200, batch_size=20,
    alpha=1e5, lam=1, sigma=1.3, dt=0.02, 800 steps; without batches the same runs stopped
    in a neighbouring Rastrigin basin, a coordinate one unit off). Tuning: with anisotropic
    noise a coordinate's distance to a fixed v contracts in mean square only if
    (1 - lam dt)^2 + sigma^2 dt < 1, i.e. sigma^2 < 2 lam - lam^2 dt; sigma just below
    that explores longest.
    ``consensus`` is always the whole swarm's v.
    ``seed``: the noise comes from a ``torch.Generator`` on the particles' device seeded
    with it, so a run is reproducible bit for bit on one device (``state_dict`` keeps the
    generator's state too).

    After each step: ``particles`` (N, d), ``losses`` (N,) of the particles before the
    move, ``consensus`` (d,), ``best`` and ``best_loss`` (the lowest loss evaluated so far
    and its particle). ``step()`` returns the smallest loss of this step (0-d float64).
    Losses are checked: a non-finite loss raises ``ValueError`` naming the particle.
    """

    _NAME = "diffkern.zo.CBO"

    def __init__(self, f: Callable[[Tensor], Tensor], particles: Tensor, *, alpha=30.0,
                 lam=1.0, sigma=0.8, dt=0.05, noise="anisotropic", seed=0,
                 batch_size: Optional[int] = None, chunk_size: Optional[int] = None):
        fname = self._NAME
        if not callable(f):
            raise TypeError(f"{fname}: f must be callable (X of shape (N, d) -> losses of "
                            f"shape (N,)), got {type(f).__name__}")
        if not isinstance(particles, Tensor):
            raise TypeError(f"{fname}: particles must be a tensor of shape (N, d), got "
                            f"{type(particles).__name__}")
        if particles.dim() != 2:
            raise ValueError(f"{fname}: particles must have shape (N, d), got shape "
                             f"{tuple(particles.shape)}")
        if not particles.is_floating_point():
            raise TypeError(f"{fname}: particles must be floating point, got "
                            f"{particles.dtype}")
        if particles.shape[0] < 1:
            raise ValueError(f"{fname}: N (particles.shape[0]) must be >= 1, got "
                             f"{particles.shape[0]}")
        if particles.shape[1] < 1:
            raise ValueError(f"{fname}: d (particles.shape[1]) must be >= 1, got "
                             f"{particles.shape[1]}")
        if not bool(torch.isfinite(particles).all()):
            raise ValueError(f"{fname}: particles has non-finite entries")
        if noise not in ("anisotropic", "isotropic"):
            raise ValueError(f"{fname}: noise must be 'anisotropic' or 'isotropic', got "
                             f"{noise!r}")
        for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size)):
            if value is not None and (isinstance(value, bool) or
                                      not isinstance(value, numbers.Integral) or value < 1):
                raise ValueError(f"{fname}: {name} must be None or an int >= 1, got "
                                 f"{value!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or \
                not 0 <= seed < 2**63:
            raise ValueError(f"{fname}: seed must be an int in [0, 2**63), got {seed!r}")
        self.f = f
        self.particles = particles.detach().clone()
        self.alpha, self.lam, self.sigma, self.dt = alpha, lam, sigma, dt
        self._check_hyper(fname)
        self.noise = noise
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.seed = int(seed)
        self.generator = torch.Generator(device=self.particles.device)
        self.generator.manual_seed(self.seed)
        self.step_count = 0
        self.losses: Optional[Tensor] = None
        self.consensus: Optional[Tensor] = None
        self.best: Optional[Tensor] = None
        self.best_loss = math.inf

    def _check_hyper(self, fname):
        self.alpha = _number(fname, "alpha", self.alpha)
        self.lam = _number(fname, "lam", self.lam)
        self.sigma = _number(fname, "sigma", self.sigma)
        self.dt = _number(fname, "dt", self.dt)
        if not math.isfinite(self.alpha):
            raise ValueError(f"{fname}: alpha must be finite, got {self.alpha}")
        if not (self.dt > 0 and math.isfinite(self.dt)):
            raise ValueError(f"{fname}: dt must be positive and finite, got {self.dt}")
        for name in ("lam", "sigma"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{fname}: {name} must be finite, got {getattr(self, name)}")

    def evaluate(self, X: Tensor) -> Tensor:
        """f over the rows of X (in chunks of ``chunk_size``), checked: float64, shape (N,)."""
        fname = f"{self._NAME}.step"
        n = X.shape[0]
        size = n if self.chunk_size is None else self.chunk_size
        parts = []
        with torch.no_grad():
            for start in range(0, n, size):
                rows = X[start:start + size]
                out = self.f(rows)
                if not isinstance(out, Tensor):
                    raise TypeError(f"{fname}: f must return a tensor of shape (N,), got "
                                    f"{type(out).__name__}")
                if out.shape != (rows.shape[0],) or out.is_complex():
                    raise ValueError(f"{fname}: f must return real losses of shape "
                                     f"({rows.shape[0]},) for X of shape "
                                     f"{tuple(rows.shape)}, got shape {tuple(out.shape)}"
                                     f"{' (complex)' if out.is_complex() else ''}")
                parts.append(out.detach().double().to(X.device))
        losses = torch.cat(parts)
        bad = ~torch.isfinite(losses)
        if bool(bad.any()):
            idx = torch.nonzero(bad).reshape(-1)
            raise ValueError(f"{fname}: f returned non-finite losses for {idx.numel()} "
                             f"particle(s) (first: particle {int(idx[0])}, loss "
                             f"{float(losses[idx[0]])}) at step {self.step_count}; the "
                             f"particles were not moved")
        return losses

    @torch.no_grad()
    def step(self, closure=None) -> Tensor:
        """One consensus step (see the class docstring): one evaluation of the N particles.
        There is no closure: the loss is the ``f`` given to the constructor."""
        fname = f"{self._NAME}.step"
        if closure is not None:
            raise TypeError(f"{fname}: CBO takes no closure; it evaluates the batched loss "
                            f"f given to the constructor")
        self._check_hyper(fname)
        X = self.particles
        losses = self.evaluate(X)
        w = consensus_weights(losses, self.alpha)
        # Weighted mean in float64, then back to the swarm's dtype.
        v = (w[:, None] * X.double()).sum(dim=0).to(X.dtype)
        if self.batch_size is None or self.batch_size >= X.shape[0]:
            diff = X - v
        else:
            diff = X - self._batch_consensus(X, losses)
        xi = torch.randn(X.shape, generator=self.generator, dtype=X.dtype, device=X.device)
        if self.noise == "anisotropic":
            noise = diff * xi
        else:
            noise = torch.linalg.vector_norm(diff, dim=1, keepdim=True) * xi
        self.particles = X - self.lam * self.dt * diff + self.sigma * math.sqrt(self.dt) * noise
        i = int(torch.argmin(losses))
        if float(losses[i]) < self.best_loss:
            self.best_loss, self.best = float(losses[i]), X[i].clone()
        self.losses, self.consensus = losses, v
        self.step_count += 1
        return losses[i].clone()

    def _batch_consensus(self, X, losses):
        """Random-batch consensus (Carrillo, Jin, Li, Zhu 2021): a random partition of the
        particles into batches of ``batch_size`` (the last one may be smaller); each
        particle's consensus point is its batch's. Rows: the consensus of each particle."""
        n, m = X.shape[0], self.batch_size
        perm = torch.randperm(n, generator=self.generator, device=X.device)
        full = n - n % m
        out = torch.empty_like(X)
        # The full batches at once: (n // m, m) losses, softmax over each row.
        for idx in (perm[:full].reshape(-1, m), perm[full:].reshape(1, -1)):
            if idx.numel() == 0:
                continue
            f = losses[idx]
            w = torch.softmax((f - f.min(dim=1, keepdim=True).values) * -self.alpha, dim=1)
            v = (w[..., None] * X[idx].double()).sum(dim=1)
            out[idx] = v[:, None, :].expand(-1, idx.shape[1], -1).to(X.dtype)
        return out

    def state_dict(self) -> dict:
        return dict(particles=self.particles.clone(), alpha=self.alpha, lam=self.lam,
                    sigma=self.sigma, dt=self.dt, noise=self.noise, seed=self.seed,
                    step=self.step_count, generator=self.generator.get_state(),
                    best=None if self.best is None else self.best.clone(),
                    best_loss=self.best_loss,
                    consensus=None if self.consensus is None else self.consensus.clone())

    def load_state_dict(self, state_dict: dict) -> None:
        sd = dict(state_dict)
        device = self.particles.device
        self.particles = sd["particles"].to(device).clone()
        self.alpha, self.lam, self.sigma, self.dt = sd["alpha"], sd["lam"], sd["sigma"], sd["dt"]
        self._check_hyper(f"{self._NAME}.load_state_dict")
        self.noise, self.seed, self.step_count = sd["noise"], int(sd["seed"]), int(sd["step"])
        self.generator = torch.Generator(device=device)
        self.generator.set_state(sd["generator"])
        self.best = None if sd["best"] is None else sd["best"].to(device).clone()
        self.best_loss = float(sd["best_loss"])
        self.consensus = None if sd["consensus"] is None else sd["consensus"].to(device).clone()


class ModuleLoss:
    """A batched loss over a module's parameters, for ``CBO``: see ``module_loss``."""

    def __init__(self, module, loss_fn, *, vectorize=True):
        fname = "diffkern.zo.module_loss"
        if not isinstance(module, nn.Module):
            raise TypeError(f"{fname}: module must be an nn.Module, got "
                            f"{type(module).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"{fname}: loss_fn must be callable (model -> scalar loss), got "
                            f"{type(loss_fn).__name__}")
        self.module, self.loss_fn, self.vectorize = module, loss_fn, bool(vectorize)
        self.names, self.params = [], []
        for name, p in module.named_parameters():
            if p.requires_grad:
                if not p.is_floating_point():
                    raise TypeError(f"{fname}: parameter {name!r} has dtype {p.dtype}; "
                                    f"particles need floating-point parameters")
                self.names.append(name)
                self.params.append(p)
        if not self.params:
            raise ValueError(f"{fname}: module has no trainable parameters (none has "
                             f"requires_grad=True)")
        self.sizes = [p.numel() for p in self.params]
        self.dim = sum(self.sizes)

    def unflatten(self, row: Tensor) -> dict:
        """{name: tensor shaped and typed like the parameter} from one row of length dim."""
        parts = torch.split(row, self.sizes)
        return {n: x.reshape(p.shape).to(p.dtype) for n, x, p in zip(self.names, parts,
                                                                       self.params)}

    def flatten(self) -> Tensor:
        """The module's current trainable parameters as one row (float32, or float64 if
        any is float64): the centre to spread a start swarm around."""
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) \
            else torch.float32
        return torch.cat([p.detach().reshape(-1).to(dtype) for p in self.params])

    @torch.no_grad()
    def load_(self, row: Tensor) -> None:
        """Writes one row (e.g. ``cbo.best`` or ``cbo.consensus``) into the parameters."""
        if not isinstance(row, Tensor) or row.shape != (self.dim,):
            got = tuple(row.shape) if isinstance(row, Tensor) else type(row).__name__
            raise ValueError(f"diffkern.zo.ModuleLoss.load_: row must be a tensor of shape "
                             f"({self.dim},), got {got}")
        for p, x in zip(self.params, self.unflatten(row.to(self.params[0].device)).values()):
            p.copy_(x)

    def _one(self, row):
        from torch.func import functional_call
        params = self.unflatten(row)
        model = lambda *args, **kwargs: functional_call(self.module, params, args, kwargs)
        out = self.loss_fn(model)
        if not isinstance(out, Tensor) or out.numel() != 1:
            got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"diffkern.zo.module_loss: loss_fn must return a scalar tensor, "
                             f"got {got}")
        return out.reshape(())

    def __call__(self, X: Tensor) -> Tensor:
        if X.dim() != 2 or X.shape[1] != self.dim:
            raise ValueError(f"diffkern.zo.module_loss: X must have shape (N, {self.dim}) "
                             f"(one row per particle, all trainable parameters), got "
                             f"{tuple(X.shape)}")
        with torch.no_grad():
            if self.vectorize:
                return torch.func.vmap(self._one)(X)
            return torch.stack([self._one(row) for row in X])


def module_loss(module: nn.Module, loss_fn: Callable, *, vectorize: bool = True) -> ModuleLoss:
    """The batched loss f(X) of a module's trainable parameters, for ``CBO``.

    Row i of X (shape (N, dim)) holds all trainable parameters (``requires_grad=True``, in
    ``named_parameters()`` order, flattened) of particle i; f(X)_i = loss_fn(model_i) where
    ``model_i(*inputs)`` runs ``module`` with those parameters
    (``torch.func.functional_call``; the module's own parameters and buffers are not
    touched). ``vectorize=True`` evaluates all rows as one ``torch.func.vmap`` call, so
    loss_fn must be vmappable (no ``.item()``, no data-dependent Python branching; modules
    that update buffers in the forward, like BatchNorm in training mode, are not);
    ``vectorize=False`` loops over rows (same values). ``CBO(..., chunk_size=k)`` bounds
    the memory of the vmapped call to k particles.

    The returned object also has ``dim``, ``flatten()`` (current parameters as one row),
    ``unflatten(row)`` and ``load_(row)`` (write a particle, e.g. ``cbo.best``, back).
    """
    return ModuleLoss(module, loss_fn, vectorize=vectorize)
