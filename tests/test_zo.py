"""diffkern.zo: exact restore, estimator properties, ZOSGD, replay, errors (CPU).

Only properties of the directions are used (z a pure function of (seed, k, t, i), read back
through ``_zo_kernels.direction``), never particular random values.
"""
import copy
import math

import pytest
import torch
from torch import nn

import diffkern as dk
from diffkern import _zo_kernels as K

LOW = [pytest.param(d, id=str(d).split(".")[1])
       for d in (torch.float32, torch.bfloat16, torch.float16)]
# float64 is not a kernel storage dtype: it takes the per-tensor path, restored the same way.
ALL = LOW + [pytest.param(torch.float64, id="float64")]
_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
        torch.float64: torch.int64}


def bits(ps):
    return [p.detach().view(_INT[p.dtype]).clone() for p in ps]


def assert_same_bits(before, ps):
    after = bits(ps)
    assert len(before) == len(after)
    for i, (a, b) in enumerate(zip(before, after)):
        assert torch.equal(a, b), f"parameter {i} changed"


class Block(nn.Module):
    """A module owning a parameter and a child (nested hooks), used twice by Net."""

    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, n))
        self.lin = nn.Linear(n, n)

    def forward(self, x):
        return torch.tanh(self.lin(x)) * self.scale


class Net(nn.Module):
    def __init__(self, n=6):
        super().__init__()
        self.inp = nn.Linear(3, n)
        self.block = Block(n)
        self.frozen = nn.Linear(n, n)
        self.frozen.requires_grad_(False)
        self.out = nn.Linear(n, 1)

    def forward(self, x):
        h = self.block(self.block(self.inp(x)))  # the same block twice
        return self.out(self.frozen(h))


def make(dtype, seed=0):
    torch.manual_seed(seed)
    net = Net().to(dtype)
    x = torch.randn(8, 3).to(dtype)
    return net, lambda: net(x).float().square().mean()


ESTIMATES = [
    dict(estimator="spsa", num_directions=3),
    dict(estimator="rge", mode="forward", num_directions=2, distribution="rademacher"),
    dict(estimator="rge", distribution="sphere", num_directions=2),
    dict(estimator="cge", coordinates="some"),
]


def _kwargs(kw, ps):
    kw = dict(kw)
    if kw.get("coordinates") == "some":  # two coordinates of every parameter: fast
        kw["coordinates"] = [torch.tensor([0, p.numel() - 1]) for p in ps]
    return kw


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("kw", ESTIMATES, ids=lambda kw: kw["estimator"] + "-" +
                         kw.get("mode", kw.get("distribution", "")))
@pytest.mark.parametrize("as_list", [False, True], ids=["module", "list"])
def test_exact_restore(dtype, kw, as_list):
    net, loss = make(dtype)
    all_params = list(net.parameters())
    before = bits(all_params)
    params = [p for p in net.parameters() if p.requires_grad] if as_list else net
    trainable = [p for p in net.parameters() if p.requires_grad]
    res = dk.zo.grad(loss, params, seed=3, eps=1e-2, **_kwargs(kw, trainable))
    assert_same_bits(before, all_params)
    assert len(res.grads) == len(trainable)
    for g, p in zip(res.grads, trainable):
        assert g.shape == p.shape
        assert g.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert torch.isfinite(g).all()
    assert res.losses.dtype == torch.float64 and torch.isfinite(res.losses).all()
    # The estimate saw the perturbation: some loss differs from another.
    assert res.losses.unique().numel() > 1


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("as_list", [False, True], ids=["module", "list"])
@pytest.mark.parametrize("failure", ["raise", "nan", "shape"])
def test_restore_when_loss_fails(dtype, as_list, failure):
    net, loss = make(dtype)
    all_params = list(net.parameters())
    before = bits(all_params)
    calls = []

    def bad_loss():
        calls.append(1)
        if len(calls) < 3:
            return loss()
        if failure == "raise":  # inside the forward, while the block's weights are swapped
            def boom(module, args):
                raise RuntimeError("boom")
            h = net.block.lin.register_forward_pre_hook(boom)
            try:
                return loss()
            finally:
                h.remove()
        value = loss()
        return value * math.nan if failure == "nan" else value.expand(2)

    params = [p for p in net.parameters() if p.requires_grad] if as_list else net
    if failure == "raise":
        with pytest.raises(RuntimeError, match="boom"):
            dk.zo.grad(bad_loss, params, num_directions=2, seed=1)
    else:
        with pytest.raises(ValueError, match="diffkern.zo.grad: ") as info:
            dk.zo.grad(bad_loss, params, num_directions=2, seed=1)
        message = str(info.value)
        assert "evaluation 3" in message if failure == "nan" else "shape (2,)" in message
        if failure == "nan":
            assert "nan" in message and "restored" in message
    # A loss is read once the next evaluation is issued (no host sync between forwards), so
    # a NaN is reported after at most one more call; shape and exceptions at once.
    assert len(calls) == (4 if failure == "nan" else 3)
    assert_same_bits(before, all_params)
    # Hooks are gone: a later forward uses the stored weights.
    assert not any(m._forward_pre_hooks for m in net.modules())
    assert not any(m._forward_hooks for m in net.modules())


