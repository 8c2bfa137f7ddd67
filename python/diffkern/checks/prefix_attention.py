"""prefix_attention family: shared-prefix attention (``diffkern.prefix_attention``).

Checks: the forward and the q/k/v gradients against torch's own attention
(``scaled_dot_product_attention``, causal, over each member's padded ``[prefix, suffix_i]``
from ``layout.unpack``) on a ragged GQA layout: float64 on the CPU (limit 1e-12), and on
CUDA bf16 against an fp32 reference with FlashAttention's rule (error <= 2x torch's own
bf16 error for the output, 3x for gradients); the time of forward+backward next to the
repeated-form torch attention (info).
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

import diffkern as dk

from ._timing import median_time

# The peers on the GPU (FlexAttention, a Prefix-Grouper-style split, SDPA over the repeats).
GPU_BENCHMARKS = [
    dict(name="bench-attention", timeout_s=420,
         argv=["bench/attention.py", "--device", "cuda", "--json",
               "{results}/bench_attention.json", "--plot", "{results}/attention.png"]),
]
ALIASES = ("attention",)

_LAYOUT = ([37, 5, 64], [[9, 1, 0, 21], [3], [40, 70]])  # ragged, G=1, empty, one-token


def _sdpa_reference(q, k, v, layout, scale=None):
    """Packed output of torch's causal SDPA over every member's padded [prefix, suffix_i]
    (right padding: a causal row never sees it). Prefix rows come from each group's first
    member (pack), so autograd gives the same gradient bookkeeping as the kernels."""
    qm, km, vm = (layout.unpack(t).transpose(1, 2) for t in (q, k, v))  # (M, H, L, D)
    o = F.scaled_dot_product_attention(qm, km, vm, is_causal=True, scale=scale,
                                       enable_gqa=q.shape[1] != k.shape[1])
    return layout.pack(o.transpose(1, 2))


def _inputs(layout, hq, hkv, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = layout.total_tokens
    return [torch.randn(T, h, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
            .requires_grad_() for h in (hq, hkv, hkv)]


def _errors(out, inputs, ref, ref_inputs):
    """Max abs error of out and of the gradients of <out, w> for one fixed w (rounded to
    out's dtype, so that both sides get the same upstream gradient)."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64).to(out.dtype).double().to(out.device)
    g = torch.autograd.grad((out.double() * w).sum(), inputs)
    # The reference graph is kept: the same reference serves two comparisons.
    gr = torch.autograd.grad((ref.double() * w).sum(), ref_inputs, retain_graph=True)
    return ((out.double() - ref.double()).abs().max().item(),
            max((a.double() - b.double()).abs().max().item() for a, b in zip(g, gr)))


def run(device: str, quick: bool = True) -> list[dict]:
    dev = torch.device(device)
    layout = dk.PrefixLayout.from_lengths(*_LAYOUT, device=dev)
    rows = []
    if dev.type == "cpu":
        q, k, v = _inputs(layout, 4, 2, 32, torch.float64, dev)
        out = dk.prefix_attention(q, k, v, layout)
        e_out, e_grad = _errors(out, (q, k, v), _sdpa_reference(q, k, v, layout), (q, k, v))
        for what, e in (("output", e_out), ("q/k/v gradients", e_grad)):
            rows.append(dict(check=f"float64 {what}, max abs error (GQA 4/2, ragged, 3 groups)",
                             value=e, reference="torch SDPA over the padded members; limit 1e-12",
                             status="ok" if e <= 1e-12 else "fail"))
    else:
        d = 128
        q, k, v = _inputs(layout, 8, 2, d, torch.bfloat16, dev)
        out = dk.prefix_attention(q, k, v, layout)
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref = _sdpa_reference(q32, k32, v32, layout)
        ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
        base = _sdpa_reference(ql, kl, vl, layout)
        e_out, e_grad = _errors(out, (q, k, v), ref, (q32, k32, v32))
        b_out, b_grad = _errors(base, (ql, kl, vl), ref, (q32, k32, v32))
        for what, e, b, f in (("output", e_out, b_out, 2), ("q/k/v gradients", e_grad, b_grad, 3)):
            rows.append(dict(check=f"bf16 {what}, max abs error vs fp32 (GQA 8/2, d={d})",
                             value=e, reference=f"<= {f}x torch bf16 SDPA's {b:.3g}",
                             status="ok" if e <= f * b + 1e-6 else "fail"))
    rows.append(_timing(dev, quick))
    return rows


def _timing(dev: torch.device, quick: bool) -> dict:
    G = 4 if quick else 8
    if dev.type == "cpu":
        P, S = (128, 32) if quick else (512, 128)
    else:
        P, S = 4096, 512
    hq, hkv, d = (4, 4, 64) if dev.type == "cpu" else (32, 32, 128)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    layout = dk.PrefixLayout.from_lengths([P], [[S] * G], device=dev)
    q, k, v = _inputs(layout, hq, hkv, d, dtype, dev)
    qe, ke, ve = (layout.expand(t.detach()).view(G, P + S, -1, d).transpose(1, 2)
                  .requires_grad_() for t in (q, k, v))

    def ours():
        dk.prefix_attention(q, k, v, layout).sum().backward()

    def repeated():
        F.scaled_dot_product_attention(qe, ke, ve, is_causal=True).sum().backward()

    t, t_rep = median_time(ours, dev, repeats=3), median_time(repeated, dev, repeats=3)
    return dict(check=f"forward+backward s (P={P}, S={S}, G={G}, {hq} heads, d={d}, {dtype})",
                value=t, reference=f"torch SDPA over the G repeats: {t_rep:.3g} s "
                                   f"(ours runs at {t_rep / t:.2f}x its speed)",
                status="info")


def _assert_near_cpu_kernel(results, inputs, layout, tol, what):
    """Raises when `results` (an output of dk.prefix_attention on `inputs`, then its q/k/v
    gradients for an all-ones upstream gradient) are off the float32 CPU kernel's by more
    than tol x (1 + the reference's largest magnitude)."""
    xs = [t.detach().float().cpu().requires_grad_() for t in inputs]
    ref = dk.prefix_attention(*xs, layout.to("cpu"))
    want = (ref, *torch.autograd.grad(ref, xs, torch.ones_like(ref)))
    for a, b in zip(results, want):
        if a.numel():
            err = (a.float().cpu() - b).abs().max().item()
            assert err <= tol * (1 + b.abs().max().item()), f"error {err} ({what})"


def sanitizer_workload(device: str) -> int:
    """Every kernel on tiny odd layouts (ragged, G=1, one-token and empty suffixes, an empty
    prefix), GQA, strided q, zero size, forward and backward (both modes), a side stream on
    CUDA; raises when a result is off the float32 CPU kernel by more than bf16 allows."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    calls = 0
    for P, S in [([13, 0, 3], [[5, 1, 0], [7], [2, 2]]), ([70], [[1]]), ([], [])]:
        layout = dk.PrefixLayout.from_lengths(P, S, device=dev)
        q, k, v = _inputs(layout, 4, 2, 64, dtype, dev)
        qs = torch.cat([q.detach(), q.detach()], 1)[:, ::2].requires_grad_()  # head stride 2
        for deterministic in (False, True):
            out = dk.prefix_attention(qs, k, v, layout, deterministic=deterministic)
            grads = torch.autograd.grad(out, (qs, k, v), torch.ones_like(out))
            calls += 2
        _assert_near_cpu_kernel((out, *grads), (qs, k, v), layout,
                                3e-2 if dtype == torch.bfloat16 else 1e-5, f"layout {P}, {S}")
    if dev.type == "cuda":
        # 32 query heads on one KV head: the atomic mode's dQ goes through the dQ kernel
        # (pa_kernels.h dq_by_kernel), a route the cases above do not take.
        layout = dk.PrefixLayout.from_lengths([21], [[6, 1]], device=dev)
        q, k, v = _inputs(layout, 32, 1, 64, dtype, dev)
        out = dk.prefix_attention(q, k, v, layout)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        calls += 2
        layout = dk.PrefixLayout.from_lengths([9], [[3, 4]], device=dev)
        q, k, v = _inputs(layout, 2, 1, 128, dtype, dev)
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            out = dk.prefix_attention(q, k, v, layout)
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        stream.synchronize()
        calls += 2
        # A negative scale (the kernels take any finite scale; the calls above use the default).
        out = dk.prefix_attention(q, k, v, layout, scale=-0.2)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        calls += 2
        # The backward's KV kernel with 128 keys per block: the rule (pa_kernels.h
        # bwd_kv_key_tile) takes it only for grids that fill the GPU, which tiny layouts never
        # do, so it is forced here, both head dims and modes, against the CPU kernel; on a
        # Hopper GPU with the wgmma kernels (head dim 128) and with the mma.sync ones.
        layout = dk.PrefixLayout.from_lengths([130, 5], [[70, 1, 0, 140], [3]], device=dev)
        for sm90 in ("1", "0"):
            with kernel_switches(DK_PA_BWD_KEYS="128", DK_PA_FWD_SM90=sm90, DK_PA_BWD_SM90=sm90):
                for d in (64, 128):
                    q, k, v = _inputs(layout, 4, 2, d, dtype, dev)
                    for deterministic in (False, True):
                        out = dk.prefix_attention(q, k, v, layout, deterministic=deterministic)
                        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
                        calls += 2
                        _assert_near_cpu_kernel((out, *grads), (q, k, v), layout, 3e-2,
                                                f"128 keys, d={d}, DK_PA_*_SM90={sm90}")
    return calls


@contextlib.contextmanager
def kernel_switches(**switches):
    """The CUDA kernels' test switches (DK_PA_*: environment variables the launchers read at
    every call) set for a block: a string sets one, None unsets it; all restored after."""
    previous = {k: os.environ.get(k) for k in switches}
    try:
        for k, v in switches.items():
            _set_env(k, v)
        yield
    finally:
        for k, v in previous.items():
            _set_env(k, v)


def _set_env(name: str, value) -> None:
    """os.environ[name] = value, or unset it for None."""
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
