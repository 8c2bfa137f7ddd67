"""dk.zo.grad(batch_size=...): batched (vmap) evaluation against the sequential path (CPU).

What must be equal, bit for bit: the perturbed points (built by the same fused kernel from
the same z(seed, k, t, i)), the parameters afterwards, and, whenever the loss is computed
the same way batched or not, the losses and the estimate. What may differ: a batched
matmul may sum in another order than the unbatched one, so a float32 loss can move by a
few units in its last place; the tests bound the estimate by that measured difference.
"""
import math
import warnings

import pytest
import torch
from torch import nn

import diffkern as dk

from test_zo import ALL, assert_same_bits, bits

# Every estimator shape: central (spsa), forward with L(theta), sphere (norms), cge subset.
KINDS = [
    dict(estimator="spsa", num_directions=5),
    dict(estimator="rge", mode="forward", num_directions=4, distribution="rademacher"),
    dict(estimator="rge", distribution="sphere", num_directions=3),
    dict(estimator="cge", coordinates="some"),
    dict(estimator="cge", mode="forward", coordinates="some"),
]
KIND_IDS = ["spsa", "rge-forward", "rge-sphere", "cge", "cge-forward"]


def _kw(kind, ps):
    kw = dict(kind)
    if kw.get("coordinates") == "some":  # three coordinates of every parameter
        kw["coordinates"] = [torch.tensor(sorted({0, p.numel() // 2, p.numel() - 1}))
                             for p in ps]
    if kw["estimator"] != "cge":
        kw["seed"] = 9
    return kw


def _params(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 4, generator=g).to(dtype), torch.randn(5, generator=g).to(dtype),
            torch.randn((), generator=g).to(dtype)]


def _elementwise_loss(*ps):
    """Reads a few elements and combines them with explicit scalar operations only (no
    reduction), so vmap computes exactly what the unbatched call computes."""
    a, b, c = (p.double() for p in ps)
    return (a[0, 0] * a[2, 3] + torch.sin(a[1, 2]) + b[0] * b[4] - 0.5 * b[2] * b[2]
            + torch.exp(0.1 * c))


class _Spy:
    """Wraps torch.func.vmap to count batched calls and keep the stacks they received."""

    def __init__(self, monkeypatch):
        self.real, self.calls = torch.func.vmap, []
        monkeypatch.setattr(torch.func, "vmap", self)

    def __call__(self, fn, in_dims=0, **kw):
        inner = self.real(fn, in_dims=in_dims, **kw)

        def run(*args):
            self.calls.append([a.clone() for a in args])
            return inner(*args)
        return run


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("batch_size", [2, 64])
def test_batched_equals_sequential_bit_for_bit(dtype, kind, batch_size, monkeypatch):
    ps = _params(dtype)
    before = bits(ps)
    kw = _kw(kind, ps)
    points = []  # the sequential path's perturbed parameters, as loss_fn saw them

    def seq_loss():
        points.append([p.clone() for p in ps])
        return _elementwise_loss(*ps)

    seq = dk.zo.grad(seq_loss, ps, **kw)
    spy = _Spy(monkeypatch)
    bat = dk.zo.grad(_elementwise_loss, ps, batch_size=batch_size, **kw)
    assert_same_bits(before, ps)
    assert torch.equal(seq.losses, bat.losses)
    for g, h in zip(seq.grads, bat.grads):
        assert torch.equal(g, h)
    # The stacks hold exactly the sequential points (theta itself is not stacked: the
    # forward-difference base is one plain call).
    perturbed = points[1:] if kw.get("mode") == "forward" else points
    stacked = []
    for call in spy.calls:
        width = next(a.shape[0] for a, p in zip(call, ps) if a.dim() == p.dim() + 1)
        for b in range(width):
            stacked.append([a[b] if a.dim() == p.dim() + 1 else a for a, p in zip(call, ps)])
    assert len(stacked) == len(perturbed) > 0
    for x, y in zip(stacked, perturbed):
        assert_same_bits(bits(x), y)
    # Chunking: ceil(points per chunk key / batch_size) calls; cge chunks never cross a tensor.
    if kw["estimator"] == "cge":
        per_tensor = [len(c) * (2 if kw.get("mode", "central") == "central" else 1)
                      for c in kw["coordinates"]]
        assert len(spy.calls) == sum(-(-m // batch_size) for m in per_tensor)
        assert all(sum(a.dim() == p.dim() + 1 for a, p in zip(call, ps)) == 1
                   for call in spy.calls)
    else:
        assert len(spy.calls) == -(-len(perturbed) // batch_size)


def _mlp(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)
    x = torch.randn(32, 6).to(dtype)
    return net, x


@pytest.mark.parametrize("kind", KINDS[:3], ids=KIND_IDS[:3])
def test_batched_module_matches_sequential_within_forward_rounding(kind):
    # float32 matmuls batched over the directions may round differently from one at a
    # time: losses agree to a few float32 ulps (here |dL| <= 1e-6 |L|, the observed
    # difference is ~1e-8), and the estimate moves by at most what those loss
    # differences imply: |dg| <= sum_k |dc_k| |z_k|, |dc_k| <= (|dL+| + |dL-|) * factor / (2 eps n).
    net, x = _mlp(torch.float32)
    before = bits(net.parameters())
    loss = lambda: net(x).square().mean()
    ps = list(net.parameters())
    kw = _kw(kind, ps)
    seq = dk.zo.grad(loss, net, **kw)
    bat = dk.zo.grad(loss, net, batch_size=4, **kw)
    assert_same_bits(before, net.parameters())
    dl = (seq.losses - bat.losses).abs()
    assert float(dl.max()) <= 1e-6 * float(seq.losses.abs().max())
    # The bound on the estimate, from the directions themselves.
    n, eps = kw["num_directions"], 1e-3
    forward = kw.get("mode") == "forward"
    dist = "gaussian" if kw.get("distribution", "gaussian") == "sphere" else kw.get(
        "distribution", "gaussian")
    d = sum(p.numel() for p in ps)
    bound = [torch.zeros(p.shape, dtype=torch.float64) for p in ps]
    for k in range(n):
        zs = [dk._zo_kernels.direction(t, p, 9, k, dist).double() for t, p in enumerate(ps)]
        norm = math.sqrt(sum(float(z.square().sum()) for z in zs))
        factor = d / norm if kw.get("distribution") == "sphere" else 1.0
        if forward:
            dc = (float(dl[0]) + float(dl[1 + k])) / eps
        else:
            dc = (float(dl[2 * k]) + float(dl[2 * k + 1])) / (2 * eps)
        for b, z in zip(bound, zs):
            b += dc * factor / n * z.abs()
    for g, h, b in zip(seq.grads, bat.grads, bound):
        # plus float32 rounding of the assembled sums themselves
        assert ((g.double() - h.double()).abs() <= b + 1e-6 * (g.double().abs() + 1)).all()


def test_batched_module_sees_parameters_read_outside_forward():
    # functional_call swaps the attribute itself: a weight read outside its module's
    # forward (tied embeddings) is perturbed too, unlike the hook path, which warns.
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(3, 3)

        def forward(self, x):
            return nn.functional.linear(x, self.emb.weight).tanh()

    torch.manual_seed(1)
    net, x = Tied().double(), torch.randn(4, 3, dtype=torch.float64)
    before = bits(net.parameters())
    weight = net.emb.weight
    ref = dk.zo.grad(lambda w, b: nn.functional.linear(x, w).tanh().sum(), [weight, net.emb.bias],
                     batch_size=3, seed=4, num_directions=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = dk.zo.grad(lambda: net(x).sum(), net, batch_size=3, seed=4, num_directions=3)
    assert_same_bits(before, net.parameters())
    torch.testing.assert_close(res.losses, ref.losses, rtol=1e-12, atol=1e-12)
    assert res.losses.unique().numel() > 1


def test_batch_memory_caps_the_chunk(monkeypatch):
    ps = _params(torch.float32)
    per_point = sum(p.numel() * 4 for p in ps)
    spy = _Spy(monkeypatch)
    dk.zo.grad(_elementwise_loss, ps, num_directions=5, seed=0, batch_size=8,
               batch_memory=2 * per_point + 3)
    assert [c[0].shape[0] for c in spy.calls] == [2, 2, 2, 2, 2]
    with pytest.raises(ValueError, match="diffkern.zo.grad: batch_memory=10 bytes is less "
                                         "than one perturbed copy"):
        dk.zo.grad(_elementwise_loss, ps, seed=0, batch_size=8, batch_memory=10)
    assert len(spy.calls) == 5


def test_batched_errors_leave_parameters_unchanged():
    net, x = _mlp(torch.bfloat16)
    ps = list(net.parameters())
    before = bits(ps)
    loss = lambda: net(x).float().square().mean()
    cases = [
        (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
        (dict(batch_size=True), TypeError, "batch_size must be an int"),
        (dict(batch_size=2.0), TypeError, "batch_size must be an int"),
        (dict(batch_memory=100), ValueError, "batch_memory is only used with batch_size"),
        (dict(batch_size=2, batch_memory=0), ValueError, "batch_memory must be a positive"),
    ]
    for kw, exc, match in cases:
        with pytest.raises(exc, match="diffkern.zo.grad: " + match):
            dk.zo.grad(loss, net, **kw)
    # A list of tensors needs a loss taking them as arguments.
    with pytest.raises(TypeError, match="loss_fn must take the parameters as positional"):
        dk.zo.grad(loss, ps, batch_size=2)
    # Non-scalar, non-finite (named by its evaluation), and a loss vmap cannot run.
    with pytest.raises(ValueError, match="must return a scalar, but evaluation 1 returned "
                                         "a tensor of shape \\(32, 1\\)"):
        dk.zo.grad(lambda: net(x), net, batch_size=2)
    calls = []

    def nan_third():
        calls.append(1)
        out = net(x).float().square().mean()
        return out * math.nan if len(calls) == 2 else out  # second chunk: evaluations 3, 4

    with pytest.raises(ValueError, match="returned nan at evaluation 3 .*unchanged"):
        dk.zo.grad(nan_third, net, batch_size=2, num_directions=3, seed=0)
    with pytest.raises(RuntimeError) as info:
        dk.zo.grad(lambda: net(x).float().square().mean().item() + 0.0, net, batch_size=2)
    assert "batch_size=None" in "".join(getattr(info.value, "__notes__", []))
    assert_same_bits(before, ps)


def test_batched_non_contiguous_parameter_matches_hook_path(monkeypatch):
    # A transposed parameter cannot be written by the one-pass kernel: its stack is a copy
    # perturbed in place (contiguous slices). Same points as the hook path, which builds
    # theta + eps z per module: with an elementwise loss, the same bits.
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(5)
            self.w = nn.Parameter(torch.randn(4, 3, generator=g).t())  # non-contiguous
            self.b = nn.Parameter(torch.randn(3, generator=g))

        def forward(self):
            return self.w[0, 1] * self.w[2, 3] + self.b[1] * self.b[1] + self.w[1, 0]

    m = M()
    assert not m.w.is_contiguous()
    before = bits(m.parameters())
    seq = dk.zo.grad(lambda: m(), m, seed=2, num_directions=3)
    bat = dk.zo.grad(lambda: m(), m, seed=2, num_directions=3, batch_size=4)
    assert_same_bits(before, m.parameters())
    assert torch.equal(seq.losses, bat.losses)
    for g, h in zip(seq.grads, bat.grads):
        assert torch.equal(g, h)
