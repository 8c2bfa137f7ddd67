"""Standalone GPU check of the prefix-attention CUDA kernels (before/without the bindings).

Loads libpa_test.so (build_pa_test.sh: the family's .cu files + pa_capi.cu) with ctypes and
checks forward and backward against an fp32 reference computed on the GPU over the naive
expanded form (each member's [prefix, suffix_i] through dense causal attention), by
FlashAttention's rule: the kernel's max error <= 2x (outputs) / 3x (gradients) the error
of plain torch attention in the same precision over the same expanded form. Also: LSE,
every output element written (NaN poison), deterministic mode bit-identical run to run,
and a timing at (P, S, G) = (4096, 512, 8), 32 heads, head dim 128.

    python prefix_attention_gpu.py --lib build/pa_test/libpa_test.so [--tiny] [--no-timing]
    python prefix_attention_gpu.py --cpu-selftest    # checks the reference itself, no GPU
"""
import argparse
import ctypes
import math
import os
import random
import sys

import torch
import torch.nn.functional as F

DTYPE_CODE = {torch.float16: 2, torch.bfloat16: 3}


class Layout:
    """Segments/groups exactly as prefix_attention.h describes them, from (P, [S...]) groups."""

    def __init__(self, groups, device):
        self.groups = groups
        q_start, length, p_start, p_len = [], [], [], []
        g_pref, g_first, g_num, self.offsets = [], [], [], []
        off = 0
        for P, S in groups:
            self.offsets.append(off)
            g_pref.append(len(q_start))
            g_first.append(len(q_start) + 1)
            g_num.append(len(S))
            q_start.append(off); length.append(P); p_start.append(off); p_len.append(0)
            base, off = off, off + P
            for s in S:
                q_start.append(off); length.append(s); p_start.append(base); p_len.append(P)
                off += s
        self.T = off
        self.count = len(length)
        work = [a + b for a, b in zip(p_len, length)]
        order = sorted(range(self.count), key=lambda i: -work[i])

        def tiles(b):
            cum = [0]
            for i in order:
                cum.append(cum[-1] + (length[i] + b - 1) // b)
            return cum

        as_t = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
        self.seg = [as_t(x) for x in (q_start, length, p_start, p_len, order, tiles(64), tiles(128))]
        self.grp = [as_t(x) for x in (g_pref, g_first, g_num)]
        self.host = dict(q_start=q_start, length=length, p_start=p_start, p_len=p_len)

    def mask(self, device):
        """Dense (T, T) bool mask of the contract (query row sees key column)."""
        m = torch.zeros(self.T, self.T, dtype=torch.bool, device=device)
        h = self.host
        for qs, n, ps, pl in zip(h["q_start"], h["length"], h["p_start"], h["p_len"]):
            if n == 0:
                continue
            m[qs:qs + n, ps:ps + pl] = True
            m[qs:qs + n, qs:qs + n] = torch.tril(torch.ones(n, n, dtype=torch.bool, device=device))
        return m


def dense_causal(q, k, v, scale, fp32_math):
    """(n, H, D) causal attention; fp32_math: explicit fp32 math, else torch SDPA as is."""
    hq, hkv = q.shape[1], k.shape[1]
    qh, kh, vh = (x.transpose(0, 1) for x in (q, k, v))
    if hq != hkv:
        kh = kh.repeat_interleave(hq // hkv, 0)
        vh = vh.repeat_interleave(hq // hkv, 0)
    if fp32_math:
        s = (qh @ kh.transpose(1, 2)) * scale
        n = q.shape[0]
        s = s.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool, device=q.device)), -math.inf)
        o = torch.softmax(s, -1) @ vh
    elif scale > 0:
        o = F.scaled_dot_product_attention(qh[None], kh[None], vh[None], is_causal=True, scale=scale)[0]
    else:
        # SDPA's fused kernels return NaN for a scale <= 0; its math backend does not.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            o = F.scaled_dot_product_attention(qh[None], kh[None], vh[None], is_causal=True,
                                               scale=scale)[0]
    return o.transpose(0, 1)


