"""Dense torch reference of shared-prefix attention: plain causal attention over each
member's ``[prefix, suffix_i]`` (the naive repeated form), mapped back to the packed
layout (a prefix's outputs from its group's first member: all members give the same).

Differentiable in q, k, v through plain torch ops, so its gradients are the reference
gradients too (a prefix's dK/dV sum over every member that reads it, as autograd of the
repeated form gives). Independent of diffkern's kernels: it uses only the layout's lengths.
"""
from __future__ import annotations

import math

import torch


def member_attention(q, k, v, scale):
    """Causal softmax attention of one sequence: q (L, Hq, D), k, v (L, Hkv, D)."""
    L, Hq, D = q.shape
    rep = Hq // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    mask = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~mask, -math.inf)
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hqk,khd->qhd", p, v)


def dense_prefix_attention(q, k, v, prefix_lens, suffix_lens, scale=None):
    """Packed output (T, Hq, D) of the repeated-form reference, in q's dtype."""
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    pieces, t = [], 0
    for P, ss in zip(prefix_lens, suffix_lens):
        ps, t = t, t + P
        for i, S in enumerate(ss):
            idx = torch.cat([torch.arange(ps, ps + P), torch.arange(t, t + S)]).to(q.device)
            o = member_attention(q[idx], k[idx], v[idx], scale)
            if i == 0:
                pieces.append(o[:P])
            pieces.append(o[P:])
            t += S
    if not pieces:
        return q.new_zeros(q.shape)
    return torch.cat(pieces)


def dense_lse(q, k, prefix_lens, suffix_lens, scale=None):
    """(Hq, T) log-sum-exp of each packed query row's scaled scores (float64)."""
    T, Hq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    rep = Hq // k.shape[1]
    kk = k.double().repeat_interleave(rep, dim=1)
    out = torch.empty(Hq, T, dtype=torch.float64)
    t = 0
    for P, ss in zip(prefix_lens, suffix_lens):
        ps, t = t, t + P
        for r in range(P):
            keys = torch.arange(ps, ps + r + 1)
            out[:, ps + r] = torch.logsumexp(
                torch.einsum("hd,khd->hk", q[ps + r].double(), kk[keys]) * scale, -1)
        for S in ss:
            for r in range(S):
                keys = torch.cat([torch.arange(ps, ps + P), torch.arange(t, t + r + 1)])
                out[:, t + r] = torch.logsumexp(
                    torch.einsum("hd,khd->hk", q[t + r].double(), kk[keys]) * scale, -1)
            t += S
    return out