def test_hooks_swap_one_module_at_a_time():
    net, loss = make(torch.float32)
    originals = {id(p): p.data_ptr() for p in net.parameters()}
    seen = []

    def probe(module, args):
        swapped = [n for n, p in net.named_parameters() if p.data_ptr() != originals[id(p)]]
        seen.append((module, swapped))

    hs = [m.register_forward_pre_hook(probe) for m in (net.inp, net.out)]
    try:
        dk.zo.grad(loss, net, seed=0)
    finally:
        for h in hs:
            h.remove()
    # Probes run before the perturbation hooks of their module (registered earlier):
    # at that moment no other module's weights are swapped.
    assert seen and all(not swapped for _, swapped in seen)


def test_frozen_parameters_untouched_and_module_matches_list():
    net, loss = make(torch.float32)
    trainable = [p for p in net.parameters() if p.requires_grad]
    a = dk.zo.grad(loss, net, seed=5, num_directions=2)
    b = dk.zo.grad(loss, trainable, seed=5, num_directions=2)
    # Same directions, same points up to the last-bit rounding of theta + eps z.
    torch.testing.assert_close(a.losses, b.losses, rtol=1e-5, atol=1e-7)
    assert len(a.grads) == len(trainable)


def test_parameter_read_outside_its_module_warns():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(3, 3)

        def forward(self, x):
            return nn.functional.linear(x, self.emb.weight)  # emb's forward never runs

    net, x = Tied(), torch.randn(4, 3)
    with pytest.warns(RuntimeWarning, match="emb.weight"):
        dk.zo.grad(lambda: net(x).sum(), net, seed=0)


def test_spsa_exact_identity_on_half_square_norm():
    # L = 0.5 ||theta||^2: (L(theta+eps z) - L(theta-eps z)) / (2 eps) = z . theta exactly.
    torch.manual_seed(0)
    ps = [torch.randn(7, 3), torch.randn(5)]
    loss = lambda: 0.5 * sum(p.double().square().sum() for p in ps)
    res = dk.zo.grad(loss, ps, seed=11, eps=1e-3)
    zs = [K.direction(t, p, 11, 0) for t, p in enumerate(ps)]
    proj = sum(float((z.double() * p.double()).sum()) for z, p in zip(zs, ps))
    for g, z in zip(res.grads, zs):
        torch.testing.assert_close(g.double(), proj * z.double(), rtol=2e-3, atol=1e-6)


