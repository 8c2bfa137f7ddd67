"""Shared-prefix attention around the kernel: the dense reference, and the Hugging Face
transformers adapter (``diffkern.integrations.transformers_attention``).

- The reference (tests/reference/prefix_attention_ref.py) against a naive loop written
  independently here: members sliced by hand, one query row at a time, float64; outputs
  and gradients.
- The adapter, twice: with the reference standing in for ``dk.prefix_attention`` (tests
  the plumbing: q/k/v layout, position ids, kwargs through the model; runs without the
  kernel), and with the real ``dk.prefix_attention`` and ``dk.PrefixLayout`` (skipped only
  when this diffkern has no ``prefix_attention`` at all). In both, a tiny Llama and a tiny
  Qwen2 (GQA, built from configs, no downloads) run a packed shared-prefix batch whose
  logits and parameter gradients must equal those of running each member on its own with
  transformers' SDPA attention, in float64.
"""
from __future__ import annotations

import math

import pytest
import torch

import diffkern as dk
from tests.reference import prefix_attention_ref as R

# Ragged layouts: G = 1, an empty suffix, a one-token suffix, a group without members.
LAYOUTS = [
    pytest.param([5], [[3]], id="one-member"),
    pytest.param([4, 6], [[2, 1, 3], [4, 1]], id="ragged"),
    pytest.param([3, 2, 5], [[0, 2], [], [1, 1, 1, 4]], id="empty-suffix-and-group"),
]


def _naive(q, k, v, prefix_lens, suffix_lens, scale):
    """Packed output, by slicing each member out by hand and looping over query rows."""
    hq, hkv = q.shape[1], k.shape[1]
    out = torch.zeros_like(q)
    prefix_rows = {}
    start = 0

    def attend(qs, ks, vs):
        rows = []
        for i in range(qs.shape[0]):  # query row i sees keys 0..i of its member
            heads = []
            for h in range(hq):
                kh, vh = ks[: i + 1, h // (hq // hkv)], vs[: i + 1, h // (hq // hkv)]
                w = torch.softmax((kh @ qs[i, h]) * scale, dim=0)
                heads.append(w @ vh)
            rows.append(torch.stack(heads))
        return torch.stack(rows) if rows else qs.new_zeros((0,) + qs.shape[1:])

    for g, (p, sl) in enumerate(zip(prefix_lens, suffix_lens)):
        pre = slice(start, start + p)
        pos = start + p
        members = []
        for s in sl:
            suf = slice(pos, pos + s)
            mq, mk, mv = (torch.cat([x[pre], x[suf]]) for x in (q, k, v))
            o = attend(mq, mk, mv)
            out[suf] = o[p:]
            members.append(o[:p])
            pos += s
        prefix_rows[g] = members if members else [attend(q[pre], k[pre], v[pre])]
        out[pre] = prefix_rows[g][0]
        start = pos
    return out, prefix_rows


@pytest.mark.parametrize("prefix_lens,suffix_lens", LAYOUTS)
@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (3, 1)], ids=["mha", "gqa", "mqa"])
def test_reference_matches_naive_loop(prefix_lens, suffix_lens, heads):
    g = torch.Generator().manual_seed(0)
    T = R.total_tokens(prefix_lens, suffix_lens)
    hq, hkv = heads
    d = 8
    q, k, v = (torch.randn(T, h, d, dtype=torch.float64, generator=g).requires_grad_()
               for h in (hq, hkv, hkv))
    scale = 0.7 / math.sqrt(d)
    ref = R.reference_prefix_attention(q, k, v, prefix_lens, suffix_lens, scale=scale)
    naive, prefix_rows = _naive(q, k, v, prefix_lens, suffix_lens, scale)
    torch.testing.assert_close(ref, naive, rtol=1e-13, atol=1e-13)
    # Every member computes the same prefix outputs (the reason they can be shared).
    for rows in prefix_rows.values():
        for r in rows[1:]:
            torch.testing.assert_close(r, rows[0], rtol=1e-13, atol=1e-13)
    w = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    g_naive = torch.autograd.grad((naive * w).sum(), (q, k, v))
    for a, b in zip(g_ref, g_naive):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_reference_helpers():
    P, S = [3, 2], [[2, 0, 1], [3]]
    assert R.member_position_ids(P, S).tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 2, 3, 4]
    x = torch.arange(R.total_tokens(P, S))
    assert [m.tolist() for m in R.expand_members(x, P, S)] == [
        [0, 1, 2, 3, 4], [0, 1, 2], [0, 1, 2, 5], [6, 7, 8, 9, 10]]
    pred, tgt, mem = R.completion_logprob_index(P, S)
    # a suffix's first token is predicted by the last prefix token, the rest by their left
    assert tgt.tolist() == [3, 4, 5, 8, 9, 10]
    assert pred.tolist() == [2, 3, 2, 7, 8, 9]
    assert mem.tolist() == [0, 0, 2, 3, 3, 3]
    with pytest.raises(ValueError, match="prefix_lens has 2 groups but suffix_lens has 1"):
        R.total_tokens([1, 2], [[1]])


