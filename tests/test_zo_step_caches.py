"""What dk.zo keeps across calls to save host time (the optimizers' hook units of the module
path, lists of tensors checked before by signature, descriptors by pointer) never changes a
result: a cached step equals a fresh optimizer's step bit for bit, and every change to the
model between steps (a module replaced, a parameter re-allocated or converted, the unit
budget) is seen."""
import numpy as np
import pytest
import torch
from torch import nn

import diffkern as dk
from diffkern import _zo_hooks, _zo_kernels as K

# TinyLM: tied weights, a frozen layer, nested units; _model(dtype) builds it with its loss.
from test_zo_hook_units import _bits as _state, _model  # noqa: E402


def _equal(a, b):
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("unit", [None, "auto", 10**9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cached_steps_equal_fresh_optimizers(unit, dtype):
    """Step s of one optimizer (caches warm from steps 0..s-1) equals step s of an
    optimizer created just before it (cold caches, step counter restored)."""
    m1, f1 = _model(dtype)
    m2, f2 = _model(dtype)
    opt = dk.zo.ZOSGD(m1, lr=1e-2, eps=1e-2, seed=3, history=False, hook_unit_bytes=unit)
    for s in range(4):
        l1 = opt.step(f1)
        fresh = dk.zo.ZOSGD(m2, lr=1e-2, eps=1e-2, seed=3, history=False, hook_unit_bytes=unit)
        fresh._step_count = s
        l2 = fresh.step(f2)
        assert torch.equal(l1, l2)
        assert _equal(_state(m1), _state(m2)), f"step {s}"


def test_unit_plan_is_reused_and_rebuilt_on_change():
    m, _ = _model(torch.float32)
    groups = [[p for p in m.parameters() if p.requires_grad]]
    where = {id(p): (0, t) for t, p in enumerate(groups[0])}
    cache = {}
    first = _zo_hooks.cached_units(cache, m, groups, where, None)
    assert _zo_hooks.cached_units(cache, m, groups, where, None) is first
    # Another budget, a replaced module, a converted parameter: a new plan each time.
    coarse = _zo_hooks.cached_units(cache, m, groups, where, 10**9)
    assert coarse is not first and len(coarse) < len(first)
    m.blocks[1].inner = nn.Linear(8, 8)
    groups = [[p for p in m.parameters() if p.requires_grad]]
    where = {id(p): (0, t) for t, p in enumerate(groups[0])}
    replaced = _zo_hooks.cached_units(cache, m, groups, where, 10**9)
    assert replaced is not coarse
    hooked = {id(p) for _, u in replaced for p in u.params}
    assert id(m.blocks[1].inner.weight) in hooked
    m.blocks[0].scale.data = m.blocks[0].scale.data.half()
    converted = _zo_hooks.cached_units(cache, m, groups, where, 10**9)
    assert converted is not replaced


def test_replaced_module_is_perturbed_and_updated_after_caching():
    """A module swapped in between steps gets perturbed (its loss changes the estimate) and
    updated, exactly as with a fresh optimizer."""
    m1, f1 = _model(torch.float32)
    m2, f2 = _model(torch.float32)
    opt = dk.zo.ZOSGD(m1, lr=1e-2, eps=1e-2, seed=5, history=False, hook_unit_bytes="auto")
    opt.step(f1)
    fresh0 = dk.zo.ZOSGD(m2, lr=1e-2, eps=1e-2, seed=5, history=False, hook_unit_bytes="auto")
    fresh0.step(f2)
    for m in (m1, m2):
        torch.manual_seed(9)
        m.blocks[2].inner = nn.Linear(8, 8)
    # The optimizer's param groups still hold the old tensors; rebuild both the same way.
    opt = dk.zo.ZOSGD(m1, lr=1e-2, eps=1e-2, seed=5, history=False, hook_unit_bytes="auto")
    opt._step_count = 1
    opt.step(f1)  # warm
    fresh = dk.zo.ZOSGD(m2, lr=1e-2, eps=1e-2, seed=5, history=False, hook_unit_bytes="auto")
    fresh._step_count = 1
    fresh.step(f2)
    assert _equal(_state(m1), _state(m2))


def test_reallocated_parameter_is_updated_not_its_old_storage():
    """The update's checked list notices a parameter whose storage was replaced between
    steps (p.data = ...) and writes the new storage."""
    m1, f1 = _model(torch.float32)
    m2, f2 = _model(torch.float32)
    opt1 = dk.zo.ZOSGD(m1, lr=1e-2, eps=1e-2, seed=7, history=False)
    opt2 = dk.zo.ZOSGD(m2, lr=1e-2, eps=1e-2, seed=7, history=False)
    opt1.step(f1)
    opt2.step(f2)
    for m in (m1, m2):
        w = m.blocks[0].inner.weight
        old = w.data
        w.data = old.clone()
        old.fill_(123.0)  # the stale storage: must not be read or written
    opt1.step(f1)
    fresh = dk.zo.ZOSGD(m2, lr=1e-2, eps=1e-2, seed=7, history=False)
    fresh._step_count = 1
    fresh.step(f2)
    assert _equal(_state(m1), _state(m2))
    assert bool((m1.blocks[0].inner.weight != 123.0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_list_cache_same_bits(dtype):
    """perturb_/update_/sum_sq on a list whose signature is cached give the bits of a cold
    call (the cache cleared before each reference call)."""
    torch.manual_seed(0)
    a = [torch.randn(n, dtype=dtype) for n in (1, 7, 64, 1001)]
    b = [x.clone() for x in a]
    terms = [(11, 0, 0.5), (11, 1, -0.25)]
    for step in range(3):
        K._LIST_CACHE.clear()
        K.update_(a, terms, 0.1, 0.01, "gaussian")
        K.perturb_(a, 5, step, 0.3, "rademacher", tensor_ids=[3, 1, 2, 0])
        K.update_(b, terms, 0.1, 0.01, "gaussian")  # warm after the first step
        K.perturb_(b, 5, step, 0.3, "rademacher", tensor_ids=[3, 1, 2, 0])
        assert _equal(a, b)
    assert K.sum_sq(b, 3, 1).item() == K.sum_sq(a, 3, 1).item()


def test_list_cache_rechecks_a_changed_list():
    t = torch.randn(10)
    K.update_([t], [(1, 0, 1.0)], 0.1)  # cached
    t.data = torch.randn(5, 2).t()  # the same object, now a non-contiguous view
    with pytest.raises(ValueError, match="contiguous"):
        K.update_([t], [(1, 0, 1.0)], 0.1)
    t.data = torch.randn(10).double()
    with pytest.raises(TypeError, match="dtype"):
        K.perturb_([t], 1, 0, 1.0)
    u = torch.randn(10)
    K.perturb_([u], 1, 0, 1.0)
    with pytest.raises(TypeError, match="tensor"):
        K.perturb_([u, "not a tensor"], 1, 0, 1.0)
    with pytest.raises(ValueError, match="tensor_ids"):
        K.perturb_([u], 1, 0, 1.0, tensor_ids=[0, 1])
    with pytest.raises(TypeError):
        K.perturb_([u], 1, 0, 1.0, tensor_ids=[np.int64(0)])  # only exact ints are cached
    # A reallocated tensor (new pointer): its new storage is written, the old one is not.
    old = u.data
    u.data = old.clone()
    before = old.clone()
    K.perturb_([u], 1, 1, 1.0)
    assert torch.equal(old, before) and not torch.equal(u, before)


def test_update_checks_its_arguments_with_a_cached_list():
    x = [torch.zeros(4)]
    K.update_(x, [(1, 0, 1.0)], 0.1)
    with pytest.raises(ValueError, match="triples"):
        K.update_(x, [], 0.1)
    with pytest.raises(TypeError, match="lr"):
        K.update_(x, [(1, 0, 1.0)], "fast")


def test_perturb_into_trusted_cache_same_bits():
    torch.manual_seed(1)
    src = [torch.randn(n, dtype=torch.bfloat16) for n in (3, 50, 400)]
    ids = [4, 0, 9]
    plain = [torch.empty_like(s) for s in src]
    K.perturb_into_trusted(plain, src, 21, 2, 1e-2, K.KERNEL_CODES["gaussian"], ids)
    cache = {}
    for _ in range(3):  # a miss, then hits on the same pointers
        dst = [torch.empty_like(s) for s in src]
        K.perturb_into_trusted(dst, src, 21, 2, 1e-2, K.KERNEL_CODES["gaussian"], ids, cache)
        assert _equal(dst, plain)
    assert 1 <= len(cache) <= 8


def test_list_cache_key_follows_the_inline_rows_switch(monkeypatch):
    """tests/test_fd_grad_paths.py compares the by-value and device-row paths by switching
    _INLINE_ROWS on lists whose tensors may reuse freed addresses: a cached list must not
    carry rows built under the other setting."""
    x = [torch.zeros(16)]
    K._LIST_CACHE.clear()
    K.perturb_(x, 1, 0, 1.0)
    monkeypatch.setattr(K, "_INLINE_ROWS", 0)
    K.perturb_(x, 1, 1, 1.0)
    assert len(K._LIST_CACHE) == 2
