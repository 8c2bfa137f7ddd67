"""diffkern.zo: ZOAdam, CBO, blackbox (CPU).

ZOAdam is checked against torch.optim.Adam fed the same estimates; CBO on shifted
Rastrigin / Ackley functions; blackbox against autograd through a differentiable twin of
the wrapped function. Seeds are fixed, so every test is deterministic.
"""
import copy
import math

import pytest
import torch
from torch import nn

import diffkern as dk
from diffkern._zo_optim import _mix

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: intra-op threads only contend on a loaded CI machine (a CBO
    step went from 0.7 ms to 50 ms with 2 threads on 2 busy cores). Results do not depend
    on it: every comparison below runs both sides under the same setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ ZOAdam

def _quadratic(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=F64)
    a = m @ m.T / n + torch.eye(n, dtype=F64)
    b = torch.randn(n, generator=g, dtype=F64)
    return a, b


@pytest.mark.parametrize("opts", [dict(), dict(weight_decay=0.1),
                                  dict(weight_decay=0.1, decoupled_weight_decay=True),
                                  dict(distribution="sphere", betas=(0.5, 0.9))],
                         ids=["plain", "l2", "decoupled", "sphere"])
def test_zoadam_is_adam_on_the_zo_estimate(opts):
    """Same steps as torch.optim.Adam given dk.zo.grad's estimate with the step's seed."""
    a, b = _quadratic()
    x0 = torch.randn(6, dtype=F64, generator=torch.Generator().manual_seed(1))
    ours = [x0[:4].clone(), x0[4:].clone()]
    ref = [x0[:4].clone().requires_grad_(), x0[4:].clone().requires_grad_()]

    opt = dk.zo.ZOAdam(ours, lr=0.05, num_directions=3, seed=5, **opts)
    adam_opts = {k: v for k, v in opts.items() if k != "distribution"}
    torch_opt = torch.optim.Adam(ref, lr=0.05, foreach=False, **adam_opts)
    dist = opts.get("distribution", "gaussian")
    for step in range(25):
        opt.step(lambda: _q(ours, a, b))
        # The step's seed is mix(seed, step, group 0); the tensors' ids are their indices.
        est = dk.zo.grad(lambda: _q(ref, a, b), [r.detach() for r in ref], num_directions=3,
                         seed=_mix(5, step, 0), distribution=dist)
        for r, e in zip(ref, est.grads):
            r.grad = e
        torch_opt.step()
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r.detach(), rtol=1e-12, atol=1e-12)
    assert set(opt.state[ours[0]]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state[ours[0]]["step"] == 25


def test_zoadam_param_groups_have_their_own_lr():
    a, b = _quadratic()
    ps = [torch.zeros(4, dtype=F64), torch.zeros(2, dtype=F64)]
    opt = dk.zo.ZOAdam([dict(params=[ps[0]]), dict(params=[ps[1]], lr=0.0)], lr=0.05, seed=1)
    for _ in range(5):
        opt.step(lambda: _q(ps, a, b))
    assert float(ps[0].abs().min()) > 0 and torch.equal(ps[1], torch.zeros(2, dtype=F64))
    assert opt.state[ps[1]]["step"] == 5  # moments still tracked at lr 0, as Adam does


def _q(ps, a, b):
    x = torch.cat([p.detach().reshape(-1) for p in ps])
    return 0.5 * x @ a @ x + b @ x


def _tiny(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
    x, y = torch.randn(32, 4).to(dtype), torch.randn(32, 2)
    return net, lambda: (net(x).float() - y).square().mean()


def test_zoadam_trains_bf16_module_with_float32_moments():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(torch.bfloat16)
    x = torch.randn(32, 4)
    y = 3 * x[:, :2] - x[:, 2:]  # representable: the loss can go to ~0
    x = x.to(torch.bfloat16)
    loss = lambda: (net(x).float() - y).square().mean()
    opt = dk.zo.ZOAdam(net, lr=0.05, num_directions=2, seed=2)
    with torch.no_grad():
        first = float(loss())
    for _ in range(60):
        opt.step(loss)
    with torch.no_grad():
        assert float(loss()) < 0.35 * first
    for p in net.parameters():
        assert p.dtype == torch.bfloat16
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert opt.state[p]["exp_avg_sq"].dtype == torch.float32


def test_zoadam_state_dict_round_trip_and_schedulers():
    net, loss = _tiny(torch.float16)
    opt = dk.zo.ZOAdam(net, lr=0.01, seed=4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        opt.step(loss)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)
    sd = copy.deepcopy(opt.state_dict())
    net2 = copy.deepcopy(net)
    opt2 = dk.zo.ZOAdam(net2, lr=1.0, seed=0)
    opt2.load_state_dict(sd)
    assert opt2.seed == 4 and opt2.param_groups[0]["lr"] == pytest.approx(0.005)
    assert next(iter(opt2.state.values()))["exp_avg"].dtype == torch.float32
    x, y = torch.randn(32, 4).to(torch.float16), torch.randn(32, 2)
    for _ in range(3):
        opt.step(lambda: (net(x).float() - y).square().mean())
        opt2.step(lambda: (net2(x).float() - y).square().mean())
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p.view(torch.int16), q.view(torch.int16))
    # OneCycleLR cycles betas[0] through the group, as it does for torch.optim.Adam.
    one = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=10)
    opt.step(loss)
    one.step()
    assert opt.param_groups[0]["betas"][0] != 0.9


