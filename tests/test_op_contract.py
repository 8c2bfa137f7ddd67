"""The op-contract checks themselves (tests/op_contract.py): each must catch the fault it
is written for, on a deliberately broken op, and pass a correct one."""
from __future__ import annotations

import pytest
import torch

from tests import op_contract as contract


def _good(x):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out.copy_(x * 2)
    return out


def _skips_last(x):
    out = torch.empty_like(x)
    out.view(-1)[:-1] = (x * 2).reshape(-1)[:-1]
    return out


def _ignores_strides(x):
    # Reads the storage as if the tensor were contiguous from its data pointer.
    flat = x.as_strided((x.numel(),), (1,), x.storage_offset())
    return (flat * 2).view(x.shape)


def test_poisoned_outputs_catches_an_unwritten_element():
    x = torch.rand(5, 7, dtype=torch.float64)
    contract.check_poisoned_outputs(_good, x)
    with pytest.raises(AssertionError):
        contract.check_poisoned_outputs(_skips_last, x)
    # An output torch computes itself proves nothing: said, not passed silently.
    with pytest.raises(AssertionError, match="prove nothing"):
        contract.check_poisoned_outputs(lambda t: t * 2, x)
    # The allocation functions are restored afterwards.
    assert torch.empty(3).shape == (3,) and "new_empty" not in vars(torch.Tensor)


def test_noncontiguous_catches_an_op_that_ignores_strides():
    x = torch.rand(5, 7, dtype=torch.float64)
    contract.check_noncontiguous(_good, x)
    for layout in ("transposed", "strided"):
        with pytest.raises(AssertionError):
            contract.check_noncontiguous(_ignores_strides, x, layouts=(layout,))
    with pytest.raises(AssertionError):  # an op that ignores the storage offset
        contract.check_noncontiguous(lambda t: t.as_strided(t.shape, t.stride(), 0) * 2, x,
                                     layouts=("offset",))
    g = x.clone().requires_grad_()
    contract.check_noncontiguous(lambda t: t * t.exp(), g)  # gradients through the views


def test_zero_size_and_compile():
    e = torch.empty(0, 3, dtype=torch.float64, requires_grad=True)
    contract.check_zero_size(lambda t: t.exp(), e, shape=(0, 3))
    with pytest.raises(AssertionError):
        contract.check_zero_size(lambda t: t.sum(), e)  # a 0-dim output is not empty
    contract.check_zero_size(torch.linalg.inv, torch.empty(0, 2), raises=RuntimeError)
    x = torch.rand(4, dtype=torch.float64, requires_grad=True)
    contract.check_compile(lambda t: (t.sin(), {"c": t.cos()}), x)
    def breaks(t):  # data-dependent Python control flow: a graph break
        return t * 2 if bool(t.sum() > 0) else t
    with pytest.raises(Exception, match="(?i)graph break|data-dependent|Unsupported"):
        contract.check_compile(breaks, x)
