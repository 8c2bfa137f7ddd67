"""Dense torch references of shared-prefix attention for tests/test_attention.py: the
packed output is ``prefix_attention_ref.reference_prefix_attention`` (plain causal
attention over each member's ``[prefix, suffix_i]``, folded back to the packed layout;
one reference for the tests and the benchmark), and here the float64 log-sum-exp of each
packed query row, which the kernels save for their backward.
"""
from __future__ import annotations

import math

import torch

from tests.reference.prefix_attention_ref import reference_prefix_attention as dense_prefix_attention  # noqa: F401,E501


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