def test_zoadam_errors_and_restore_on_bad_loss():
    theta = torch.randn(3)
    cases = [(dict(lr=-1.0), ValueError, "lr"),
             (dict(betas=(1.0, 0.9)), ValueError, "betas\\[0\\]"),
             (dict(betas=(0.9, -0.1)), ValueError, "betas\\[1\\]"),
             (dict(betas=0.9), TypeError, "betas"),
             (dict(adam_eps=-1e-8), ValueError, "adam_eps"),
             (dict(eps=0.0), ValueError, "eps"),
             (dict(num_directions=0), ValueError, "num_directions"),
             (dict(seed=None), TypeError, "seed")]
    for kw, exc, match in cases:
        with pytest.raises(exc, match="diffkern.zo.ZOAdam: " + match):
            dk.zo.ZOAdam([theta], **kw)
    opt = dk.zo.ZOAdam([theta], lr=0.1)
    with pytest.raises(TypeError, match="ZOAdam.step: closure is required"):
        opt.step()
    before = theta.clone()
    with pytest.raises(ValueError, match="ZOAdam.step: closure returned nan"):
        opt.step(lambda: theta.sum() * math.nan)
    assert torch.equal(theta, before) and not opt.state
    opt.param_groups[0]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match="param_groups\\[0\\].*betas\\[1\\]"):
        opt.step(lambda: theta.square().sum())


# ------------------------------------------------------------------ CBO

def _rastrigin(shift):
    def f(X):
        y = X - shift
        return 10 * y.shape[1] + (y * y - 10 * torch.cos(2 * math.pi * y)).sum(1)
    return f


def _ackley(shift):
    def f(X):
        y = X - shift
        d = y.shape[1]
        return (-20 * torch.exp(-0.2 * torch.sqrt((y * y).sum(1) / d))
                - torch.exp(torch.cos(2 * math.pi * y).sum(1) / d) + 20 + math.e)
    return f


