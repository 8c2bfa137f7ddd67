"""Shared-prefix attention (dk.prefix_attention, dk.PrefixLayout) against dense float64
torch attention over the repeated form (tests/reference/attention_dense.py), plus the op
contract (opcheck, gradcheck, compile without recompiles, zero size, layouts, poisoned
outputs, determinism) and the CUDA rules (FlashAttention's error bound, graphs, streams).
"""
from __future__ import annotations

import math

import pytest
import torch

import diffkern as dk
from tests import op_contract as oc
from tests.reference.attention_dense import (dense_lse, dense_prefix_attention,
                                            flash_attention_rule)

# (prefix_lens, suffix_lens): ragged, several groups, G = 1, one-token and empty suffixes,
# an empty prefix, a long prefix (several key blocks of the CPU kernel).
LAYOUTS = {
    "ragged": ([5, 3, 7], [[3, 1, 4], [2], [6, 6, 1, 2]]),
    "g1": ([9], [[4]]),
    "one_token": ([4, 2], [[1, 1, 1], [1]]),
    "empty_suffix": ([6, 3], [[0, 5, 0], [2, 0]]),
    "empty_prefix": ([0, 4], [[3, 2], [5]]),
    "long_prefix": ([150], [[40, 70, 1]]),
}
HEADS = [pytest.param((4, 4), id="mha"), pytest.param((4, 2), id="gqa"),
         pytest.param((3, 1), id="mqa")]