def _quadratic(d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    a = m @ m.T / d + torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    theta = torch.randn(d, generator=g, dtype=torch.float64).float()
    loss = lambda: 0.5 * theta.double() @ a @ theta.double() + b @ theta.double()
    return theta, loss, a @ theta.double() + b


@pytest.mark.parametrize("kw", [
    dict(estimator="spsa"),
    dict(estimator="spsa", distribution="rademacher"),
    dict(estimator="rge", mode="forward"),
    dict(estimator="rge", distribution="sphere"),
    dict(estimator="rge", distribution="sphere", mode="forward"),
], ids=lambda kw: "-".join(kw.values()))
def test_directional_estimates_point_along_gradient(kw):
    theta, loss, true = _quadratic()
    res = dk.zo.grad(loss, [theta], num_directions=512, seed=2, eps=1e-3, **kw)
    g = res.grads[0].double()
    cos = float(g @ true / (g.norm() * true.norm()))
    assert cos > 0.9
    # Unbiased, including the d/||z|| scaling of the sphere: the magnitude is right too.
    assert 0.7 < float(g.norm() / true.norm()) < 1.5


def test_cge_matches_gradient_to_second_order():
    torch.manual_seed(0)
    theta = torch.randn(4, 3, dtype=torch.float64)
    f = lambda t: (torch.sin(t) * t.square()).sum() + t[0].prod()
    true = torch.func.grad(f)(theta)
    for eps in (1e-2, 1e-3):
        g = dk.zo.grad(lambda: f(theta), [theta], estimator="cge", eps=eps).grads[0]
        assert float((g - true).abs().max()) < 10 * eps ** 2
    fwd = dk.zo.grad(lambda: f(theta), [theta], estimator="cge", mode="forward", eps=1e-6)
    torch.testing.assert_close(fwd.grads[0], true, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cge_uses_the_step_rounding_left(dtype):
    # eps far below one ulp of the stored values: the step is bumped to one ulp and the
    # quotient divides by the real step, so 0.5 theta^2 gives theta (to within one ulp).
    theta = torch.tensor([1.5, -3.0, 0.0, 100.0]).to(dtype)
    res = dk.zo.grad(lambda: 0.5 * theta.double().square().sum(), [theta],
                     estimator="cge", eps=1e-6)
    ulp = torch.finfo(dtype).eps * theta.double().abs().clamp(min=1)
    assert ((res.grads[0].double() - theta.double()).abs() <= ulp).all()


def test_cge_coordinates_subset():
    theta = torch.arange(6.0).reshape(2, 3)
    loss = lambda: 0.5 * theta.double().square().sum()
    mask = torch.tensor([[True, False, False], [False, False, True]])
    for coords in ([mask], [torch.tensor([0, 5])]):
        res = dk.zo.grad(loss, [theta], estimator="cge", coordinates=coords)
        assert res.losses.numel() == 4
        expected = torch.where(mask, theta, torch.zeros(()))
        torch.testing.assert_close(res.grads[0], expected, atol=1e-3, rtol=1e-3)


def test_seed_none_follows_torch_manual_seed():
    theta, loss, _ = _quadratic()
    torch.manual_seed(123)
    a = dk.zo.grad(loss, [theta], num_directions=2)
    torch.manual_seed(123)
    b = dk.zo.grad(loss, [theta], num_directions=2)
    assert torch.equal(a.grads[0], b.grads[0])
    c = dk.zo.grad(loss, [theta], num_directions=2)
    assert not torch.equal(a.grads[0], c.grads[0])


# ------------------------------------------------------------------ ZOSGD / replay

def test_zosgd_decreases_quadratic():
    theta, loss, _ = _quadratic()
    opt = dk.zo.ZOSGD([theta], lr=0.05, num_directions=4, seed=1)
    first = float(loss())
    for _ in range(150):
        opt.step(loss)
    assert float(loss()) < first - 0.5 * (first - float(_quadratic_min()))


def _quadratic_min():
    theta, loss, _ = _quadratic()
    g = torch.Generator().manual_seed(0)
    m = torch.randn(10, 10, generator=g, dtype=torch.float64)
    a = m @ m.T / 10 + torch.eye(10, dtype=torch.float64)
    b = torch.randn(10, generator=g, dtype=torch.float64)
    x = -torch.linalg.solve(a, b)
    return 0.5 * x @ a @ x + b @ x


def _tiny(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
    x, y = torch.randn(32, 4).to(dtype), torch.randn(32, 2)
    return net, lambda: (net(x).float() - y).square().mean()


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("opts", [dict(), dict(momentum=0.9, weight_decay=0.01),
                                  dict(distribution="sphere", num_directions=2)],
                         ids=["plain", "momentum-wd", "sphere"])
def test_replay_is_bit_exact(dtype, opts):
    net, loss = _tiny(dtype)
    initial = copy.deepcopy(net)
    groups = [dict(params=net[0].parameters()), dict(params=net[2].parameters(), lr=0.02)]
    opt = dk.zo.ZOSGD(groups, lr=0.05, seed=7, **opts)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    for _ in range(20):
        opt.step(loss)
        sched.step()
    assert len(opt.history) == 20 * 2 * opt.num_directions
    assert not all(torch.equal(a, b) for a, b in zip(bits(initial.parameters()),
                                                     bits(net.parameters())))
    replay_groups = [list(initial[0].parameters()), list(initial[2].parameters())]
    dk.zo.replay(replay_groups, opt.history)
    assert_same_bits(bits(net.parameters()), list(initial.parameters()))


def test_zosgd_module_path_matches_list_path_losses_and_restores():
    net, loss = _tiny(torch.bfloat16)
    net2 = copy.deepcopy(net)
    x = torch.randn(32, 4).to(torch.bfloat16)
    a = dk.zo.ZOSGD(net, lr=0.05, seed=3)
    b = dk.zo.ZOSGD(list(net2.parameters()), lr=0.05, seed=3)
    la = a.step(lambda: net(x).float().square().mean())
    lb = b.step(lambda: net2(x).float().square().mean())
    torch.testing.assert_close(la, lb, rtol=1e-2, atol=1e-3)
    assert not a.state and not b.state  # no tensors kept without momentum


def test_lr_scheduler_changes_lr_in_history():
    theta, loss, _ = _quadratic()
    opt = dk.zo.ZOSGD([theta], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        opt.step(loss)
        sched.step()
    assert [e.lr for e in opt.history] == [0.1, 0.05, 0.025]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0125)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_state_dict_round_trip_continues_identically(momentum):
    net, loss = _tiny(torch.bfloat16)
    opt = dk.zo.ZOSGD(net, lr=0.05, momentum=momentum, seed=4)
    for _ in range(3):
        opt.step(loss)
    sd = copy.deepcopy(opt.state_dict())
    net2 = copy.deepcopy(net)
    x, y = torch.randn(32, 4).to(torch.bfloat16), torch.randn(32, 2)
    opt2 = dk.zo.ZOSGD(net2, lr=1.0, seed=0)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 0.05 and opt2.seed == 4
    if momentum:
        b = next(iter(opt2.state.values()))["momentum_buffer"]
        assert b.dtype == torch.float32
    for _ in range(3):
        opt.step(lambda: (net(x).float() - y).square().mean())
        opt2.step(lambda: (net2(x).float() - y).square().mean())
    assert_same_bits(bits(net.parameters()), list(net2.parameters()))
    assert opt.history == opt2.history


# ------------------------------------------------------------------ errors

def test_grad_errors():
    theta = torch.randn(3)
    loss = lambda: theta.sum()
    cases = [
        (dict(params=[]), ValueError, "params is empty"),
        (dict(params=nn.Linear(2, 2).requires_grad_(False)), ValueError, "trainable"),
        (dict(params=[torch.arange(3)]), TypeError, "params\\[0\\]"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(eps=math.inf), ValueError, "eps"),
        (dict(num_directions=0), ValueError, "num_directions"),
        (dict(estimator="nes"), ValueError, "estimator"),
        (dict(distribution="uniform"), ValueError, "distribution"),
        (dict(mode="forward"), ValueError, "mode"),
        (dict(coordinates=[None]), ValueError, "coordinates"),
        (dict(estimator="cge", coordinates=[torch.tensor([3])]), ValueError, "coordinates"),
        (dict(params=[theta, theta]), ValueError, "twice"),
    ]
    for kw, exc, match in cases:
        kw = dict(kw)
        params = kw.pop("params", [theta])
        with pytest.raises(exc, match="diffkern.zo.grad: .*" + match):
            dk.zo.grad(loss, params, **kw)
    with pytest.raises(ValueError, match="returned a tensor of shape \\(3,\\)"):
        dk.zo.grad(lambda: theta * 1, [theta])


def test_zosgd_errors():
    theta = torch.randn(3)
    with pytest.raises(TypeError, match="closure is required"):
        dk.zo.ZOSGD([theta], lr=0.1).step()
    with pytest.raises(ValueError, match="diffkern.zo.ZOSGD: momentum"):
        dk.zo.ZOSGD([theta], lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="ZOSGD.step: closure returned inf at evaluation 1"):
        dk.zo.ZOSGD([theta], lr=0.1).step(lambda: math.inf)
    with pytest.raises(ValueError, match="diffkern.zo.ZOSGD: eps"):
        dk.zo.ZOSGD([theta], lr=0.1, eps=-1.0)
    with pytest.raises(ValueError, match="diffkern.zo.replay: .*group 1"):
        dk.zo.replay([theta], [dk.zo.HistoryEntry(0, 1, 0, 0, 1.0, 0.1, 0.0, 0.0, "gaussian")])