def _swarm(d, n, seed):
    """A minimum shifted off the centre, inside [-1, 1]^d, and a uniform start on
    [-3, 3]^d: the minimum is one of ~6^d basins the swarm starts over."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.rand(d, generator=g, dtype=F64) * 2 - 1
    return shift, torch.rand(n, d, generator=g, dtype=F64) * 6 - 3


@pytest.mark.parametrize("name,fn,d", [("rastrigin", _rastrigin, 10), ("ackley", _ackley, 20)])
def test_cbo_finds_the_global_minimum(name, fn, d):
    shift, x0 = _swarm(d, 200, seed=d)
    f = fn(shift)
    cbo = dk.zo.CBO(f, x0, alpha=1e5, lam=1.0, sigma=1.3, dt=0.02, batch_size=20, seed=1)
    start = float(f(x0).min())
    for _ in range(800):
        cbo.step()
    v = cbo.consensus
    # Every coordinate in the global basin (local minima sit ~1 apart) and the value near
    # the minimum 0; the best start particle was far from it.
    assert float((v - shift).abs().max()) < 0.1, (v - shift)
    assert float(f(v[None])[0]) < 0.1 < start
    assert cbo.best_loss <= float(f(cbo.best[None])[0]) + 1e-12


def test_cbo_isotropic_full_consensus_on_a_quadratic():
    shift, x0 = _swarm(5, 50, seed=3)
    cbo = dk.zo.CBO(lambda X: ((X - shift) ** 2).sum(1), x0, noise="isotropic", sigma=0.5,
                    alpha=1e4, dt=0.05, seed=0)
    for _ in range(300):
        cbo.step()
    assert float((cbo.consensus - shift).abs().max()) < 1e-2
    assert float((cbo.particles - shift).abs().max()) < 5e-2  # the swarm collapsed


def test_consensus_weights_stable_for_huge_alpha_and_losses():
    # Offsets that are exact in float64 (multiples of 2^-20 next to 1e4), alpha = 2^20 ~ 1e6:
    # the exponents are exactly -[2, 0, 1, 2^20 * 1e4, 2^20].
    u = 2.0 ** -20
    f = torch.tensor([1e4 + 2 * u, 1e4, 1e4 + u, 2e4, 1e4 + 1.0], dtype=F64)
    w = dk.zo.consensus_weights(f, 2.0 ** 20)
    expected = torch.exp(-torch.tensor([2.0, 0.0, 1.0, 2.0 ** 20 * 1e4, 2.0 ** 20], dtype=F64))
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w, expected / expected.sum(), rtol=1e-14, atol=0)
    assert torch.isfinite(dk.zo.consensus_weights(f, 1e6)).all()
    # float32 losses: the shift runs in float64, so no overflow either.
    w32 = dk.zo.consensus_weights(f.float() * 1e30, 1e6)
    assert torch.isfinite(w32).all() and float(w32.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(dk.zo.consensus_weights(f, 0.0), torch.full((5,), 0.2, dtype=F64))
    # A whole CBO step in that regime moves the swarm to finite places.
    x0 = torch.randn(64, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    cbo = dk.zo.CBO(lambda X: 1e4 + X.square().sum(1), x0, alpha=1e6, seed=0)
    for _ in range(5):
        cbo.step()
    assert torch.isfinite(cbo.particles).all() and torch.isfinite(cbo.consensus).all()


def test_cbo_reproducible_chunked_and_resumable():
    shift, x0 = _swarm(4, 30, seed=5)
    f = _rastrigin(shift)

    def run(steps, **kw):
        cbo = dk.zo.CBO(f, x0, seed=11, **kw)
        for _ in range(steps):
            cbo.step()
        return cbo

    a, b = run(10), run(10, chunk_size=7)
    assert torch.equal(a.particles, b.particles)  # same seed, chunked evaluation: same bits
    c = dk.zo.CBO(f, x0, seed=12)
    for _ in range(10):
        c.step()
    assert not torch.equal(a.particles, c.particles)  # another seed, another run
    mid = run(4, batch_size=8)
    sd = copy.deepcopy(mid.state_dict())
    fresh = dk.zo.CBO(f, torch.zeros(30, 4, dtype=F64), seed=0, batch_size=8)
    fresh.load_state_dict(sd)
    for _ in range(6):
        mid.step()
        fresh.step()
    assert torch.equal(mid.particles, fresh.particles)
    assert x0.shape == (30, 4) and not torch.equal(x0, a.particles)  # input not modified


def test_cbo_trains_a_module_through_module_loss():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(64, 3)
    with torch.no_grad():
        y = teacher(x)
    mse = lambda model: (model(x) - y).square().mean()
    f = dk.zo.module_loss(net, mse)
    assert f.dim == sum(p.numel() for p in net.parameters())
    x0 = f.flatten()[None] + torch.randn(60, f.dim, generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in net.parameters()]
    # vmap and the row loop agree; neither touches the module's own parameters.
    loop = dk.zo.module_loss(net, mse, vectorize=False)
    torch.testing.assert_close(f(x0), loop(x0), rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
    with torch.no_grad():
        start = float(mse(net))
    cbo = dk.zo.CBO(f, x0, alpha=1e5, sigma=1.0, dt=0.05, batch_size=20, chunk_size=25, seed=0)
    for _ in range(200):
        cbo.step()
    f.load_(cbo.best)
    with torch.no_grad():
        end = float(mse(net))
    assert end == pytest.approx(cbo.best_loss, rel=1e-5) and end < 0.05 * start
    with pytest.raises(ValueError, match="module_loss: X must have shape \\(N, 21\\)"):
        f(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="trainable"):
        dk.zo.module_loss(nn.Linear(2, 2).requires_grad_(False), mse)


def test_cbo_errors():
    x0 = torch.randn(8, 3)
    f = lambda X: X.square().sum(1)
    cases = [(dict(particles=torch.randn(0, 3)), ValueError, "N .*>= 1"),
             (dict(particles=torch.randn(3)), ValueError, "particles must have shape"),
             (dict(particles=torch.arange(6).reshape(3, 2)), TypeError,
              "particles must be floating"),
             (dict(dt=0.0), ValueError, "dt"),
             (dict(alpha=-1.0), ValueError, "alpha"),
             (dict(sigma=math.inf), ValueError, "sigma"),
             (dict(noise="gaussian"), ValueError, "noise"),
             (dict(batch_size=0), ValueError, "batch_size"),
             (dict(f=3), TypeError, "f must be callable")]
    for kw, exc, match in cases:
        kw = dict(kw)
        with pytest.raises(exc, match="diffkern.zo.CBO: " + match):
            dk.zo.CBO(kw.pop("f", f), kw.pop("particles", x0), **kw)
    bad = dk.zo.CBO(lambda X: torch.where(X[:, 0] > 0, math.inf, 1.0), x0)
    before = bad.particles.clone()
    with pytest.raises(ValueError, match="CBO.step: f returned non-finite losses"):
        bad.step()
    assert torch.equal(bad.particles, before)
    with pytest.raises(ValueError, match="shape \\(8,\\)"):
        dk.zo.CBO(lambda X: X.sum(), x0).step()
    with pytest.raises(TypeError, match="must return a tensor"):
        dk.zo.CBO(lambda X: [1.0] * 8, x0).step()
    with pytest.raises(TypeError, match="CBO.step: CBO takes no closure"):
        dk.zo.CBO(f, x0).step(lambda: 0.0)


# ------------------------------------------------------------------ blackbox

def _smooth(a):
    """y = sin(x A^T) + x^2 / 2 (row-wise), and its differentiable twin is itself."""
    return lambda x: torch.sin(x @ a.T) + 0.5 * x.square().sum(-1, keepdim=True)


def test_blackbox_cge_composes_like_autograd():
    torch.manual_seed(0)
    a = torch.randn(5, 4, dtype=F64)
    fn = _smooth(a)
    enc = nn.Linear(3, 4).double()
    head = nn.Linear(5, 1).double()
    x = torch.randn(6, 3, dtype=F64)
    calls = []

    def opaque(z):
        calls.append((z.requires_grad, torch.is_grad_enabled()))
        return fn(z)

    box = dk.zo.blackbox(opaque, estimator="cge", eps=1e-5, batched=True)
    head(box(enc(x))).square().mean().backward()
    ours = [p.grad.clone() for p in list(enc.parameters()) + list(head.parameters())]
    for p in list(enc.parameters()) + list(head.parameters()):
        p.grad = None
    head(fn(enc(x))).square().mean().backward()
    for o, p in zip(ours, list(enc.parameters()) + list(head.parameters())):
        torch.testing.assert_close(o, p.grad, rtol=1e-7, atol=1e-9)
    # batched cge: 1 forward + 2 calls per coordinate of one row (4), never with grad.
    assert len(calls) == 1 + 2 * 4
    assert not any(rg or ge for rg, ge in calls)


@pytest.mark.parametrize("batched", [False, True])
def test_blackbox_cge_forward_differences(batched):
    torch.manual_seed(6)
    a = torch.randn(3, 4, dtype=F64)
    fn = _smooth(a)
    x = torch.randn(5, 4, dtype=F64, requires_grad=True)
    g = torch.randn(5, 3, dtype=F64)
    box = dk.zo.blackbox(fn, estimator="cge", mode="forward", eps=1e-7, batched=batched)
    est, = torch.autograd.grad(box(x), x, g)
    true, = torch.autograd.grad(fn(x), x, g)
    torch.testing.assert_close(est, true, rtol=1e-5, atol=1e-5)  # O(eps) + O(1e-16 / eps)


def test_blackbox_cge_low_precision_divides_by_the_step_taken():
    """fp16 x with eps below its resolution: every step is one ulp, and the quotient uses
    the ulp actually taken, so the estimate is still the gradient (to O(ulp^2))."""
    torch.manual_seed(4)
    a = torch.randn(3, 5, dtype=F64)
    fn = lambda z: torch.sin(z.double() @ a.T)  # fp16 in, float64 out
    x = (torch.rand(5) + 0.5).half().requires_grad_()
    g = torch.randn(3, dtype=F64)
    est, = torch.autograd.grad(dk.zo.blackbox(fn, estimator="cge", eps=1e-7)(x), x, g)
    x64 = x.detach().double().requires_grad_()
    true, = torch.autograd.grad(fn(x64), x64, g)
    assert est.dtype == torch.float16
    torch.testing.assert_close(est.double(), true, rtol=5e-3, atol=1e-3)


@pytest.mark.parametrize("kw", [dict(estimator="spsa"),
                                dict(estimator="rge", mode="forward", eps=1e-4),
                                dict(estimator="rge", distribution="sphere"),
                                dict(estimator="spsa", distribution="rademacher")],
                         ids=["spsa", "rge-forward", "sphere", "rademacher"])
def test_blackbox_estimate_is_unbiased(kw):
    """Many directions: the mean over k of D_k z_k is within a few standard errors of the
    vector-Jacobian product (E[z z^T] = I; per-coordinate variance <= (d+1)||v||^2 / n)."""
    torch.manual_seed(1)
    a = torch.randn(5, 8, dtype=F64)
    fn = _smooth(a)
    x = torch.randn(8, dtype=F64, requires_grad=True)
    g = torch.randn(5, dtype=F64)
    n = 3000
    est, = torch.autograd.grad(dk.zo.blackbox(fn, num_directions=n, seed=3, **kw)(x), x, g)
    true, = torch.autograd.grad(fn(x), x, g)
    err = float((est - true).norm())
    bound = 4 * math.sqrt((8 + 2) / n) * float(true.norm())
    assert err < bound, (err, bound)
    assert err > 1e-6 * float(true.norm())  # a real estimate, not the exact gradient


def test_blackbox_batched_rows_and_seeds():
    torch.manual_seed(2)
    a = torch.randn(3, 4, dtype=F64)
    fn = _smooth(a)
    x = torch.randn(16, 4, dtype=F64, requires_grad=True)
    g = torch.randn(16, 3, dtype=F64)
    true, = torch.autograd.grad(fn(x), x, g)
    box = dk.zo.blackbox(fn, num_directions=2000, batched=True, seed=0)
    est, = torch.autograd.grad(box(x), x, g)
    row_err = (est - true).norm(dim=1) / true.norm(dim=1)
    assert float(row_err.max()) < 4 * math.sqrt(6 / 2000)
    # Backward call c uses seed mix(seed, c): a fresh estimate each call, repeatable.
    again, = torch.autograd.grad(box(x), x, g)
    assert not torch.equal(est, again)
    box2 = dk.zo.blackbox(fn, num_directions=2000, batched=True, seed=0)
    first, = torch.autograd.grad(box2(x), x, g)
    assert torch.equal(first, est)


@pytest.mark.parametrize("kw", [dict(), dict(estimator="rge", mode="forward"),
                                dict(distribution="sphere")], ids=["spsa", "forward", "sphere"])
def test_blackbox_stacked_calls_give_the_same_estimate(kw):
    torch.manual_seed(5)
    a = torch.randn(3, 4, dtype=F64)
    fn = _smooth(a)
    x = torch.randn(16, 4, dtype=F64, requires_grad=True)
    g = torch.randn(16, 3, dtype=F64)
    sizes = []

    def counted(z):
        assert not z.requires_grad and not torch.is_grad_enabled()
        sizes.append(z.shape[0])
        return fn(z)

    one, = torch.autograd.grad(dk.zo.blackbox(fn, num_directions=6, batched=True, **kw)(x), x, g)
    box = dk.zo.blackbox(counted, num_directions=6, batched=True, max_rows=16 * 5, **kw)
    stacked, = torch.autograd.grad(box(x), x, g)
    torch.testing.assert_close(stacked, one, rtol=1e-12, atol=1e-12)
    copies = 12 if kw.get("mode") != "forward" else 6  # forward: fn(x) is reused
    # the forward's call, then the copies in calls of at most 5 copies (80 rows)
    assert sizes == [16] + [80] * (copies // 5) + ([16 * (copies % 5)] if copies % 5 else [])


def test_blackbox_trains_an_encoder_through_a_simulator():
    """ZO-AE-DS pattern: only the encoder is differentiable; the loss goes down."""
    torch.manual_seed(3)
    target = torch.randn(4, 2)
    sim = lambda z: torch.round(z * 1e6) / 1e6 @ target  # rounding: no autograd path
    enc = nn.Linear(3, 4)
    box = dk.zo.blackbox(sim, num_directions=8, eps=1e-2, batched=True, seed=1)
    model = nn.Sequential(enc, box)  # a module without parameters of its own
    assert list(model.parameters()) == list(enc.parameters())
    x, y = torch.randn(64, 3), torch.randn(64, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_blackbox_errors():
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(TypeError, match="blackbox: fn must return a tensor"):
        dk.zo.blackbox(lambda z: z.tolist())(x)
    with pytest.raises(TypeError, match="blackbox: fn must return a floating-point"):
        dk.zo.blackbox(lambda z: (z > 0).long())(x)
    with pytest.raises(ValueError, match="blackbox: fn returned non-finite values"):
        box = dk.zo.blackbox(lambda z: torch.where(z.sum() > float(x.sum()), math.inf, 1.0) * z)
        box(x).sum().backward()
    cases = [(dict(eps=0.0), ValueError, "eps"), (dict(num_directions=0), ValueError,
                                                  "num_directions"),
             (dict(estimator="nes"), ValueError, "estimator"),
             (dict(estimator="spsa", mode="forward"), ValueError, "mode")]
    for kw, exc, match in cases:
        with pytest.raises(exc, match="diffkern.zo.blackbox: " + match):
            dk.zo.blackbox(torch.sin, **kw)
    with pytest.raises(ValueError, match="blackbox: max_rows .*batched=True"):
        dk.zo.blackbox(torch.sin, max_rows=10)
    with pytest.raises(ValueError, match="blackbox: batched=True needs fn's output"):
        x2 = torch.randn(4, 2, requires_grad=True)
        dk.zo.blackbox(lambda z: z.sum(0), batched=True)(x2).sum().backward()
    with pytest.raises(TypeError, match="blackbox: fn must be callable"):
        dk.zo.blackbox(3)
    with pytest.raises(TypeError, match="blackbox: x must be floating"):
        dk.zo.blackbox(torch.sin)(torch.arange(3))
