"""dk.zo's module hooks: coarser hook units (``hook_unit_bytes``) give the same bits as the
per-module hooks, and the stored weights keep theirs (python/diffkern/_zo_hooks.py)."""
import pytest
import torch
from torch import nn

import diffkern as dk
from diffkern import _zo_hooks, zo as Z

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class Block(nn.Module):
    """Owns a parameter itself and has children (nested units); ``inner`` runs twice."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(d) + 0.5)
        self.inner = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(self.inner(torch.tanh(self.inner(x))) * self.scale) + x


class TinyLM(nn.Module):
    """Tied embedding / head (the same Parameter in two modules), a frozen layer, blocks."""

    def __init__(self, vocab=11, d=8, blocks=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.frozen = nn.Linear(d, d)
        self.frozen.requires_grad_(False)
        self.blocks = nn.ModuleList(Block(d) for _ in range(blocks))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        x = self.frozen(self.emb(ids))
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _model(dtype, device="cpu"):
    torch.manual_seed(0)
    m = TinyLM().to(device=device, dtype=dtype)
    ids = torch.randint(0, 11, (3, 5), device=device)

    def loss_fn():
        return nn.functional.cross_entropy(m(ids).float().reshape(-1, 11), ids.reshape(-1))
    return m, loss_fn


def _bits(m):
    return [p.detach().clone() for p in m.parameters()]


def _same_bits(a, b):
    return all(torch.equal(x.view(torch.uint8) if x.dtype != torch.float32 else x.view(
        torch.int32), y.view(torch.uint8) if y.dtype != torch.float32 else y.view(torch.int32))
        for x, y in zip(a, b))


BUDGETS = [0, 600, "auto", 1 << 30]


def _units(m, budget):
    flat = [p for p in m.parameters() if p.requires_grad]
    where = {id(p): (0, t) for t, p in enumerate(flat)}
    return _zo_hooks.plan_units(m, where, budget)


def test_plan_units():
    m, _ = _model(torch.float32)
    per_module = _units(m, None)
    assert len(per_module) == 2 + 3 * 3  # emb and head (both own the tied weight), 3 per block
    whole = _units(m, 1 << 30)
    assert [u[0] for u in whole] == [m]
    assert len(whole[0][1]) == sum(p.requires_grad for p in m.parameters())
    assert not any(p is m.frozen.weight for _, ps in whole for p in ps)
    # A budget of one block: each block is one unit; emb and head (smaller) one each.
    block = sum(p.numel() * 4 for p in m.blocks[0].parameters())
    mods = [u[0] for u in _units(m, block)]
    assert mods == [m.emb, *m.blocks, m.head]
    # "auto": no unit larger than the largest per-module unit.
    largest = max(sum(p.numel() * 4 for p in ps) for _, ps in per_module)
    assert all(sum(p.numel() * 4 for p in ps) <= largest for _, ps in _units(m, "auto"))
    # A unit over head + emb (tied) lists the weight once.
    both = nn.ModuleDict(dict(emb=m.emb, head=m.head))
    ps = _zo_hooks.plan_units(both, {id(m.emb.weight): (0, 0)}, 1 << 30)[0][1]
    assert len(ps) == 1


def _run_zosgd(dtype, budget, device="cpu", steps=3):
    m, loss_fn = _model(dtype, device)
    opt = dk.zo.ZOSGD(m, lr=1e-2, seed=7, num_directions=2, hook_unit_bytes=budget)
    losses = [float(opt.step(loss_fn)) for _ in range(steps)]
    return losses, _bits(m)


def _check_zosgd_same_bits(dtype, device):
    ref_losses, ref_w = _run_zosgd(dtype, None, device)
    start = _bits(_model(dtype, device)[0])
    assert not _same_bits(ref_w, start)  # the steps moved the weights
    for budget in BUDGETS:
        losses, w = _run_zosgd(dtype, budget, device)
        assert losses == ref_losses, budget
        assert _same_bits(w, ref_w), budget


@pytest.mark.parametrize("dtype", DTYPES)
def test_zosgd_units_bit_identical(dtype):
    _check_zosgd_same_bits(dtype, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_zosgd_units_bit_identical_cuda(dtype):
    _check_zosgd_same_bits(dtype, "cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher", "sphere"])
def test_grad_units_exact_restore(dtype, distribution):
    m, loss_fn = _model(dtype)
    before = _bits(m)
    ref = dk.zo.grad(loss_fn, m, seed=3, num_directions=2, distribution=distribution)
    for budget in BUDGETS:
        est = dk.zo.grad(loss_fn, m, seed=3, num_directions=2, distribution=distribution,
                         hook_unit_bytes=budget)
        assert torch.equal(est.losses, ref.losses), budget
        assert all(torch.equal(a, b) for a, b in zip(est.grads, ref.grads)), budget
        assert _same_bits(_bits(m), before), budget
    # The perturbation did move the loss (the hooks are live).
    assert ref.losses[0] != ref.losses[1]


def test_grad_units_restore_when_loss_raises():
    m, loss_fn = _model(torch.float16)
    before = _bits(m)
    calls = []

    def bad():
        calls.append(1)
        loss_fn()
        m.blocks[1](torch.zeros(2, 8, dtype=torch.float16))  # inside a unit, then raise
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        dk.zo.grad(bad, m, seed=1, hook_unit_bytes="auto")
    assert calls and _same_bits(_bits(m), before)
    assert all(p.data is not None for p in m.parameters())


def test_lora_like_frozen_base_untouched():
    m, loss_fn = _model(torch.bfloat16)
    for p in m.parameters():
        p.requires_grad_(False)
    m.blocks[0].scale.requires_grad_(True)
    m.blocks[2].inner.bias.requires_grad_(True)
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    ref = _run_losses = []
    for budget in [None, "auto", 1 << 30]:
        m2, loss2 = _model(torch.bfloat16)
        for n, p in m2.named_parameters():
            p.requires_grad_(n in ("blocks.0.scale", "blocks.2.inner.bias"))
        opt = dk.zo.ZOSGD(m2, lr=1e-2, seed=5, hook_unit_bytes=budget)
        _run_losses.append([float(opt.step(loss2)) for _ in range(2)])
        for n, p in m2.named_parameters():
            if not p.requires_grad:
                assert torch.equal(p, frozen[n]), n
    assert ref[0] == ref[1] == ref[2]


def test_bad_unit_bytes():
    m, _ = _model(torch.float32)
    with pytest.raises(TypeError):
        dk.zo.ZOSGD(m, lr=1.0, hook_unit_bytes=1.5)
    with pytest.raises(ValueError):
        dk.zo.ZOSGD(m, lr=1.0, hook_unit_bytes=-1)