def expanded_attention(q, k, v, L, scale, fp32_math):
    """Packed output through the naive form: prefix alone, then each member's [prefix, suffix]."""
    pieces = []
    for (P, S), off in zip(L.groups, L.offsets):
        if P > 0:
            pieces.append(dense_causal(q[off:off + P], k[off:off + P], v[off:off + P], scale, fp32_math))
        pos = off + P
        for s in S:
            if s > 0:
                idx = torch.cat([torch.arange(off, off + P), torch.arange(pos, pos + s)]).to(q.device)
                pieces.append(dense_causal(q[idx], k[idx], v[idx], scale, fp32_math)[P:])
            pos += s
    return torch.cat(pieces)


def reference_lse(q, k, L, scale):
    hq, hkv = q.shape[1], k.shape[1]
    kk = k.repeat_interleave(hq // hkv, 1) if hq != hkv else k
    s = torch.einsum("thd,shd->hts", q.double(), kk.double()) * scale
    s = s.masked_fill(~L.mask(q.device)[None], -math.inf)
    return torch.logsumexp(s, -1)


class Kernels:
    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        for f in ("pa_forward", "pa_backward"):
            getattr(self.lib, f).argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_double]
            getattr(self.lib, f).restype = ctypes.c_int
        self.lib.pa_workspace_bytes.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int]
        self.lib.pa_workspace_bytes.restype = ctypes.c_int64

    @staticmethod
    def _args(q, k, v, L, tensors, lse, workspace=None, deterministic=False):
        a = [0] * 46
        a[0], a[1], a[2], a[3] = L.T, q.shape[1], k.shape[1], q.shape[2]
        a[4], a[5] = DTYPE_CODE[q.dtype], L.count
        for i, t in enumerate(L.seg):
            a[6 + i] = t.data_ptr()
        a[13] = len(L.groups)
        for i, t in enumerate(L.grp):
            a[14 + i] = t.data_ptr()
        for i, t in enumerate(tensors):
            if t is not None:
                assert t.stride(2) == 1
                a[17 + 3 * i], a[18 + 3 * i], a[19 + 3 * i] = t.data_ptr(), t.stride(0), t.stride(1)
        a[41] = lse.data_ptr()
        a[42] = workspace.data_ptr() if workspace is not None else 0
        a[43] = int(deterministic)
        a[44] = torch.cuda.current_stream().cuda_stream
        a[45] = workspace.numel() if workspace is not None else -1
        return (ctypes.c_int64 * 46)(*a)

    alloc = staticmethod(lambda x: torch.full_like(x, math.nan))  # NaN-poisoned outputs

    def forward(self, q, k, v, L, scale, out=None, lse=None):
        if out is None:  # fresh and NaN-poisoned unless the caller times preallocated ones
            out = self.alloc(q)
            lse = torch.full((q.shape[1], L.T), math.nan, device=q.device)
        rc = self.lib.pa_forward(self._args(q, k, v, L, [q, k, v, out], lse), scale)
        assert rc == 0, f"forward status {rc}"
        return out, lse

    def backward(self, q, k, v, out, dout, lse, L, scale, deterministic=False, ws=None, grads=None):
        dq, dk, dv = grads if grads is not None else (self.alloc(x) for x in (q, k, v))
        a = self._args(q, k, v, L, [q, k, v, out, dout, dq, dk, dv], lse)
        if ws is None:
            nbytes = self.lib.pa_workspace_bytes(a, int(deterministic))
            ws = torch.full((max(nbytes, 1),), 255, dtype=torch.uint8, device=q.device)
        a = self._args(q, k, v, L, [q, k, v, out, dout, dq, dk, dv], lse, ws, deterministic)
        rc = self.lib.pa_backward(a, scale)
        assert rc == 0, f"backward status {rc}"
        return dq, dk, dv


