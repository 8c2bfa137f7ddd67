"""diffkern.fd: batched finite-difference Jacobians against autograd (float64), column
colouring on banded patterns (calls counted), gradcheck naming the worst entry."""
import math

import pytest
import torch

import diffkern as dk


def autograd_jacobian(f, x):
    out = f(x.unsqueeze(0))[0]
    return torch.autograd.functional.jacobian(lambda v: f(v.unsqueeze(0))[0], x).reshape(
        out.numel(), x.numel())


def dense_fn(a):
    def f(xs):  # (B, 3, 4) -> (B, 5, 2)
        flat = xs.reshape(xs.shape[0], -1)
        return (torch.sin(flat @ a.T) * flat[:, :10].square()).reshape(-1, 5, 2)
    return f


class Counted:
    def __init__(self, f):
        self.f, self.calls, self.inputs = f, 0, 0

    def __call__(self, xs):
        self.calls += 1
        self.inputs += xs.shape[0]
        return self.f(xs)


def banded(half):
    """y_i = x_i^2 + sum_{0<|d|<=half} sin(x_{i+d}) * (d + 3): 2*half+1 diagonals."""
    def f(xs):
        y = xs.square()
        n = xs.shape[-1]
        for d in range(1, half + 1):
            y[..., :n - d] += torch.sin(xs[..., d:]) * (d + 3)
            y[..., d:] += torch.sin(xs[..., :n - d]) * (3 - d)
        return y
    return f


def band_pattern(n, half, layout):
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    dense = (i - j).abs() <= half
    if layout == "dense":
        return dense
    coo = dense.to_sparse()
    return coo.to_sparse_csr() if layout == "csr" else coo


def test_dense_matches_autograd_and_shapes():
    torch.manual_seed(0)
    a = torch.randn(10, 12, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)
    f = Counted(dense_fn(a))
    j = dk.fd.jacobian(f, x)
    assert j.shape == (10, 12) and j.dtype == torch.float64
    torch.testing.assert_close(j, autograd_jacobian(dense_fn(a), x), rtol=1e-8, atol=1e-8)
    assert f.inputs == 24 and f.calls == 1
    f = Counted(dense_fn(a))
    j5 = dk.fd.jacobian(f, x, chunk=5)
    assert f.calls == math.ceil(24 / 5) and f.inputs == 24
    torch.testing.assert_close(j5, j, rtol=0, atol=0)


def test_float32_default_step_accuracy():
    torch.manual_seed(0)
    a = torch.randn(10, 12)
    x = torch.randn(3, 4) * 10  # steps scale with |x_i|
    j = dk.fd.jacobian(dense_fn(a), x)
    assert j.dtype == torch.float32
    ref = autograd_jacobian(dense_fn(a.double()), x.double())
    err = (j.double() - ref).abs().max() / ref.abs().max()
    assert err < 1e-3  # cbrt(eps)^2 ~ 2.4e-5 relative, times the third derivatives


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", ["dense", "coo", "csr"])
def test_banded_sparsity_few_evaluations(layout):
    n, half = 2000, 2
    width = 2 * half + 1
    torch.manual_seed(0)
    x = torch.randn(n, dtype=torch.float64)
    f = Counted(banded(half))
    pattern = band_pattern(n, half, layout)
    j = dk.fd.jacobian(f, x, sparsity=pattern)
    assert f.inputs <= 2 * (width + 1) and f.calls == 1
    assert j.layout == pattern.layout
    dense = j.to_dense() if layout != "dense" else j
    ref = autograd_jacobian(banded(half), x)
    torch.testing.assert_close(dense, ref, rtol=1e-7, atol=1e-8)


def test_colouring_separates_columns_sharing_a_row():
    torch.manual_seed(1)
    pattern = torch.rand(40, 30) < 0.1
    rows, cols = torch.nonzero(pattern, as_tuple=True)
    colours, k = dk.fd.color_columns(rows, cols, 30)
    assert colours.max() == k - 1
    for r in range(40):
        c = colours[pattern[r]]
        assert c.unique().numel() == c.numel(), f"row {r} has two columns of one colour"
    # and the Jacobian of a function with exactly that pattern comes out right
    w = torch.randn(40, 30, dtype=torch.float64) * pattern
    f = lambda xs: torch.tanh(xs) @ w.T
    x = torch.randn(30, dtype=torch.float64)
    torch.testing.assert_close(dk.fd.jacobian(f, x, sparsity=pattern),
                               autograd_jacobian(f, x), rtol=1e-7, atol=1e-9)


def test_gradcheck_passes_and_catches_wrong_gradient():
    a = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float64)
    assert dk.fd.gradcheck(lambda a, b: torch.sin(a) * b, (a, b))

    class Wrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.pow(3)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            wrong = torch.ones_like(x)
            wrong[1, 2] = 1.5  # entry (output (1, 2), input (1, 2)) is off by half
            return g * 3 * x.square() * wrong

    x = torch.rand(2, 3, dtype=torch.float64) + 0.5
    x.requires_grad_(True)
    with pytest.raises(AssertionError) as info:
        dk.fd.gradcheck(Wrong.apply, x)
    message = str(info.value)
    assert "diffkern.fd.gradcheck" in message
    assert "output index (1, 2), input index (1, 2)" in message
    fd_value = 3 * float(x.detach()[1, 2]) ** 2
    assert f"{fd_value:.6}"[:6] in message and "1 of 36 entries" in message


def test_errors():
    x = torch.randn(3)
    f = lambda xs: xs * 2
    with pytest.raises(TypeError, match="diffkern.fd.jacobian: x"):
        dk.fd.jacobian(f, torch.arange(3))
    with pytest.raises(ValueError, match="diffkern.fd.jacobian: eps"):
        dk.fd.jacobian(f, x, eps=0.0)
    with pytest.raises(ValueError, match="diffkern.fd.jacobian: chunk"):
        dk.fd.jacobian(f, x, chunk=0)
    with pytest.raises(ValueError, match="diffkern.fd.jacobian: sparsity must have shape"):
        dk.fd.jacobian(f, x, sparsity=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="diffkern.fd.jacobian: sparsity has 2 rows"):
        dk.fd.jacobian(f, x, sparsity=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="leading batch dimension"):
        dk.fd.jacobian(lambda xs: xs.sum(), x)
    with pytest.raises(ValueError, match="diffkern.fd.gradcheck: inputs"):
        dk.fd.gradcheck(lambda n: n, (torch.arange(3),))