def make_inputs(layout, heads, d, dtype=torch.float64, device="cpu", seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    T = layout.total_tokens
    hq, hkv = heads
    q, k, v = (torch.randn(T, h, d, generator=g, dtype=torch.float64).to(dtype).to(device)
               for h in (hq, hkv, hkv))
    if grad:
        for t in (q, k, v):
            t.requires_grad_()
    return q, k, v


def grads(out, inputs, seed=1, w_dtype=None):
    """Gradients of <out, w> for a fixed random w, rounded to ``w_dtype`` (default out's)
    first: comparisons across precisions then share the exact same upstream gradient."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64).to(w_dtype or out.dtype)
    return torch.autograd.grad((out * w.to(out.dtype).to(out.device)).sum(), inputs)


# ----------------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("heads", HEADS)
def test_float64_forward_and_gradients_match_dense_reference(name, heads):
    P, S = LAYOUTS[name]
    layout = dk.PrefixLayout.from_lengths(P, S)
    q, k, v = make_inputs(layout, heads, 16, grad=True)
    out, lse = dk.prefix_attention(q, k, v, layout, return_lse=True)
    ref = dense_prefix_attention(q, k, v, P, S)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # lse is float32 by contract: its rounding only.
    torch.testing.assert_close(lse.double(), dense_lse(q.detach(), k.detach(), P, S),
                               rtol=2e-7, atol=2e-7)
    got, want = grads(out, (q, k, v)), grads(ref, (q, k, v))
    for name_, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"d{name_}: {m}")


@pytest.mark.parametrize("name", ["ragged", "long_prefix", "empty_suffix"])
def test_float32_within_rounding_of_float64_reference(name):
    P, S = LAYOUTS[name]
    layout = dk.PrefixLayout.from_lengths(P, S)
    q, k, v = make_inputs(layout, (4, 2), 32, dtype=torch.float32, grad=True)
    out = dk.prefix_attention(q, k, v, layout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = dense_prefix_attention(q64, k64, v64, P, S)
    # The kernel accumulates in double: only the final rounding to float32 is left.
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(out.double(), ref, rtol=4 * eps, atol=4 * eps)
    for a, b in zip(grads(out, (q, k, v)), grads(ref, (q64, k64, v64))):
        torch.testing.assert_close(a.double(), b, rtol=50 * eps, atol=50 * eps)


def test_explicit_scale_and_head_dim_one():
    P, S = LAYOUTS["ragged"]
    layout = dk.PrefixLayout.from_lengths(P, S)
    q, k, v = make_inputs(layout, (2, 1), 1)
    torch.testing.assert_close(dk.prefix_attention(q, k, v, layout, scale=0.3),
                               dense_prefix_attention(q, k, v, P, S, scale=0.3),
                               rtol=1e-12, atol=1e-12)


def test_large_scores_stay_finite_and_exact():
    # Scores up to ~1e3: the online softmax rescales by the running maximum (a plain exp
    # would overflow); one row's weights then sit almost entirely on one key.
    P, S = LAYOUTS["ragged"]
    layout = dk.PrefixLayout.from_lengths(P, S)
    q, k, v = make_inputs(layout, (4, 2), 16, grad=True)
    with torch.no_grad():
        q.mul_(40.0)
    out = dk.prefix_attention(q, k, v, layout)
    ref = dense_prefix_attention(q, k, v, P, S)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_layout_to_keeps_cached_helpers():
    layout = dk.PrefixLayout.from_lengths([2], [[1, 3]])
    pos = layout.position_ids()
    moved = layout.to("meta")
    assert moved.device.type == "meta" and moved.position_ids().device.type == "meta"
    assert moved.segment_index.shape == layout.segment_index.shape
    assert layout.to("cpu").position_ids().tolist() == pos.tolist()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_on_cpu_computes_in_float32(dtype):
    P, S = LAYOUTS["ragged"]
    layout = dk.PrefixLayout.from_lengths(P, S)
    q, k, v = make_inputs(layout, (4, 2), 16, dtype=dtype, grad=True)
    out = dk.prefix_attention(q, k, v, layout)
    assert out.dtype == dtype
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = dk.prefix_attention(q32, k32, v32, layout)
    assert torch.equal(out, want.to(dtype))
    for a, b in zip(grads(out, (q, k, v)), grads(want, (q32, k32, v32))):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, rtol=1e-2, atol=1e-2)


def test_long_prefix_many_blocks_and_threads():
    # Keys span several 64-key blocks and query tiles span several 32-row tiles.
    P, S = [200, 70], [[90, 33], [129]]
    layout = dk.PrefixLayout.from_lengths(P, S)
    q, k, v = make_inputs(layout, (2, 1), 8, grad=True)
    out = dk.prefix_attention(q, k, v, layout)
    ref = dense_prefix_attention(q, k, v, P, S)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------- determinism


def test_deterministic_bits_across_runs_and_thread_counts():
    P, S = [130, 20], [[70, 3, 40], [5, 64]]
    layout = dk.PrefixLayout.from_lengths(P, S)
    q, k, v = make_inputs(layout, (4, 2), 16, dtype=torch.float32, grad=True)
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 1):
            torch.set_num_threads(threads)
            out = dk.prefix_attention(q, k, v, layout, deterministic=True)
            results.append((out.detach(), *grads(out, (q, k, v))))
    finally:
        torch.set_num_threads(saved)
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------- layout


def test_layout_index_tensors():
    layout = dk.PrefixLayout.from_lengths([3, 2], [[2, 0], [5]])
    seg = layout.segments.tolist()
    assert seg == [[0, 3, 5, 5, 7], [3, 2, 0, 2, 5], [0, 0, 0, 5, 5], [0, 3, 3, 0, 2]]
    assert layout.groups.tolist() == [[0, 3], [1, 4], [2, 1]]
    # Heaviest first: work = prefix_length + length: [3, 5, 3, 2, 7].
    assert layout.order.tolist() == [4, 1, 0, 2, 3]
    lengths = [3, 2, 0, 2, 5]
    want64 = [0]
    for i in layout.order.tolist():
        want64.append(want64[-1] + math.ceil(lengths[i] / 64))
    assert layout.order_tiles[0].tolist() == want64
    assert layout.order_tiles[1].tolist() == want64  # every length < 64
    assert layout.segment_index.shape == (7 * 5 + 2,) and layout.group_index.shape == (6,)
    assert layout.total_tokens == 12 and layout.num_members == 3
    assert layout.member_lengths() == [5, 3, 7]
    assert all(t.dtype == torch.int64 for t in (layout.segments, layout.order,
                                                 layout.order_tiles, layout.groups))


def test_position_ids_restart_at_prefix_length():
    layout = dk.PrefixLayout.from_lengths([3, 0], [[2, 1], [2]])
    assert layout.position_ids().tolist() == [0, 1, 2, 3, 4, 3, 0, 1]


def test_unpack_pack_expand():
    P, S = [3, 2], [[2, 0, 1], [4]]
    layout = dk.PrefixLayout.from_lengths(P, S)
    T = layout.total_tokens
    x = torch.arange(T, dtype=torch.float64)[:, None] * torch.tensor([1.0, 10.0])
    padded = layout.unpack(x, padding_value=-1)
    assert padded.shape == (4, 6, 2)
    assert padded[:, :, 0].tolist() == [[0, 1, 2, 3, 4, -1], [0, 1, 2, -1, -1, -1],
                                         [0, 1, 2, 5, -1, -1], [6, 7, 8, 9, 10, 11]]
    assert torch.equal(layout.pack(padded), x)
    assert layout.expand(x)[:, 0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 5,
                                               6, 7, 8, 9, 10, 11]
    # Gradients: expand sums over the copies of a prefix row.
    xg = x.clone().requires_grad_()
    layout.expand(xg).sum().backward()
    assert xg.grad[:, 0].tolist() == [3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1]


def test_gather_member_logprobs_matches_per_member_log_softmax():
    P, S = [3, 0], [[2, 0, 3], [2]]
    layout = dk.PrefixLayout.from_lengths(P, S)
    T, V = layout.total_tokens, 7
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(T, V, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (T,), generator=g)
    logp, mask = layout.gather_member_logprobs(logits, ids)
    assert logp.shape == mask.shape == (4, 3)
    full = torch.log_softmax(logits, -1)
    # Member 0: prefix 0..2, suffix 3..4; member 2: suffix 5..7; member 3 (no prompt): 8..9.
    want = {(0, 0): full[2, ids[3]], (0, 1): full[3, ids[4]],
            (2, 0): full[2, ids[5]], (2, 1): full[5, ids[6]], (2, 2): full[6, ids[7]],
            (3, 1): full[8, ids[9]]}
    assert mask.sum().item() == len(want)
    for (m, j), val in want.items():
        assert mask[m, j]
        torch.testing.assert_close(logp[m, j], val, rtol=1e-14, atol=1e-14)
    assert not mask[3, 0] and logp[~mask].eq(0).all()
    same, _ = layout.gather_member_logprobs(full.detach()[None], ids[None], normalized=True)
    torch.testing.assert_close(same, logp.detach(), rtol=1e-14, atol=1e-14)
    logp[mask].sum().backward()
    assert logits.grad is not None and logits.grad[1].eq(0).all()  # no completion reads row 1


@pytest.mark.parametrize("args, err, words", [
    (([3], [[2], [1]]), ValueError, "suffix_lens: expected one list per group"),
    (([3], [[]]), ValueError, "suffix_lens[0]: expected at least one completion"),
    (([-1], [[2]]), ValueError, "prefix_lens[0]: expected a non-negative integer"),
    (([2], [[1, -2]]), ValueError, "suffix_lens[0][1]"),
    (([2.5], [[1]]), TypeError, "prefix_lens[0]"),
    (([True], [[1]]), TypeError, "prefix_lens[0]"),
    ((3, [[1]]), TypeError, "prefix_lens: expected a list"),
    (([3], [2]), TypeError, "suffix_lens[0]: expected a list"),
])
def test_layout_errors_name_the_argument(args, err, words):
    with pytest.raises(err, match="PrefixLayout.from_lengths") as info:
        dk.PrefixLayout.from_lengths(*args)
    assert words in str(info.value)


# ---------------------------------------------------------------------- op contract


def _small():
    P, S = [4, 2], [[3, 1], [2, 0, 2]]
    layout = dk.PrefixLayout.from_lengths(P, S)
    return layout, make_inputs(layout, (4, 2), 8, grad=True)


def test_opcheck():
    layout, (q, k, v) = _small()
    args = (q, k, v, layout.segment_index, layout.group_index, 0.35, False)
    oc.check_opcheck(torch.ops.diffkern.prefix_attention_fwd.default, args)
    out = dk.prefix_attention(q, k, v, layout)
    _, lse = dk.prefix_attention(q, k, v, layout, return_lse=True)
    dout = torch.randn_like(out)
    bargs = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, layout.segment_index,
             layout.group_index, 0.35, True)
    oc.check_opcheck(torch.ops.diffkern.prefix_attention_bwd.default, bargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eager_autograd_path_equals_the_custom_op(dtype):
    """Eager calls that record autograd skip the custom op (an autograd.Function over the
    same kernels): the same bits as the op's registered autograd, and the same refusal of
    a double backward."""
    layout = dk.PrefixLayout.from_lengths(*LAYOUTS["ragged"])
    q, k, v = make_inputs(layout, (4, 2), 8, dtype=dtype, grad=True)
    out = dk.prefix_attention(q, k, v, layout, scale=0.3)
    assert "EagerPrefixAttention" in type(out.grad_fn).__name__  # the path under test
    op_out, _ = torch.ops.diffkern.prefix_attention_fwd(q, k, v, layout.segment_index,
                                                        layout.group_index, 0.3, False)
    assert "EagerPrefixAttention" not in type(op_out.grad_fn).__name__
    assert torch.equal(out, op_out)
    for a, b in zip(grads(out, (q, k, v)), grads(op_out, (q, k, v))):
        assert torch.equal(a, b)
    _, lse = dk.prefix_attention(q, k, v, layout, scale=0.3, return_lse=True)
    assert not lse.requires_grad
    out = dk.prefix_attention(q, k, v, layout, scale=0.3)
    gq, = torch.autograd.grad(out.sum(), q, create_graph=True)
    assert gq.requires_grad
    with pytest.raises(RuntimeError, match="no autograd formula"):
        gq.sum().backward()


def test_eager_autograd_path_under_checkpoint_and_in_place_edits():
    """The eager Function path with activation checkpointing (saved-tensor hooks) gives the
    plain gradients, and an input edited in place after the forward is refused."""
    from torch.utils.checkpoint import checkpoint

    layout = dk.PrefixLayout.from_lengths(*LAYOUTS["empty_suffix"])
    q, k, v = make_inputs(layout, (4, 2), 8, grad=True)
    f = lambda q, k, v: dk.prefix_attention(q, k, v, layout) * 1.5  # noqa: E731
    plain = grads(f(q, k, v), (q, k, v))
    ckpt = grads(checkpoint(f, q, k, v, use_reentrant=False), (q, k, v))
    for a, b in zip(plain, ckpt):
        assert torch.equal(a, b)
    x = q.detach().clone().requires_grad_()
    y = x * 1  # a non-leaf that the forward saves
    out = dk.prefix_attention(y, k, v, layout)
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_gradcheck_float64():
    layout = dk.PrefixLayout.from_lengths([3, 1], [[2, 1], [2]])
    q, k, v = make_inputs(layout, (2, 1), 3, grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: dk.prefix_attention(q, k, v, layout),
                                    (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-7)


def test_compile_fullgraph_matches_eager():
    layout, (q, k, v) = _small()
    oc.check_compile(lambda q, k, v: dk.prefix_attention(q, k, v, layout), q, k, v,
                     rtol=1e-14, atol=1e-14)


def test_compile_does_not_recompile_when_lengths_change():
    compiled_graphs = []

    def counting_backend(gm, example_inputs):
        compiled_graphs.append(gm)
        return gm.forward

    def f(q, k, v, layout):
        return dk.prefix_attention(q, k, v, layout) * 2

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, dynamic=True, backend=counting_backend)
    # Lengths, token counts, and the numbers of groups and segments all change: the
    # layout's tensors are op inputs, so nothing about them is baked into the graph. (The
    # first layout's sizes, T=21, 7 S + 2 = 51, 3 NG = 6, heads 4/2, head dim 8, are all
    # different: dynamo's duck sizing would tie two equal sizes, and none is 0 or 1.)
    for P, S in [([5, 3], [[2, 4], [3, 3, 1]]),
                 ([7, 2, 4], [[5, 2], [1, 2, 6], [2, 2]]),
                 ([3, 9, 1, 1], [[3, 3, 5, 1], [2, 7, 3], [4, 4], [2, 9]])]:
        layout = dk.PrefixLayout.from_lengths(P, S)
        q, k, v = make_inputs(layout, (4, 2), 8, grad=True)
        out = cf(q, k, v, layout)
        torch.testing.assert_close(out, 2 * dense_prefix_attention(q, k, v, P, S),
                                   rtol=1e-12, atol=1e-12)
        out.sum().backward()
    assert len(compiled_graphs) == 1, f"{len(compiled_graphs)} compilations for 3 layouts"


def test_zero_size():
    for P, S in [([], []), ([0], [[0, 0]])]:
        layout = dk.PrefixLayout.from_lengths(P, S)
        q, k, v = make_inputs(layout, (4, 2), 8, grad=True)
        out = oc.check_zero_size(lambda q, k, v: dk.prefix_attention(q, k, v, layout), q, k, v,
                                 shape=(0, 4, 8))
        assert out.shape == (0, 4, 8)
        _, lse = dk.prefix_attention(q, k, v, layout, return_lse=True)
        assert lse.shape == (4, 0)


def test_noncontiguous_inputs():
    layout, (q, k, v) = _small()
    oc.check_noncontiguous(lambda q, k, v: dk.prefix_attention(q, k, v, layout), q, k, v,
                           rtol=1e-14, atol=1e-14)
    # Token and head strides are free (no copy): q as a slice of a fused qkv projection,
    # and heads-major memory.
    T = layout.total_tokens
    qkv = torch.randn(T, 8, 8, dtype=torch.float64)
    qh = torch.randn(4, T, 8, dtype=torch.float64).transpose(0, 1)
    for qq, kk, vv in [(qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]), (qh, k.detach(), v.detach())]:
        assert not qq.is_contiguous()
        torch.testing.assert_close(dk.prefix_attention(qq, kk, vv, layout),
                                   dk.prefix_attention(qq.contiguous(), kk.contiguous(),
                                                       vv.contiguous(), layout),
                                   rtol=0, atol=0)


def test_poisoned_outputs_forward_and_backward():
    layout, (q, k, v) = _small()
    oc.check_poisoned_outputs(lambda q, k, v: dk.prefix_attention(q, k, v, layout,
                                                                  return_lse=True), q, k, v)

    def fwd_bwd(q, k, v):
        out = dk.prefix_attention(q, k, v, layout)
        return torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    oc.check_poisoned_outputs(fwd_bwd, q, k, v)


# -------------------------------------------------------------------------- errors


def test_errors_name_the_function_and_argument():
    layout, (q, k, v) = _small()
    q, k, v = q.detach(), k.detach(), v.detach()
    fn = dk.prefix_attention
    cases = [
        (lambda: fn(q, k.float(), v, layout), TypeError, "k: expected dtype torch.float64"),
        (lambda: fn(q, k, v[:, :1], layout), ValueError, "v: expected the shape of k"),
        (lambda: fn(q[:, :3], k, v, layout), ValueError, "heads_kv >= 1 dividing heads_q = 3"),
        (lambda: fn(q[1:], k[1:], v[1:], layout), ValueError, "q: expected 14 tokens"),
        (lambda: fn(q[0], k, v, layout), ValueError, "q: expected shape (T, heads_q, head_dim)"),
        (lambda: fn(q, k, v, "layout"), TypeError, "layout: expected a diffkern.PrefixLayout"),
        (lambda: fn(q.long(), k.long(), v.long(), layout), TypeError, "q: expected float16"),
        (lambda: fn(q, k, v, layout.to("meta")), ValueError, "layout: expected its index"),
        (lambda: fn(q, k.to("meta"), v, layout), ValueError, "k: expected device cpu"),
        (lambda: fn(q, k, v, layout, scale=float("nan")), ValueError, "scale"),
        (lambda: fn(q, k, v, layout, scale="1"), TypeError, "scale"),
    ]
    for call, err, words in cases:
        with pytest.raises(err, match="diffkern.prefix_attention") as info:
            call()
        assert words in str(info.value), str(info.value)


def test_bindings_refuse_out_of_range_layouts():
    from diffkern import _C
    layout, (q, k, v) = _small()
    q, k, v = q.detach(), k.detach(), v.detach()
    S = layout.num_segments
    seg = layout.segment_index.clone()
    seg[S + 1] = 100  # segment 1's length: past the end of the tokens
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32)
    gi = layout.group_index
    with pytest.raises(ValueError, match="prefix_attention_forward: segment_index: segment 1"):
        _C.prefix_attention_forward(q, k, v, out, lse, seg, gi, 0.5)
    with pytest.raises(ValueError, match="segment_index: expected shape"):
        _C.prefix_attention_forward(q, k, v, out, lse, seg[:-1], gi, 0.5)
    bad_groups = gi.clone()
    bad_groups[layout.num_groups] = S  # group 0's first suffix: past the segments
    with pytest.raises(ValueError, match="group_index: group 0"):
        _C.prefix_attention_forward(q, k, v, out, lse, layout.segment_index, bad_groups, 0.5)
    with pytest.raises(ValueError, match="prefix_attention_forward: lse: expected shape"):
        _C.prefix_attention_forward(q, k, v, out, lse.t(), layout.segment_index, gi, 0.5)
    with pytest.raises(ValueError, match="q: expected a contiguous last"):
        _C.prefix_attention_forward(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, out,
                                    lse, layout.segment_index, gi, 0.5)
    with pytest.raises(TypeError, match="k: expected dtype float64"):
        _C.prefix_attention_forward(q, k.float(), v, out, lse, layout.segment_index, gi, 0.5)


def test_self_check_rows_pass():
    from diffkern.checks import prefix_attention as chk
    rows = chk.run("cpu", quick=True)
    assert rows and all(r["status"] in ("ok", "info") for r in rows), rows
    assert chk.sanitizer_workload("cpu") > 0


# ------------------------------------------------------------------------------ CUDA

CUDA_SHAPES = [
    pytest.param(([64, 200], [[32, 100, 1], [0, 77]]), id="ragged"),
    pytest.param(([300], [[129]]), id="g1"),
    pytest.param(([1000, 17], [[257, 1, 64, 3], [64]]), id="long_prefix"),
]


def _torch_repeated(q, k, v, layout, dtype, scale=None):
    """Plain torch attention in `dtype` over the repeated form (the FlashAttention rule's
    baseline): the same math as the reference, computed in the low precision."""
    P, S = layout.prefix_lens, layout.suffix_lens
    return dense_prefix_attention(q.to(dtype), k.to(dtype), v.to(dtype), P, S, scale=scale)


def _flash_attention_rule(device, dtype, d, heads, lens, deterministic=False, scale=None):
    """FlashAttention's rule: error vs an fp32 reference <= 2x plain torch attention's own
    error in `dtype` (outputs), <= 3x (gradients), all sharing one upstream gradient."""
    P, S = lens
    layout = dk.PrefixLayout.from_lengths(P, S, device=device)
    q, k, v = make_inputs(layout, heads, d, dtype=dtype, device=device, grad=True)
    out = dk.prefix_attention(q, k, v, layout, deterministic=deterministic, scale=scale)
    g = grads(out, (q, k, v))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = dense_prefix_attention(q32, k32, v32, P, S, scale=scale)
    g_ref = grads(ref, (q32, k32, v32), w_dtype=dtype)
    ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
    base = _torch_repeated(ql, kl, vl, layout, dtype, scale=scale)
    g_base = grads(base, (ql, kl, vl))
    fails = flash_attention_rule([out, *g], [ref, *g_ref], [base, *g_base])
    assert not fails, fails


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_on_cpu_meets_flash_attention_rule(dtype):
    # The CPU computes halves in float32: well inside the rule (and this keeps the CUDA
    # test's code exercised where there is no GPU).
    _flash_attention_rule("cpu", dtype, 64, (4, 2), ([40, 9], [[5, 1, 0], [17]]))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("lens", CUDA_SHAPES)
def test_cuda_flash_attention_error_rule(cuda_device, dtype, d, heads, lens):
    _flash_attention_rule("cuda", dtype, d, heads, lens)


@pytest.mark.cuda
@pytest.mark.parametrize("scale", [2.0, 1e-3, 0.0, -0.125])
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_explicit_scales_meet_flash_attention_rule(cuda_device, scale, d):
    """Any finite scale: sharp (2), nearly flat (1e-3), flat (0: the mean of the visible
    values) and negative (the softmax favours the least similar keys)."""
    _flash_attention_rule("cuda", torch.bfloat16, d, (4, 2), ([300, 70], [[129, 1, 64], [5]]),
                          scale=scale)


@pytest.mark.cuda
def test_cuda_deterministic_bits(cuda_device):
    P, S = [500, 40], [[100, 3, 250], [64, 1]]
    layout = dk.PrefixLayout.from_lengths(P, S, device="cuda")
    q, k, v = make_inputs(layout, (8, 2), 128, dtype=torch.bfloat16, device="cuda", grad=True)
    runs = []
    for _ in range(3):
        out = dk.prefix_attention(q, k, v, layout, deterministic=True)
        runs.append((out.detach(), *grads(out, (q, k, v))))
    for r in runs[1:]:
        for a, b in zip(r, runs[0]):
            assert torch.equal(a, b)


# The CUDA backward splits a prefix key tile's query walk over C <= 4 blocks when the grid
# is too small to hide its one block (csrc/prefix_attention/pa_bwd_split.h);
# DK_PA_BWD_CHUNKS=1..4 forces C. This layout: a group of 8 members (ragged, one empty,
# several prefix key tiles with a ragged tail) and one of 2 (G < C: empty chunks, whose
# partials must be zeros). With one KV head the rule picks C = min(4, mean G = 5) on any
# GPU with 10 or more resident blocks.
SPLIT_LENS = ([200, 70], [[64, 1, 130, 0, 65, 33, 7, 100], [90, 2]])


def _backward_workspace_bytes(layout, heads, d, dtype, deterministic):
    from diffkern import _C
    return _C.prefix_attention_backward_workspace_bytes(
        layout.total_tokens, heads[0], heads[1], d, str(dtype).removeprefix("torch."),
        (layout.segment_index.shape[0] - 2) // 7, layout.num_groups, deterministic)


def _expected_workspace_bytes(layout, heads, d, chunks, deterministic):
    """delta, the atomic mode's float32 dQ, and 2 C float32 (T, Hkv, D) partials (C > 1)."""
    def align(b):
        return -(-b // 256) * 256
    T, (hq, hkv) = layout.total_tokens, heads
    need = align(T * hq * 4) + (0 if deterministic else align(T * hq * d * 4))
    return need + (align(2 * chunks * T * hkv * d * 4) if chunks > 1 else 0)


@pytest.mark.cuda
@pytest.mark.parametrize("chunks", ["rule", "1", "2", "3", "4"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_split_prefix_key_tiles_meet_flash_attention_rule(cuda_device, monkeypatch, chunks,
                                                               deterministic, dtype, d):
    if chunks == "rule":
        monkeypatch.delenv("DK_PA_BWD_CHUNKS", raising=False)
    else:
        monkeypatch.setenv("DK_PA_BWD_CHUNKS", chunks)
    heads = (4, 1)
    layout = dk.PrefixLayout.from_lengths(*SPLIT_LENS, device="cuda")
    # The path taken is the one asked for: the workspace holds exactly C chunks' partials.
    c = 4 if chunks == "rule" else int(chunks)
    assert _backward_workspace_bytes(layout, heads, d, dtype, deterministic) == \
        _expected_workspace_bytes(layout, heads, d, c, deterministic)
    _flash_attention_rule("cuda", dtype, d, heads, SPLIT_LENS, deterministic=deterministic)


@pytest.mark.cuda
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_many_query_heads_per_kv_head_take_the_dq_kernel(cuda_device, d):
    """With >= 32 query heads per KV head the other mode computes dQ with the deterministic
    mode's kernel (their atomics would collide; pa_kernels.h dq_by_kernel): no dQ
    accumulator in its workspace, the same bits as the deterministic mode, and
    FlashAttention's error rule. With 16 per KV head it keeps the atomics."""
    layout = dk.PrefixLayout.from_lengths(*SPLIT_LENS, device="cuda")
    dtype = torch.bfloat16
    for heads, kernel in (((32, 1), True), ((64, 2), True), ((16, 1), False)):
        atomic_ws = _backward_workspace_bytes(layout, heads, d, dtype, False)
        det_ws = _backward_workspace_bytes(layout, heads, d, dtype, True)
        assert (atomic_ws == det_ws) == kernel, heads
    q, k, v = make_inputs(layout, (32, 1), d, dtype=dtype, device="cuda", grad=True)
    runs = []
    for det in (True, False):
        out = dk.prefix_attention(q, k, v, layout, deterministic=det)
        runs.append(grads(out, (q, k, v)))
    for x, y in zip(*runs):
        assert torch.equal(x, y)
    _flash_attention_rule("cuda", dtype, d, (32, 1), SPLIT_LENS)


# The KV kernel holds 64 or 128 keys per block (pa_kernels.h bwd_kv_key_tile; 128 by default
# for head dim 128); DK_PA_BWD_KEYS forces either, for both head dims. These layouts put the
# 128-key tiles' edges everywhere: a prefix of 300 (a ragged third tile), own suffixes
# longer than 128 (query tiles of 64 on both halves of a key tile's diagonal), one-token and
# empty suffixes, and a segment of 129.
KEY_TILE_LENS = ([300, 64, 1, 129], [[100, 1, 0, 257], [64], [5, 3], [128, 127]])


@pytest.mark.cuda
@pytest.mark.parametrize("chunks", ["1", "3"])
@pytest.mark.parametrize("keys", ["64", "128"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_kv_key_tiles_meet_flash_attention_rule(cuda_device, monkeypatch, chunks, keys,
                                                     dtype, d):
    monkeypatch.setenv("DK_PA_BWD_KEYS", keys)
    monkeypatch.setenv("DK_PA_BWD_CHUNKS", chunks)
    for heads in ((4, 4), (8, 2)):
        _flash_attention_rule("cuda", dtype, d, heads, KEY_TILE_LENS)
    _flash_attention_rule("cuda", dtype, d, (4, 1), SPLIT_LENS)


# On Hopper (compute capability 9.0) the head-dim-128 forward runs on warpgroup MMA
# (csrc/prefix_attention/pa_fwd_sm90.cuh); DK_PA_FWD_SM90=0 forces the mma.sync forward
# that every other GPU runs. Both meet the rule and give the float64 log-sum-exp to float32
# rounding, for every scale sign (the Hopper softmax takes the raw scores' row minimum for
# a negative scale) and on layouts with key-tile edges everywhere.
@pytest.mark.cuda
@pytest.mark.parametrize("scale", [None, 0.0, -0.3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("sm90", ["1", "0"], ids=["wgmma", "mma_sync"])
def test_cuda_forward_paths_meet_flash_attention_rule(cuda_device, monkeypatch, sm90, dtype,
                                                      scale):
    monkeypatch.setenv("DK_PA_FWD_SM90", sm90)
    for heads, lens in (((4, 4), KEY_TILE_LENS), ((8, 2), KEY_TILE_LENS), ((4, 1), SPLIT_LENS)):
        _flash_attention_rule("cuda", dtype, 128, heads, lens, scale=scale)
        layout = dk.PrefixLayout.from_lengths(*lens, device="cuda")
        q, k, v = make_inputs(layout, heads, 128, dtype=dtype, device="cuda")
        _, lse = dk.prefix_attention(q, k, v, layout, scale=scale, return_lse=True)
        ref = dense_lse(q.double().cpu(), k.double().cpu(), *lens, scale=scale)
        torch.testing.assert_close(lse.double().cpu(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_kv_key_tiles_agree(cuda_device, monkeypatch, d):
    """The key tile changes which block sums a key's dK/dV, not the sum: every key row adds
    the same products over the same query tiles in the same order (a 128-key block's own
    walk starts one query tile earlier for its upper 64 keys, where they are all masked and
    add exact zeros), and the deterministic mode's dQ kernel does not depend on it. So the
    deterministic gradients are the same bits with 64 and 128 keys, and repeat."""
    # The mma.sync kernels' claim: the Hopper KV kernel (128 keys, head dim 128) sums in
    # other orders inside its wgmma, so its bits differ (test below).
    monkeypatch.setenv("DK_PA_BWD_SM90", "0")
    layout = dk.PrefixLayout.from_lengths(*KEY_TILE_LENS, device="cuda")
    q, k, v = make_inputs(layout, (8, 2), d, dtype=torch.bfloat16, device="cuda", grad=True)
    res = {}
    for keys in ("64", "128", "128"):
        monkeypatch.setenv("DK_PA_BWD_KEYS", keys)
        out = dk.prefix_attention(q, k, v, layout, deterministic=True)
        res.setdefault(keys, []).append(grads(out, (q, k, v)))
    for x, y in zip(*res["128"]):
        assert torch.equal(x, y)
    for x, y in zip(res["64"][0], res["128"][0]):
        assert torch.equal(x, y)


# On Hopper the backward's KV kernel with 128 keys at head dim 128 can run on warpgroup MMA
# (csrc/prefix_attention/pa_bwd_kv_sm90.cuh; on by default there, pa_kernels.h):
# DK_PA_BWD_SM90=1 / 0 forces it or the mma.sync kernel.
# Both meet the rule in both modes, unsplit and split (float32 partials), with GQA/MQA, and
# the Hopper kernel's deterministic mode repeats its bits.
@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("sm90", ["1", "0"], ids=["wgmma", "mma_sync"])
def test_cuda_backward_paths_meet_flash_attention_rule(cuda_device, monkeypatch, sm90, dtype,
                                                       deterministic):
    monkeypatch.setenv("DK_PA_BWD_SM90", sm90)
    monkeypatch.setenv("DK_PA_BWD_KEYS", "128")
    for chunks in ("1", "3"):
        monkeypatch.setenv("DK_PA_BWD_CHUNKS", chunks)
        for heads, lens in (((4, 4), KEY_TILE_LENS), ((8, 2), KEY_TILE_LENS),
                            ((4, 1), SPLIT_LENS)):
            _flash_attention_rule("cuda", dtype, 128, heads, lens, deterministic=deterministic)
    if deterministic:
        layout = dk.PrefixLayout.from_lengths(*SPLIT_LENS, device="cuda")
        q, k, v = make_inputs(layout, (8, 2), 128, dtype=dtype, device="cuda", grad=True)
        runs = [grads(dk.prefix_attention(q, k, v, layout, deterministic=True), (q, k, v))
                for _ in range(2)]
        for a, b in zip(*runs):
            assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("chunks", ["rule", "3"])
def test_cuda_split_deterministic_bits_and_modes_agree(cuda_device, monkeypatch, chunks):
    if chunks == "rule":
        monkeypatch.delenv("DK_PA_BWD_CHUNKS", raising=False)
    else:
        monkeypatch.setenv("DK_PA_BWD_CHUNKS", chunks)
    layout = dk.PrefixLayout.from_lengths(*SPLIT_LENS, device="cuda")
    q, k, v = make_inputs(layout, (8, 2), 128, dtype=torch.bfloat16, device="cuda", grad=True)
    runs = {}
    for det in (True, True, False):
        out = dk.prefix_attention(q, k, v, layout, deterministic=det)
        runs.setdefault(det, []).append(grads(out, (q, k, v)))
    (a, b), (c,) = runs[True], runs[False]
    for x, y in zip(a, b):  # dq, dk, dv: the same bits every deterministic run
        assert torch.equal(x, y)
    # dK/dV do not depend on the mode: the chunks' partials are summed in a fixed order in
    # both (only dQ is atomic in the other mode).
    assert torch.equal(a[1], c[1]) and torch.equal(a[2], c[2])


@pytest.mark.cuda
def test_cuda_graph_replay_equals_eager(cuda_device):
    layout = dk.PrefixLayout.from_lengths([100, 30], [[20, 1, 64], [7]], device="cuda")

    def fwd_bwd(q, k, v):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out = dk.prefix_attention(q, k, v, layout, deterministic=True)
        return (out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))

    sets = [make_inputs(layout, (4, 2), 64, dtype=torch.float16, device="cuda", seed=s)
            for s in (0, 1, 2)]
    oc.check_cuda_graph(fwd_bwd, sets)


@pytest.mark.cuda
def test_cuda_side_stream(cuda_device):
    layout = dk.PrefixLayout.from_lengths([100, 30], [[20, 1, 64], [7]], device="cuda")
    q, k, v = make_inputs(layout, (4, 2), 128, dtype=torch.bfloat16, device="cuda")
    oc.check_side_stream(lambda q, k, v: dk.prefix_attention(q, k, v, layout,
                                                             deterministic=True), q, k, v)


@pytest.mark.cuda
def test_cuda_noncontiguous_and_misaligned_inputs(cuda_device):
    # Transposed memory, every other element, and a storage offset of 3 elements (not
    # 16-byte aligned: copied before the kernels, which copy 16-byte vectors).
    layout = dk.PrefixLayout.from_lengths([40, 9], [[5, 1], [0, 17]], device="cuda")
    q, k, v = make_inputs(layout, (4, 2), 64, dtype=torch.bfloat16, device="cuda", grad=True)
    oc.check_noncontiguous(lambda q, k, v: dk.prefix_attention(q, k, v, layout,
                                                               deterministic=True), q, k, v)


@pytest.mark.cuda
def test_cuda_rejects_unsupported_dtype_and_head_dim(cuda_device):
    layout = dk.PrefixLayout.from_lengths([4], [[2]], device="cuda")
    q, k, v = make_inputs(layout, (2, 2), 64, dtype=torch.float32, device="cuda")
    with pytest.raises(TypeError, match="diffkern.prefix_attention: q: on CUDA expected float16"):
        dk.prefix_attention(q, k, v, layout)
    q, k, v = make_inputs(layout, (2, 2), 32, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="head_dim in"):
        dk.prefix_attention(q, k, v, layout)


# ------------------------------------------------------------------------ properties

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # a test extra
    given = None

if given is not None:
    _groups = st.lists(
        st.tuples(st.integers(0, 12), st.lists(st.integers(0, 6), min_size=1, max_size=4)),
        min_size=1, max_size=3)

    # Bounded (each example is a small dense reference) and, through the "ci" profile of
    # tests/conftest.py, derandomized.
    @settings(max_examples=40)
    @given(groups=_groups, heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]),
           d=st.sampled_from([1, 4, 9]), seed=st.integers(0, 2**16))
    def test_property_random_layouts_match_dense_reference(groups, heads, d, seed):
        P = [p for p, _ in groups]
        S = [s for _, s in groups]
        layout = dk.PrefixLayout.from_lengths(P, S)
        q, k, v = make_inputs(layout, heads, d, seed=seed, grad=True)
        out = dk.prefix_attention(q, k, v, layout)
        ref = dense_prefix_attention(q, k, v, P, S)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        if layout.total_tokens:
            for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        # The helpers agree with the lengths: positions, expand and pack/unpack.
        pos = layout.position_ids().tolist()
        want_pos = []
        for p, ss in zip(P, S):
            want_pos += list(range(p))
            for s in ss:
                want_pos += list(range(p, p + s))
        assert pos == want_pos
        x = torch.arange(layout.total_tokens, dtype=torch.float64)[:, None]
        assert torch.equal(layout.pack(layout.unpack(x)), x)
        assert layout.expand(x).shape[0] == sum(layout.member_lengths())
