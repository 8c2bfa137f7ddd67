"""dk.zo.grad(cuda_graph=True): the loss captured once in a CUDA graph and replayed.

CPU: the argument checks. CUDA (marked): the estimate against the eager path on the same
points, bit-exact restore, the capture errors (a host read, a non-tensor loss) with the
parameters restored, CGE, dropout, and the graph's memory freed after the call."""
import pytest
import torch
from torch import nn
import torch.nn.functional as F

import diffkern as dk


def _mlp(device, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(device, dtype)


def _data(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 16, generator=g).to(device, dtype)
    y = torch.randint(0, 4, (8,), generator=g).to(device)
    return x, y


def _snapshot(ps):
    return [p.detach().clone() for p in ps]


def _same_bits(a, b):
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b))


# ------------------------------------------------------------------ argument checks (CPU)

def test_cpu_parameters_are_rejected_with_the_reason():
    model = _mlp("cpu")
    x, y = _data("cpu")
    with pytest.raises(ValueError, match=r"diffkern\.zo\.grad: cuda_graph=True needs"):
        dk.zo.grad(lambda: F.cross_entropy(model(x), y), model, cuda_graph=True, seed=0)


def test_cuda_graph_excludes_batch_size_and_hook_units():
    model = _mlp("cpu")
    x, y = _data("cpu")
    loss = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    with pytest.raises(ValueError, match="cuda_graph=True and batch_size are exclusive"):
        dk.zo.grad(loss, model, cuda_graph=True, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="hook_unit_bytes is not used with cuda_graph"):
        dk.zo.grad(loss, model, cuda_graph=True, hook_unit_bytes="auto", seed=0)


@pytest.mark.parametrize("bad", ["yes", None, 2])
def test_cuda_graph_must_be_a_bool(bad):
    model = _mlp("cpu")
    x, y = _data("cpu")
    with pytest.raises(TypeError, match="cuda_graph must be True or False"):
        dk.zo.grad(lambda: F.cross_entropy(model(x), y), model, cuda_graph=bad, seed=0)


# ------------------------------------------------------------------ CUDA

def _close(a, b, rtol):
    return all(torch.allclose(x.double(), y.double(), rtol=rtol, atol=rtol * float(y.abs().max()))
               for x, y in zip(a, b))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("estimator,mode", [("rge", "forward"), ("rge", "central"),
                                            ("spsa", "central")])
def test_graphed_estimate_matches_eager_and_restores(cuda_device, dtype, estimator, mode):
    model = _mlp(cuda_device, dtype)
    x, y = _data(cuda_device, dtype)
    loss = lambda: F.cross_entropy(model(x).float(), y)  # noqa: E731
    before = _snapshot(model.parameters())
    kw = dict(estimator=estimator, mode=mode, num_directions=6, eps=1e-2, seed=5)
    eager = dk.zo.grad(loss, model, **kw)
    graphed = dk.zo.grad(loss, model, cuda_graph=True, **kw)
    assert _same_bits(before, _snapshot(model.parameters()))
    assert graphed.losses.shape == eager.losses.shape
    # Same points; only the captured kernels' rounding may differ from the eager ones (in
    # half precision one rounding step of the logits moves a difference quotient a lot).
    if dtype == torch.float32:
        assert torch.allclose(graphed.losses, eager.losses, rtol=1e-6, atol=0)
        assert _close(graphed.grads, eager.grads, 1e-3)
    else:
        assert torch.allclose(graphed.losses, eager.losses, rtol=1e-2, atol=0)
        assert all(torch.isfinite(g).all() for g in graphed.grads)
    # A loss is not a stale replay: the perturbed points' losses all differ from theta's.
    assert len(set(graphed.losses.tolist())) == len(graphed.losses)


@pytest.mark.cuda
def test_graphed_list_path_and_cge(cuda_device):
    torch.manual_seed(0)
    w = torch.randn(40, device=cuda_device)
    target = torch.randn(40, device=cuda_device)
    loss = lambda: ((w - target) ** 2).sum()  # noqa: E731
    before = w.clone()
    est = dk.zo.grad(loss, [w], estimator="cge", eps=1e-3, cuda_graph=True)
    assert torch.equal(w, before)
    assert torch.allclose(est.grads[0], 2 * (w - target), rtol=1e-2, atol=1e-2)
    rge = dk.zo.grad(loss, [w], estimator="rge", num_directions=4, seed=3, cuda_graph=True)
    ref = dk.zo.grad(loss, [w], estimator="rge", num_directions=4, seed=3)
    assert torch.allclose(rge.losses, ref.losses, rtol=1e-6, atol=0)
    assert torch.equal(w, before)


@pytest.mark.cuda
def test_capture_failure_is_explained_and_restores(cuda_device):
    model = _mlp(cuda_device)
    x, y = _data(cuda_device)
    before = _snapshot(model.parameters())

    def host_read():
        out = F.cross_entropy(model(x), y)
        if out.item() > 1e9:  # a host read: not capturable
            return out * 0
        return out
    with pytest.raises(RuntimeError, match="could not be captured in a CUDA graph"):
        dk.zo.grad(host_read, model, estimator="rge", num_directions=3, seed=0, cuda_graph=True)
    assert _same_bits(before, _snapshot(model.parameters()))
    # The device is still usable, and the same model runs captured afterwards.
    ok = dk.zo.grad(lambda: F.cross_entropy(model(x), y), model, estimator="rge",
                    num_directions=3, seed=0, cuda_graph=True)
    assert torch.isfinite(ok.grads[0]).all()


@pytest.mark.cuda
def test_non_tensor_loss_is_rejected(cuda_device):
    model = _mlp(cuda_device)
    x, y = _data(cuda_device)
    before = _snapshot(model.parameters())
    with pytest.raises(ValueError, match="must return a one-element tensor on cuda"):
        dk.zo.grad(lambda: 1.5, model, estimator="rge", num_directions=2, seed=0,
                   cuda_graph=True)
    with pytest.raises(ValueError, match="must return a one-element tensor on cuda"):
        dk.zo.grad(lambda: model(x).sum(1), model, estimator="rge", num_directions=2,
                   seed=0, cuda_graph=True)
    assert _same_bits(before, _snapshot(model.parameters()))


@pytest.mark.cuda
def test_dropout_draws_new_values_at_every_replay(cuda_device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Dropout(0.5), nn.Linear(64, 1)).to(cuda_device)
    model.train()
    x = torch.randn(32, 16, device=cuda_device)
    # eps = 0 is not allowed, so take a tiny eps: the losses then differ by dropout alone.
    est = dk.zo.grad(lambda: model(x).square().mean(), model, estimator="rge",
                     num_directions=8, eps=1e-30, seed=0, cuda_graph=True)
    assert len(set(est.losses.tolist())) > 4


@pytest.mark.cuda
def test_graph_memory_is_released(cuda_device):
    model = _mlp(cuda_device)
    x, y = _data(cuda_device)
    loss = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    dk.zo.grad(loss, model, estimator="rge", num_directions=2, seed=0, cuda_graph=True)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    for _ in range(3):
        dk.zo.grad(loss, model, estimator="rge", num_directions=2, seed=0, cuda_graph=True)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= start
