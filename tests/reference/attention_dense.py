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


def flash_attention_rule(got, ref, base, names=("out", "dq", "dk", "dv")):
    """FlashAttention's error rule: each of ``got`` (kernel results: output, then
    gradients) is within 2x (output) / 3x (gradients) + 1e-5 of ``ref`` (the float32 or
    float64 reference), relative to the error of ``base`` (plain torch attention computed in
    the kernel's low precision). Returns one message per violation (empty: the rule holds)."""
    fails = []
    for i, (name, a, r, c) in enumerate(zip(names, got, ref, base)):
        if not a.numel():
            continue
        err = (a.double() - r.double()).abs().max().item()
        err_base = (c.double() - r.double()).abs().max().item()
        factor = 2 if i == 0 else 3
        if not err <= factor * err_base + 1e-5:
            fails.append(f"{name}: error {err:.3e} > {factor} x torch's own {err_base:.3e} "
                         f"(FlashAttention's rule)")
    return fails


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