# ------------------------------------------------------------------------------- adapter


@pytest.fixture
def dkt():
    """The adapter module (transformers is optional: skip without it; any other import
    error of the adapter fails the test)."""
    pytest.importorskip("transformers")
    from diffkern.integrations import transformers_attention

    return transformers_attention


HAS_KERNEL = hasattr(dk, "prefix_attention")


class _RefLayout:
    """Stands in for dk.PrefixLayout when the reference stands in for the kernel."""

    def __init__(self, prefix_lens, suffix_lens):
        self.prefix_lens, self.suffix_lens = prefix_lens, suffix_lens

    def position_ids(self):
        return R.member_position_ids(self.prefix_lens, self.suffix_lens)


def _ref_kernel(q, k, v, layout, *, scale=None, **_):
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1  # head dim contiguous
    assert q._base is not None and k._base is not None  # views of transformers' tensors
    return R.reference_prefix_attention(q, k, v, layout.prefix_lens, layout.suffix_lens,
                                        scale=scale)


def _tiny_model(kind: str):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  attention_dropout=0.0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    return model.to(torch.float64).train()


def _set_attn(model, name):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older transformers: the layers read the config at every call
        model.config._attn_implementation = name


def _packed_vs_members(dkt, model, layout, prefix_lens, suffix_lens):
    """(packed logits, per-member logits, packed grads, per-member grads)."""
    g = torch.Generator().manual_seed(1)
    T = R.total_tokens(prefix_lens, suffix_lens)
    ids = torch.randint(0, model.config.vocab_size, (T,), generator=g)
    pred, tgt, mem = R.completion_logprob_index(prefix_lens, suffix_lens)
    n_members = sum(len(s) for s in suffix_lens)
    adv = torch.randn(n_members, dtype=torch.float64, generator=g)
    params = [p for p in model.parameters() if p.requires_grad]

    _set_attn(model, dkt.ATTN_IMPLEMENTATION)
    logits = model(input_ids=ids[None], **dkt.forward_kwargs(layout)).logits[0]
    logp = torch.log_softmax(logits, -1)[pred, ids[tgt]]
    loss = -(adv[mem] * logp).sum()
    grads_packed = torch.autograd.grad(loss, params)

    _set_attn(model, "sdpa")  # (eager takes its softmax in float32)
    member_logits, loss_m = [], 0.0
    for m, idx in enumerate(R.member_indices(prefix_lens, suffix_lens)):
        lg = model(input_ids=ids[idx][None], use_cache=False).logits[0]
        member_logits.append(lg)
        p = len(idx) - int((mem == m).sum())
        lp = torch.log_softmax(lg[p - 1:-1], -1).gather(1, ids[idx][p:, None])[:, 0]
        loss_m = loss_m - (adv[m] * lp).sum()
    grads_members = torch.autograd.grad(loss_m, params)
    return logits, member_logits, grads_packed, grads_members


