"""Dense reference for shared-prefix attention (tests and benchmarks of ``dk.prefix_attention``).

Layout (the same as ``dk.PrefixLayout``): tokens packed along dim 0, group after group,
``[prefix, suffix_1, ..., suffix_G]``. ``prefix_lens`` has one length per group,
``suffix_lens`` one sequence of suffix lengths per group (G may differ between groups;
G = 0, empty prefixes and empty suffixes are allowed).

Semantics, computed here the slow and obvious way:
- every *member* ``[prefix, suffix_i]`` of a group is gathered out of the packed tensors
  (:func:`expand_members`), so the prefix is really repeated G times;
- plain causal attention runs on each member with an explicit boolean mask and an explicit
  softmax (no fused kernel, any dtype, float64 included; GQA by repeating K/V heads);
- the outputs are folded back to the packed form: a suffix token's output from its member, a
  prefix token's output from the group's first member (every member computes the same
  value for it; a group without members computes its prefix alone).

Everything is differentiable plain torch, so the reference's gradients (autograd through
the gather) are the gradients of the repeated form accumulated over the members: exactly
what the fused kernel must produce.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch


def _lengths(prefix_lens, suffix_lens):
    """(prefix lengths, suffix lengths per group) as Python ints, checked."""
    p = [int(x) for x in (prefix_lens.tolist() if torch.is_tensor(prefix_lens) else prefix_lens)]
    s = [[int(x) for x in (g.tolist() if torch.is_tensor(g) else g)] for g in suffix_lens]
    if len(p) != len(s):
        raise ValueError(f"prefix_attention_ref: prefix_lens has {len(p)} groups but "
                         f"suffix_lens has {len(s)}")
    if any(x < 0 for x in p) or any(x < 0 for g in s for x in g):
        raise ValueError("prefix_attention_ref: lengths must be >= 0")
    return p, s


def total_tokens(prefix_lens, suffix_lens) -> int:
    """T, the packed length."""
    p, s = _lengths(prefix_lens, suffix_lens)
    return sum(p) + sum(sum(g) for g in s)


def member_indices(prefix_lens, suffix_lens, device=None) -> List[torch.Tensor]:
    """For each member (group by group, member by member): the packed indices of its tokens,
    ``[prefix tokens, its suffix tokens]`` (int64)."""
    p, s = _lengths(prefix_lens, suffix_lens)
    out, start = [], 0
    for plen, sl in zip(p, s):
        prefix = torch.arange(start, start + plen, device=device)
        pos = start + plen
        for slen in sl:
            out.append(torch.cat([prefix, torch.arange(pos, pos + slen, device=device)]))
            pos += slen
        start = pos
    return out


def expand_members(x: torch.Tensor, prefix_lens, suffix_lens) -> List[torch.Tensor]:
    """Packed ``x`` (T, ...) -> one tensor per member, (P_g + S_gi, ...): the naive repeated
    form (the prefix copied into every member)."""
    T = total_tokens(prefix_lens, suffix_lens)
    if x.shape[0] != T:
        raise ValueError(f"expand_members: x has {x.shape[0]} tokens, the layout {T}")
    return [x.index_select(0, idx) for idx in member_indices(prefix_lens, suffix_lens, x.device)]


def member_position_ids(prefix_lens, suffix_lens, device=None) -> torch.Tensor:
    """Packed position ids (T,) int64: 0..P-1 over a prefix, P..P+S_i-1 over each suffix
    (each member sees positions 0..P+S_i-1, as it would alone)."""
    p, s = _lengths(prefix_lens, suffix_lens)
    parts = []
    for plen, sl in zip(p, s):
        parts.append(torch.arange(plen, device=device))
        parts.extend(torch.arange(plen, plen + slen, device=device) for slen in sl)
    if not parts:
        return torch.zeros(0, dtype=torch.int64, device=device)
    return torch.cat(parts)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Plain causal attention of one sequence, explicit mask and softmax: q (L, Hq, D),
    k/v (L, Hkv, D) -> (L, Hq, D), computed in q's dtype."""
    L, hq, d = q.shape
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"causal_attention: {hq} query heads is not a multiple of {hkv} KV heads")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = k.repeat_interleave(hq // hkv, dim=1)  # query head h reads KV head h // (hq / hkv)
    v = v.repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    mask = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def fold_members(outs: Sequence[torch.Tensor], prefix_lens, suffix_lens,
                 prefix_outs: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """Per-member outputs (P_g + S_gi, ...) -> packed (T, ...): suffix rows from their
    member, prefix rows from the group's first member (or ``prefix_outs[g]`` for a group
    without members)."""
    p, s = _lengths(prefix_lens, suffix_lens)
    parts, m = [], 0
    for g, (plen, sl) in enumerate(zip(p, s)):
        if sl:
            parts.append(outs[m][:plen])
        else:
            parts.append(prefix_outs[g])
        for slen in sl:
            parts.append(outs[m][plen:])
            m += 1
    return torch.cat(parts)


def reference_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               prefix_lens, suffix_lens,
                               scale: Optional[float] = None) -> torch.Tensor:
    """Shared-prefix attention the dense way: q (T, Hq, D), k/v (T, Hkv, D) packed ->
    (T, Hq, D) in q's dtype (pass float64 tensors for a float64 reference)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("reference_prefix_attention: q, k, v must be (T, H, D)")
    T = total_tokens(prefix_lens, suffix_lens)
    if not (q.shape[0] == k.shape[0] == v.shape[0] == T):
        raise ValueError(f"reference_prefix_attention: q/k/v have {q.shape[0]}/{k.shape[0]}/"
                         f"{v.shape[0]} tokens, the layout {T}")
    if T == 0:
        return q.new_zeros(q.shape)
    p, s = _lengths(prefix_lens, suffix_lens)
    qs, ks, vs = (expand_members(x, p, s) for x in (q, k, v))
    outs = [causal_attention(a, b, c, scale) for a, b, c in zip(qs, ks, vs)]
    # Groups without members: their prefix is plain causal attention on its own.
    prefix_outs, start = [], 0
    for plen, sl in zip(p, s):
        if sl:
            prefix_outs.append(None)
        else:
            sl_ = slice(start, start + plen)
            prefix_outs.append(causal_attention(q[sl_], k[sl_], v[sl_], scale))
        start += plen + sum(sl)
    return fold_members(outs, p, s, prefix_outs)


def completion_logprob_index(prefix_lens, suffix_lens, device=None):
    """Where each completion token's log-prob comes from in a packed forward.

    Returns ``(pred_pos, target_pos, member)``, int64 (N,) with N = sum of all suffix
    lengths: completion token ``target_pos`` (a packed index inside a suffix) is predicted
    by the logits at packed index ``pred_pos`` (the previous token of its *member*: the
    last prefix token for a suffix's first token, which all members share), and belongs to
    member number ``member``. A suffix's first token needs a non-empty prefix."""
    p, s = _lengths(prefix_lens, suffix_lens)
    pred, tgt, mem = [], [], []
    start, m = 0, 0
    for plen, sl in zip(p, s):
        pos = start + plen
        for slen in sl:
            if slen and plen == 0:
                raise ValueError("completion_logprob_index: a completion's first token needs "
                                 "a non-empty prefix to be predicted from")
            for j in range(slen):
                tgt.append(pos + j)
                pred.append(start + plen - 1 if j == 0 else pos + j - 1)
                mem.append(m)
            pos += slen
            m += 1
        start = pos
    as_t = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
    return as_t(pred), as_t(tgt), as_t(mem)