def big_strided(T, h, d, dtype, fill=None):
    """A (T, h, d) view whose token stride is 2^20 elements: token * stride passes 2^31."""
    x = torch.empty(T, 2**20 // d, d, dtype=dtype, device="cuda")[:, :h, :]
    return x.normal_() if fill is None else x.fill_(fill)


def check_case(K, groups, hq, hkv, d, dtype, seed, big=False, scale=None):
    torch.manual_seed(seed)
    dev = "cuda"
    L = Layout(groups, dev)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if big:
        q, k, v, dout = (big_strided(L.T, h, d, dtype) for h in (hq, hkv, hkv, hq))
        K.alloc = lambda x: big_strided(x.shape[0], x.shape[1], x.shape[2], x.dtype, math.nan)
        assert q.stride(0) * (L.T - 1) > 2**31
    else:
        q, k, v = (torch.randn(L.T, h, d, device=dev).to(dtype) for h in (hq, hkv, hkv))
        dout = torch.randn(L.T, hq, d, device=dev).to(dtype)

    out, lse = K.forward(q, k, v, L, scale)
    dq, dk, dv = K.backward(q, k, v, out, dout, lse, L, scale)
    dq2, dk2, dv2 = K.backward(q, k, v, out, dout, lse, L, scale, deterministic=True)
    dq3, dk3, dv3 = K.backward(q, k, v, out, dout, lse, L, scale, deterministic=True)
    torch.cuda.synchronize()

    def ref(xdtype, fp32_math):
        xs = [x.detach().to(xdtype).requires_grad_() for x in (q, k, v)]
        o = expanded_attention(*xs, L, scale, fp32_math)
        o.backward(dout.to(xdtype))
        return [o.detach().float()] + [x.grad.float() for x in xs]

    r32 = ref(torch.float32, True)
    rlp = ref(dtype, False)
    got = [out, dq, dk, dv]
    names = ["out", "dq", "dk", "dv"]
    ok = True
    msgs = []
    for n, g, r, lp in zip(names, got, r32, rlp):
        finite = bool(torch.isfinite(g).all())
        err = (g.float() - r).abs().max().item()
        base = (lp - r).abs().max().item()
        factor = 2 if n == "out" else 3
        good = finite and err <= factor * base + 1e-6
        ok &= good
        msgs.append(f"{n} {err:.2e}/{base:.2e}{'' if good else ' FAIL'}{'' if finite else ' NONFINITE'}")
    lse_err = (lse.double() - reference_lse(q.float(), k.float(), L, scale)).abs().max().item()
    good = math.isfinite(lse_err) and lse_err < 1e-3
    ok &= good
    msgs.append(f"lse {lse_err:.1e}{'' if good else ' FAIL'}")
    det_same = all(torch.equal(a, b) for a, b in ((dq2, dq3), (dk2, dk3), (dv2, dv3)))
    kv_same = torch.equal(dk, dk2) and torch.equal(dv, dv2)
    for n, g, r, lp in zip(names[1:], (dq2, dk2, dv2), r32[1:], rlp[1:]):
        err = (g.float() - r).abs().max().item()
        base = (lp - r).abs().max().item()
        if not (torch.isfinite(g).all() and err <= 3 * base + 1e-6):
            ok = False
            msgs.append(f"det {n} {err:.2e}/{base:.2e} FAIL")
    ok &= det_same
    msgs.append(f"det-bits {'same' if det_same else 'DIFFER'} kv-modes {'same' if kv_same else 'differ'}")
    K.alloc = Kernels.alloc
    if big:
        msgs.append("big strides")
    tag = f"{str(dtype)[6:]:8s} d{d:3d} h{hq}/{hkv} T{L.T:5d} {groups if len(str(groups)) < 60 else str(groups)[:57] + '...'}"
    print(("ok   " if ok else "FAIL ") + tag + " | " + "  ".join(msgs), flush=True)
    return ok


def kernels_only(lib):
    """Only this family's kernels (no torch attention): for compute-sanitizer racecheck and
    initcheck, whose reports would otherwise include the reference's kernels."""
    K = Kernels(lib)
    ok = True
    for dtype in (torch.bfloat16, torch.float16):
        for groups, hq, hkv, d in cases(True) + [([(130, [70, 0, 1])], 4, 2, 128)]:
            torch.manual_seed(0)
            L = Layout(groups, "cuda")
            q, k, v, dout = (torch.randn(L.T, h, d, device="cuda").to(dtype) for h in (hq, hkv, hkv, hq))
            out, lse = K.forward(q, k, v, L, d ** -0.5)
            res = [out, lse]
            for det in (False, True):
                res += K.backward(q, k, v, out, dout, lse, L, d ** -0.5, deterministic=det)
            torch.cuda.synchronize()
            ok &= all(bool(torch.isfinite(x).all()) for x in res)
    print("kernels-only " + ("ok" if ok else "NONFINITE"))
    return 0 if ok else 1


def cases(tiny):
    if tiny:
        return [([(70, [33, 1, 0]), (5, [9])], 2, 1, 64)]
    rnd = random.Random(7)
    rand_groups = [(rnd.randint(1, 400), [rnd.randint(0, 300) for _ in range(rnd.randint(1, 5))])
                   for _ in range(6)]
    return [
        ([(300, [100, 1, 0, 257]), (64, [64]), (1, [5, 3])], 4, 2, 128),
        ([(200, [77])], 2, 2, 64),
        ([(1100, [130, 64, 1])], 4, 1, 64),
        ([(0, [50, 20]), (129, [128, 127])], 2, 2, 128),
        (rand_groups, 8, 2, 128),
        SPLIT_CASE,
    ]


# Split prefix key tiles (pa_bwd_split.h): one KV head and a mean G of 5 make the rule pick
# C = 4 on any GPU; the group of 2 leaves chunks empty. main() also runs it with C forced.
SPLIT_CASE = ([(200, [64, 1, 130, 0, 65, 33, 7, 100]), (70, [90, 2])], 4, 1, 128)


TIMING_SHAPE = (4096, 512, 8, 32, 128)  # P, S, G, query heads, head dim


def timing_inputs(K, hkv, D=TIMING_SHAPE[4]):
    """The timing problem at TIMING_SHAPE with `hkv` KV heads (and head dim D), bf16:
    (layout, scale, q, k, v, dout, out, lse), the forward already run."""
    P, S, G, H, _ = TIMING_SHAPE
    L = Layout([(P, [S] * G)], "cuda")
    scale = 1 / math.sqrt(D)
    q, k, v, dout = (torch.randn(L.T, h, D, device="cuda", dtype=torch.bfloat16)
                     for h in (H, hkv, hkv, H))
    out, lse = K.forward(q, k, v, L, scale)
    return L, scale, q, k, v, dout, out, lse


def timing(K, hkv=32, D=TIMING_SHAPE[4]):
    from triton.testing import do_bench

    P, S, G, H, _ = TIMING_SHAPE
    L, scale, q, k, v, dout, out, lse = timing_inputs(K, hkv, D)
    pairs = P * (P + 1) / 2 + G * (S * P + S * (S + 1) / 2)
    f_fwd = 4 * D * H * pairs
    ws = {det: torch.empty(K.lib.pa_workspace_bytes(K._args(q, k, v, L, [q], lse), int(det)),
                           dtype=torch.uint8, device="cuda") for det in (False, True)}
    o2, l2 = torch.empty_like(out), torch.empty_like(lse)
    grads = [torch.empty_like(x) for x in (q, k, v)]
    t_fwd = do_bench(lambda: K.forward(q, k, v, L, scale, o2, l2), warmup=50, rep=300,
                     return_mode="median")
    t_bwd = do_bench(lambda: K.backward(q, k, v, out, dout, lse, L, scale, ws=ws[False], grads=grads),
                     warmup=50, rep=300, return_mode="median")
    t_bwd_det = do_bench(lambda: K.backward(q, k, v, out, dout, lse, L, scale, True, ws=ws[True],
                                            grads=grads), warmup=50, rep=300, return_mode="median")
    # Peer: SDPA (flash) over the G repeats [prefix, suffix_i].
    qe, ke, ve, de = (torch.randn(G, H, P + S, D, device="cuda", dtype=torch.bfloat16,
                                  requires_grad=i < 3) for i in range(4))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        t_sf = do_bench(lambda: F.scaled_dot_product_attention(qe, ke, ve, is_causal=True),
                        warmup=50, rep=300, return_mode="median")
        t_sfb = do_bench(lambda: F.scaled_dot_product_attention(qe, ke, ve, is_causal=True).backward(de),
                         warmup=50, rep=300, return_mode="median", grad_to_none=[qe, ke, ve])
    if hkv != H or D != TIMING_SHAPE[4]:
        print(f"timing D={D} {H}/{hkv} heads: fwd {t_fwd:.3f} ms ="
              f" {f_fwd / t_fwd / 1e9:.0f} TFLOP/s,"
              f" bwd {t_bwd:.3f} ms, det bwd {t_bwd_det:.3f} ms,"
              f" fwd+bwd {3.5 * f_fwd / (t_fwd + t_bwd) / 1e9:.0f} TFLOP/s")
        return
    print(f"timing (P,S,G)=({P},{S},{G}) H={H} D={D} bf16, H200; useful fwd TFLOP = {f_fwd / 1e12:.2f}")
    print(f"  kernel fwd {t_fwd:.3f} ms = {f_fwd / t_fwd / 1e9:.0f} TFLOP/s")
    print(f"  kernel bwd (atomic dQ) {t_bwd:.3f} ms = {2.5 * f_fwd / t_bwd / 1e9:.0f} TFLOP/s;"
          f" fwd+bwd {t_fwd + t_bwd:.3f} ms = {3.5 * f_fwd / (t_fwd + t_bwd) / 1e9:.0f} TFLOP/s")
    print(f"  kernel bwd (deterministic) {t_bwd_det:.3f} ms = {2.5 * f_fwd / t_bwd_det / 1e9:.0f} TFLOP/s")
    print(f"  SDPA-flash x G repeats: fwd {t_sf:.3f} ms, fwd+bwd {t_sfb:.3f} ms;"
          f" ratio fwd {t_sf / t_fwd:.2f}x, fwd+bwd {t_sfb / (t_fwd + t_bwd):.2f}x")


def timing_hopper(K):
    """Forward and backward ms and useful TFLOP/s at the benchmark's shapes (bf16, 32 query
    heads, D = 128): the Hopper wgmma kernels against the mma.sync ones (DK_PA_FWD_SM90=0,
    DK_PA_BWD_SM90=0)."""
    from triton.testing import do_bench

    for P, S, G, hkv in ((1024, 512, 8, 32), (4096, 512, 8, 32), (8192, 512, 16, 32),
                         (4096, 1024, 4, 32), (4096, 512, 8, 8)):
        L = Layout([(P, [S] * G)], "cuda")
        q, k, v, dout = (torch.randn(L.T, h, 128, device="cuda", dtype=torch.bfloat16)
                         for h in (32, hkv, hkv, 32))
        pairs = P * (P + 1) / 2 + G * (S * P + S * (S + 1) / 2)
        flops = 4 * 128 * 32 * pairs
        scale = 128 ** -0.5
        out, lse = K.forward(q, k, v, L, scale)
        ws = torch.empty(K.lib.pa_workspace_bytes(K._args(q, k, v, L, [q], lse), 0),
                         dtype=torch.uint8, device="cuda")
        o2, l2 = torch.empty_like(out), torch.empty_like(lse)
        grads = [torch.empty_like(x) for x in (q, k, v)]
        row = []
        for sm90 in ("1", "0"):
            os.environ["DK_PA_FWD_SM90"] = os.environ["DK_PA_BWD_SM90"] = sm90
            tf = do_bench(lambda: K.forward(q, k, v, L, scale, o2, l2), warmup=50, rep=300,
                          return_mode="median")
            tb = do_bench(lambda: K.backward(q, k, v, out, dout, lse, L, scale, ws=ws, grads=grads),
                          warmup=50, rep=300, return_mode="median")
            row.append(f"{'wgmma' if sm90 == '1' else 'mma.sync'} fwd {tf:.3f} ({flops / tf / 1e9:.0f})"
                       f" bwd {tb:.3f} ({2.5 * flops / tb / 1e9:.0f}) f+b {tf + tb:.3f}"
                       f" ({3.5 * flops / (tf + tb) / 1e9:.0f})")
        del os.environ["DK_PA_FWD_SM90"], os.environ["DK_PA_BWD_SM90"]
        print(f"({P}, {S}, {G}) 32/{hkv}: ms (TFLOP/s) " + " | ".join(row), flush=True)


def timing_split(K, hkv):
    """Backward ms at (4096, 512, 8), 32 query heads, D = 128, with few KV heads (where the
    split rule picks C > 1 on an H200) against the split turned off (DK_PA_BWD_CHUNKS=1)."""
    from triton.testing import do_bench

    P, S, G, H, D = TIMING_SHAPE
    L, scale, q, k, v, dout, out, lse = timing_inputs(K, hkv)
    grads = [torch.empty_like(x) for x in (q, k, v)]
    res = []
    for forced in (None, "1"):
        if forced:
            os.environ["DK_PA_BWD_CHUNKS"] = forced
        for det in (False, True):
            nbytes = K.lib.pa_workspace_bytes(K._args(q, k, v, L, [q], lse), int(det))
            ws = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            res.append(do_bench(lambda: K.backward(q, k, v, out, dout, lse, L, scale, det, ws=ws,
                                                   grads=grads),
                                warmup=50, rep=300, return_mode="median"))
        os.environ.pop("DK_PA_BWD_CHUNKS", None)
    print(f"timing split, GQA {H}/{hkv}: bwd {res[0]:.3f} ms (rule) vs {res[2]:.3f} ms (no split);"
          f" deterministic {res[1]:.3f} vs {res[3]:.3f} ms")


def profile_once(K):
    """The timing problem's forward and backward, 3 times each, nothing else: a target for
    Nsight Compute (ncu -k regex:"bwd_kv_kernel|fwd_kernel" --launch-skip 2 ...)."""
    L, scale, q, k, v, dout, out, lse = timing_inputs(K, 32)
    ws = torch.empty(K.lib.pa_workspace_bytes(K._args(q, k, v, L, [q], lse), 0),
                     dtype=torch.uint8, device="cuda")
    grads = [torch.empty_like(x) for x in (q, k, v)]
    for _ in range(3):
        K.forward(q, k, v, L, scale)
        K.backward(q, k, v, out, dout, lse, L, scale, ws=ws, grads=grads)
    torch.cuda.synchronize()
    print("profile-once done")
    return 0


def cpu_selftest():
    """The expanded-form reference equals dense masked attention under the contract's mask."""
    torch.manual_seed(0)
    for groups, hq, hkv in ([(7, [3, 0, 1]), (0, [4, 2]), (5, [6])], 4, 2), ([(9, [2])], 2, 2):
        L = Layout(groups, "cpu")
        d, scale = 8, 0.3
        q, k, v = (torch.randn(L.T, h, d, dtype=torch.float64) for h in (hq, hkv, hkv))
        got = expanded_attention(q, k, v, L, scale, True)
        kk, vv = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        s = torch.einsum("thd,shd->hts", q, kk) * scale
        s = s.masked_fill(~L.mask("cpu")[None], -math.inf)
        want = torch.einsum("hts,shd->thd", torch.softmax(s, -1), vv)
        assert torch.allclose(got, want, atol=1e-12), (got - want).abs().max()
        lse = reference_lse(q, k, L, scale)
        assert torch.isfinite(lse).all()
        # the schedule's prefix sums cover every tile once
        assert L.seg[5][-1].item() == sum((n + 63) // 64 for n in L.host["length"])
    print("cpu selftest ok")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default="build/pa_test/libpa_test.so")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--cpu-selftest", action="store_true")
    ap.add_argument("--kernels-only", action="store_true", help="for compute-sanitizer")
    ap.add_argument("--profile-once", action="store_true", help="for Nsight Compute")
    ap.add_argument("--quick", action="store_true", help="bf16 only, no 64-bit case, MHA timing only")
    ap.add_argument("--hopper-timing", action="store_true",
                    help="forward and backward times, wgmma against mma.sync")
    args = ap.parse_args()
    if args.hopper_timing:
        timing_hopper(Kernels(args.lib))
        return 0
    if args.cpu_selftest:
        cpu_selftest()
        return 0
    if args.kernels_only:
        return kernels_only(args.lib)
    if args.profile_once:
        return profile_once(Kernels(args.lib))
    torch.backends.cuda.matmul.allow_tf32 = False
    K = Kernels(args.lib)
    ok = True
    # Both KV-kernel key tiles (DK_PA_BWD_KEYS, read by the launcher at each call).
    # Both KV-kernel key tiles, and with 128 keys both the mma.sync and the Hopper wgmma
    # kernel (DK_PA_BWD_SM90, read by the launcher at each call; head dim 128 on sm_90 only).
    for keys, bwd_sm90 in (("64", "0"), ("128", "0"), ("128", "1")):
        os.environ["DK_PA_BWD_KEYS"], os.environ["DK_PA_BWD_SM90"] = keys, bwd_sm90
        print(f"DK_PA_BWD_KEYS={keys} DK_PA_BWD_SM90={bwd_sm90}:")
        for dtype in (torch.bfloat16,) if args.quick else (torch.bfloat16, torch.float16):
            for i, (groups, hq, hkv, d) in enumerate(cases(args.tiny)):
                for dd in ((d,) if args.tiny else (64, 128)):
                    ok &= check_case(K, groups, hq, hkv, dd, dtype, seed=100 * i + dd)
    del os.environ["DK_PA_BWD_KEYS"], os.environ["DK_PA_BWD_SM90"]
    if not args.tiny:
        # Explicit scales: large, zero and negative (the Hopper forward's softmax takes the
        # row minimum of the raw scores for a negative scale).
        for scale in (3.0, 0.0, -0.7):
            print(f"scale {scale}:", end=" ")
            groups, hq, hkv, d = SPLIT_CASE
            ok &= check_case(K, groups, hq, hkv, d, torch.bfloat16, seed=78, scale=scale)
        # The split with C forced (DK_PA_BWD_CHUNKS, read by the launcher at each call): the
        # unsplit path on a multi-member group, and an uneven C.
        for forced in ("1", "3"):
            os.environ["DK_PA_BWD_CHUNKS"] = forced
            print(f"DK_PA_BWD_CHUNKS={forced}:", end=" ")
            groups, hq, hkv, d = SPLIT_CASE
            ok &= check_case(K, groups, hq, hkv, d, torch.bfloat16, seed=77)
            del os.environ["DK_PA_BWD_CHUNKS"]
    if not args.tiny and not args.quick:
        # 64-bit offsets: token stride 2^20 elements, T = 2300 tokens (reads and writes), with
        # both KV-kernel key tiles
        for keys, bwd_sm90 in (("64", "0"), ("128", "0"), ("128", "1")):
            os.environ["DK_PA_BWD_KEYS"], os.environ["DK_PA_BWD_SM90"] = keys, bwd_sm90
            print(f"DK_PA_BWD_KEYS={keys} DK_PA_BWD_SM90={bwd_sm90}:", end=" ")
            ok &= check_case(K, [(1500, [400, 0, 399]), (1, [1])], 4, 2, 128, torch.bfloat16, 5,
                             big=True)
            torch.cuda.empty_cache()
        del os.environ["DK_PA_BWD_KEYS"], os.environ["DK_PA_BWD_SM90"]
    if not args.tiny and not args.no_timing:
        for keys in ("64", "128"):
            os.environ["DK_PA_BWD_KEYS"] = keys
            print(f"DK_PA_BWD_KEYS={keys}:")
            timing(K)
            if not args.quick:
                timing(K, hkv=8)
                timing(K, D=64)
        del os.environ["DK_PA_BWD_KEYS"]
        if not args.quick:
            for hkv in (4, 2, 1):
                timing_split(K, hkv)
    print("ALL OK" if ok else "SOME FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