def _check(dkt, model, layout, prefix_lens, suffix_lens, tol):
    logits, member_logits, gp, gm = _packed_vs_members(dkt, model, layout, prefix_lens,
                                                       suffix_lens)
    for idx, lg in zip(R.member_indices(prefix_lens, suffix_lens), member_logits):
        torch.testing.assert_close(logits[idx], lg, rtol=tol, atol=tol)
    # transformers' RMSNorm computes in float32 even in a float64 model, and the packed
    # form sums a prefix row's gradient over the members before that norm's backward while
    # the per-member form sums after it: the same math, rounded at float32 level.
    for a, b in zip(gp, gm):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6 * float(b.abs().max()) + tol)


ADAPTER_LAYOUTS = [
    pytest.param([6, 4], [[3, 1, 5], [2, 2]], id="two-groups"),
    pytest.param([7], [[4]], id="G1"),
]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("prefix_lens,suffix_lens", ADAPTER_LAYOUTS)
def test_adapter_plumbing_with_reference_kernel(dkt, kind, prefix_lens, suffix_lens,
                                                monkeypatch):
    monkeypatch.setattr(dk, "prefix_attention", _ref_kernel, raising=False)
    model = _tiny_model(kind)
    _check(dkt, model, _RefLayout(prefix_lens, suffix_lens), prefix_lens, suffix_lens, 1e-10)


@pytest.mark.skipif(not HAS_KERNEL, reason="diffkern.prefix_attention not in this build yet")
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("prefix_lens,suffix_lens", ADAPTER_LAYOUTS)
def test_adapter_with_kernel(dkt, kind, prefix_lens, suffix_lens):
    model = _tiny_model(kind)
    layout = dk.PrefixLayout.from_lengths(prefix_lens, suffix_lens)
    pos = layout.position_ids().reshape(-1)
    assert pos.tolist() == R.member_position_ids(prefix_lens, suffix_lens).tolist()
    _check(dkt, model, layout, prefix_lens, suffix_lens, 1e-9)


@pytest.mark.skipif(not HAS_KERNEL, reason="diffkern.prefix_attention not in this build yet")
def test_adapter_with_kernel_context_manager(dkt):
    """The layout given by the context manager instead of a keyword argument; the
    deterministic flag reaches the kernel (the CPU kernels are deterministic anyway)."""
    model = _tiny_model("llama")
    P, S = [5], [[2, 3]]
    layout = dk.PrefixLayout.from_lengths(P, S)
    ids = torch.randint(0, model.config.vocab_size, (R.total_tokens(P, S),))
    _set_attn(model, dkt.ATTN_IMPLEMENTATION)
    kw = dkt.forward_kwargs(layout)
    kw.pop(dkt.LAYOUT_KWARG)
    with torch.no_grad():
        with dkt.prefix_layout(layout):
            a = model(input_ids=ids[None], **kw).logits
        b = model(input_ids=ids[None], **dkt.forward_kwargs(layout)).logits
        c = model(input_ids=ids[None], **dkt.forward_kwargs(layout, deterministic=True)).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(c, b, rtol=0, atol=0)


def test_adapter_errors(dkt, monkeypatch):
    monkeypatch.setattr(dk, "prefix_attention", _ref_kernel, raising=False)
    model = _tiny_model("llama")
    _set_attn(model, dkt.ATTN_IMPLEMENTATION)
    P, S = [3], [[2]]
    layout = _RefLayout(P, S)
    ids = torch.randint(0, 61, (1, 5))
    with pytest.raises(ValueError, match="no layout"):
        model(input_ids=ids, use_cache=False)
    with pytest.raises(ValueError, match="batch dim 1"):
        model(input_ids=ids.expand(2, -1), prefix_layout=layout, use_cache=False)
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(NotImplementedError, match="dropout"):
        model(input_ids=ids, **dkt.forward_kwargs(layout))
    assert "diffkern_prefix" in dkt.transformers.AttentionInterface._global_mapping
