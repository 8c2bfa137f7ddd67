"""Shared-prefix attention benchmark: dk.prefix_attention against the ways GRPO users run it.

    python bench/attention.py [--device cpu|cuda|auto] [--quick] [--repeats R]
                              [--json PATH] [--plot PATH]
                              [--shape P,S,G[,HQ,HKV,D] ...] [--methods NAME,...]

One group per shape: a prefix of P tokens shared by G suffixes of S tokens each; Hq query
heads, Hkv KV heads, head dim D. CUDA (default): bf16, Hq = 32, D = 128,
(P, S, G) = (1024, 512, 8), (4096, 512, 8), (8192, 512, 16), (4096, 1024, 4), and
(4096, 512, 8) with GQA (32 query / 8 KV heads). --device cpu: float32, small shapes
(--quick or not), the methods that run on a CPU.

Methods (each gets its inputs in its own natural form, made from the same random packed
q, k, v; gradients w.r.t. those inputs):
  diffkern        dk.prefix_attention on the packed layout [prefix, suffix_1..suffix_G]
                  (skipped, saying why, when this diffkern has no prefix_attention yet).
  flex            torch.nn.attention.flex_attention over the packed layout, a block mask
                  (kv <= q, same group, kv in the prefix or in q's own suffix), compiled with
                  dynamic=True so one compilation serves every shape (the first call, which
                  compiles, is reported separately as first_call_s; the block mask is built
                  once per layout outside the timed call, mask_build_s). CPU --quick: eager.
  prefix_grouper  written here after the idea of Prefix Grouper (2025), not its code: two
                  SDPA calls, the prefix's causal self-attention once, then all suffix
                  queries (G, Hq, S, D) against [prefix K/V repeated G times, own suffix K/V]
                  (a real copy, as that method makes) with a bottom-right causal mask.
  sdpa_flash      plain training: every member [prefix, suffix_i] its own row, causal SDPA
                  over (G, Hq, P + S, D), flash backend (the prefix is encoded G times).
  sdpa_cudnn      the same with the cuDNN backend.
A backend that is unavailable (cuDNN on CPU, ...) gives a row with its error.

Per method and shape: forward and forward+backward milliseconds (median of --repeats
timed calls, default 50, each method and pass stopping after 1 s of them; CUDA events,
2 rotating input sets; on an H200 at (1024, 512, 8) medians of 10 calls put diffkern at
1.33-1.40 ms in two runs, medians of 200 at 1.17-1.22 in three), useful TFLOP/s (only the FLOPs the math needs: the prefix's causal
attention once, each suffix against the prefix plus its own causal part,
4 * D * Hq * pairs forward, 2.5x that for the backward), and on CUDA the peak memory the
call adds above its inputs. Correctness on the first shape: every method's output and
input gradients, folded back to the packed form, against the fp32 reference
(tests/reference/prefix_attention_ref.py); "x torch" divides that by the error of the same
reference computed in the benchmark's dtype (FlashAttention's rule: <= 2x for outputs,
<= 3x for gradients).

--shape (repeatable) measures your shapes instead of the defaults (HQ, HKV, D default to
32, 32, 128 on CUDA and 4, 4, 32 on the CPU; the correctness check runs on the first);
--methods keeps only the named methods (e.g. --methods diffkern,sdpa_cudnn --repeats 200
for a close race at one shape).

--plot PATH adds two sweeps (forward+backward only): G in 1..16 at P = 4096, S = 512 and
P in 512..8192 at S = 512, G = 8 (smaller with --quick or on CPU) and draws time against G
and against P for every method.
"""
from __future__ import annotations

import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import _harness as H

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tests.reference.prefix_attention_ref import reference_prefix_attention  # noqa: E402

METHODS = ["diffkern", "flex", "prefix_grouper", "sdpa_flash", "sdpa_cudnn"]


# ------------------------------------------------------------------------------- shapes


class Shape:
    def __init__(self, P, S, G, hq, hkv, d):
        self.P, self.S, self.G, self.hq, self.hkv, self.d = P, S, G, hq, hkv, d
        self.T = P + G * S

    @property
    def name(self):
        gqa = f" gqa {self.hq}/{self.hkv}" if self.hq != self.hkv else ""
        return f"({self.P}, {self.S}, {self.G}){gqa}"

    def pairs(self):
        """(query, key) pairs the math needs."""
        P, S, G = self.P, self.S, self.G
        return P * (P + 1) // 2 + G * (S * P + S * (S + 1) // 2)

    def flops(self, backward):
        fwd = 4 * self.d * self.hq * self.pairs()
        return fwd * (3.5 if backward else 1.0)

    def lengths(self):
        return [self.P], [[self.S] * self.G]


def default_shapes(cuda, quick):
    if cuda:
        hq, d = 32, 128
        base = [(1024, 512, 8), (4096, 512, 8), (8192, 512, 16), (4096, 1024, 4)]
        shapes = [Shape(P, S, G, hq, hq, d) for P, S, G in base]
        shapes.append(Shape(4096, 512, 8, hq, 8, d))
        if quick:
            shapes = [shapes[0], shapes[-1]]
        return shapes
    hq, d = 4, 32
    shapes = [Shape(96, 32, 4, hq, hq, d), Shape(256, 64, 8, hq, hq, d),
              Shape(128, 32, 4, hq, 2, d)]
    return [shapes[0], shapes[2]] if quick else shapes


def parse_shape(text, cuda):
    """'P,S,G' or 'P,S,G,HQ,HKV,D' -> Shape (a clear error otherwise)."""
    try:
        vals = [int(x) for x in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) not in (3, 6) or min(vals) < 0 or (len(vals) == 6 and (
            min(vals[3:]) < 1 or vals[3] % vals[4])):
        raise ValueError(
            f"expected P,S,G or P,S,G,HQ,HKV,D (non-negative integers, HKV dividing HQ), "
            f"got {text!r}")
    hq, hkv, d = vals[3:] if len(vals) == 6 else ((32, 32, 128) if cuda else (4, 4, 32))
    return Shape(*vals[:3], hq, hkv, d)


def sweeps(cuda, quick):
    if cuda and not quick:
        hq, d, P0, S0 = 32, 128, 4096, 512
        gs, ps = [1, 2, 4, 8, 16], [512, 1024, 2048, 4096, 8192]
    else:
        hq, d, P0, S0 = 4, 32, 128, 32
        gs, ps = [1, 2, 4, 8], [32, 64, 128, 256]
    return ([("G", G, Shape(P0, S0, G, hq, hq, d)) for G in gs]
            + [("P", P, Shape(P, S0, 8, hq, hq, d)) for P in ps])


# ------------------------------------------------------------------------------ methods


class Method:
    """Builds a method's inputs from packed (q, k, v) and runs it; ``fold`` turns its
    output (or input gradients) back into packed (T, H, D) form."""

    name = ""

    def prepare(self, shape, q, k, v):  # -> tuple of leaf tensors
        return q, k, v

    def __call__(self, *inputs):
        raise NotImplementedError

    def fold_out(self, shape, out):
        return out

    def fold_grads(self, shape, grads):
        return grads


def _to_bhld(x):  # packed (T, H, D) -> (1, H, T, D), contiguous (the form SDPA/flex want)
    return x.transpose(0, 1).unsqueeze(0).contiguous()


class DiffKern(Method):
    name = "diffkern"

    def __init__(self, dk):
        self.dk = dk

    def prepare(self, shape, q, k, v):
        P, S = shape.lengths()
        self.layout = self.dk.PrefixLayout.from_lengths(P, S, device=q.device)
        return q, k, v

    def __call__(self, q, k, v):
        return self.dk.prefix_attention(q, k, v, self.layout)


class Flex(Method):
    name = "flex"

    def __init__(self, compiled):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self.create_block_mask = create_block_mask
        self.fn = torch.compile(flex_attention, dynamic=True) if compiled else flex_attention
        self.compiled = compiled
        self.mask_build_s = None

    def prepare(self, shape, q, k, v):
        dev = q.device
        # Per token: member id (0 for the prefix, i for suffix i); one group per shape.
        seg = torch.cat([torch.zeros(shape.P, dtype=torch.int32, device=dev),
                         torch.arange(1, shape.G + 1, dtype=torch.int32, device=dev)
                         .repeat_interleave(shape.S)])

        def mask_mod(b, h, qi, ki):
            return (ki <= qi) & ((seg[ki] == 0) | (seg[ki] == seg[qi]))

        t = time.perf_counter()
        self.block_mask = self.create_block_mask(mask_mod, None, None, shape.T, shape.T,
                                                 device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        self.mask_build_s = time.perf_counter() - t
        self.gqa = shape.hq != shape.hkv
        return tuple(_to_bhld(x) for x in (q, k, v))

    def __call__(self, q, k, v):
        return self.fn(q, k, v, block_mask=self.block_mask, enable_gqa=self.gqa)

    def fold_out(self, shape, out):
        return out[0].transpose(0, 1)

    def fold_grads(self, shape, grads):
        return tuple(g[0].transpose(0, 1) for g in grads)


_NO_GQA = set()  # (backend, device type) that rejected enable_gqa once


def _sdpa(q, k, v, backend, **kw):
    """SDPA on one backend. GQA: enable_gqa where the backend takes it, else the KV heads
    repeated (what a user of that backend does; the copy is then part of the time)."""
    from torch.nn.attention import sdpa_kernel

    key = (backend, q.device.type)
    if q.shape[1] != k.shape[1]:
        if key in _NO_GQA:
            r = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
        else:
            try:
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
            except RuntimeError:
                _NO_GQA.add(key)
                return _sdpa(q, k, v, backend, **kw)
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, **kw)


class PrefixGrouper(Method):
    """Prefix self-attention once; suffixes against a G-fold copy of the prefix K/V."""

    name = "prefix_grouper"

    def __init__(self, backend):
        self.backend = backend

    def prepare(self, shape, q, k, v):
        self.shape = shape
        return tuple(_to_bhld(x) for x in (q, k, v))

    def __call__(self, q, k, v):
        from torch.nn.attention.bias import causal_lower_right

        P, S, G = self.shape.P, self.shape.S, self.shape.G
        out_p = _sdpa(q[:, :, :P], k[:, :, :P], v[:, :, :P], self.backend, is_causal=True)

        def members(x):  # (1, H, G*S, D) -> (G, H, S, D)
            return x[0, :, P:].unflatten(1, (G, S)).transpose(0, 1)

        kp, vp = k[:, :, :P].expand(G, -1, -1, -1), v[:, :, :P].expand(G, -1, -1, -1)
        k_full = torch.cat([kp, members(k)], dim=2)  # the prefix K/V copied G times
        v_full = torch.cat([vp, members(v)], dim=2)
        out_s = _sdpa(members(q), k_full, v_full, self.backend,
                      attn_mask=causal_lower_right(S, P + S))
        out_s = out_s.transpose(0, 1).flatten(1, 2).unsqueeze(0)  # (1, H, G*S, D)
        return torch.cat([out_p, out_s], dim=2)

    fold_out = Flex.fold_out
    fold_grads = Flex.fold_grads


class Repeated(Method):
    """Every member its own row: (G, H, P + S, D), causal."""

    def __init__(self, name, backend):
        self.name, self.backend = name, backend

    def prepare(self, shape, q, k, v):
        P, S, G = shape.P, shape.S, shape.G

        def rows(x):  # packed (T, H, D) -> (G, H, P + S, D)
            pre = x[:P].unsqueeze(0).expand(G, -1, -1, -1)
            return torch.cat([pre, x[P:].unflatten(0, (G, S))], dim=1).transpose(1, 2).contiguous()

        return tuple(rows(x) for x in (q, k, v))

    def __call__(self, q, k, v):
        return _sdpa(q, k, v, self.backend, is_causal=True)

    def fold_out(self, shape, out):  # prefix rows from member 0 (all members agree)
        P = shape.P
        o = out.transpose(1, 2)  # (G, L, H, D)
        return torch.cat([o[0, :P], o[:, P:].flatten(0, 1)])

    def fold_grads(self, shape, grads):  # the prefix's gradient sums over the members
        P = shape.P
        out = []
        for g in grads:
            g = g.transpose(1, 2)
            out.append(torch.cat([g[:, :P].sum(0), g[:, P:].flatten(0, 1)]))
        return tuple(out)


def diffkern_status(device, dtype):
    """(module, None) if dk.prefix_attention runs here (forward and backward), else
    (None, why)."""
    try:
        import diffkern as dk
    except Exception as e:
        return None, f"diffkern does not import: {type(e).__name__}: {e}"
    if not hasattr(dk, "prefix_attention") or not hasattr(dk, "PrefixLayout"):
        return None, "dk.prefix_attention is not in this diffkern build yet"
    try:
        layout = dk.PrefixLayout.from_lengths([3], [[2, 1]], device=device)
        x = torch.randn(6, 2, 64, device=device, dtype=dtype, requires_grad=True)
        dk.prefix_attention(x, x, x, layout).sum().backward()
    except Exception as e:  # not implemented for this device/dtype, or broken: say so
        return None, f"dk.prefix_attention fails on {device}/{dtype}: {type(e).__name__}: {e}"
    return dk, None


def make_methods(device, quick):
    from torch.nn.attention import SDPBackend

    cuda = device.type == "cuda"
    dk, why = diffkern_status(device, torch.bfloat16 if cuda else torch.float32)
    methods = {"diffkern": DiffKern(dk) if dk else why}
    try:
        methods["flex"] = Flex(compiled=cuda or not quick)
    except ImportError as e:
        methods["flex"] = f"flex_attention unavailable: {e}"
    methods["prefix_grouper"] = PrefixGrouper(SDPBackend.FLASH_ATTENTION if cuda
                                              else SDPBackend.MATH)
    methods["sdpa_flash"] = Repeated("sdpa_flash", SDPBackend.FLASH_ATTENTION)
    methods["sdpa_cudnn"] = (Repeated("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION) if cuda
                             else "the cuDNN backend needs CUDA")
    return methods


# ---------------------------------------------------------------------------- measuring


def packed_inputs(shape, device, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda h: torch.randn(shape.T, h, shape.d, generator=g).to(device, dtype)  # noqa: E731
    return mk(shape.hq), mk(shape.hkv), mk(shape.hkv)


def measure_method(m, shape, device, dtype, repeats, budget_s):
    clock = H.clock_for(device)
    sets, douts = [], []
    for seed in (1, 2):
        ins = m.prepare(shape, *packed_inputs(shape, device, dtype, seed))
        sets.append(tuple(x.detach().requires_grad_() for x in ins))
    row = {"method": m.name, "shape": shape.name, "P": shape.P, "S": shape.S, "G": shape.G,
           "hq": shape.hq, "hkv": shape.hkv, "d": shape.d}
    t0 = time.perf_counter()
    try:
        out = m(*sets[0])
    except NotImplementedError as e:  # flex_attention on CPU refuses inputs needing grad
        row["note"] = f"forward only: {str(e).splitlines()[0][:70]}"
        sets = [tuple(x.detach() for x in ins) for ins in sets]
        out = m(*sets[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    row["first_call_s"] = time.perf_counter() - t0
    douts = [torch.randn_like(out) for _ in sets]
    if getattr(m, "mask_build_s", None) is not None:
        row["mask_build_s"] = m.mask_build_s

    def fwd(*ins):
        with torch.no_grad():
            return m(*ins)

    def fwd_bwd(i):
        o = m(*sets[i])
        return torch.autograd.grad(o, sets[i], douts[i])

    tf = H.measure(fwd, sets, clock=clock, warmup=2, repeats=repeats, budget_s=budget_s)
    row["fwd_ms"], row["fwd_min_ms"] = tf.median * 1e3, tf.min * 1e3
    row["fwd_tflops"] = shape.flops(False) / tf.median / 1e12
    passes = [("fwd", lambda: fwd(*sets[0]))]
    if "note" not in row:  # the backward warm-up compiles (flex): outside the timed calls
        tb = H.measure(fwd_bwd, [(0,), (1,)], clock=clock, warmup=2, repeats=repeats,
                       budget_s=budget_s)
        row["fwd_bwd_ms"], row["fwd_bwd_min_ms"] = tb.median * 1e3, tb.min * 1e3
        row["fwd_bwd_tflops"] = shape.flops(True) / tb.median / 1e12
        passes.append(("fwd_bwd", lambda: fwd_bwd(0)))
    if shape.hq != shape.hkv and (getattr(m, "backend", None), device.type) in _NO_GQA:
        row["note"] = "KV heads repeated (this backend rejects enable_gqa)"
    if device.type == "cuda":
        for label, fn in passes:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()  # its result is freed on return; the peak is what counts
            torch.cuda.synchronize()
            row[f"{label}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row


def check_method(m, shape, device, dtype, ref):
    """Max abs error of output and input gradients vs the fp32 reference, and its ratio to
    the error of the reference computed in ``dtype``."""
    q, k, v = packed_inputs(shape, device, dtype, 7)
    ins = tuple(x.detach().requires_grad_() for x in m.prepare(shape, q, k, v))
    err = lambda a, b: float((a.detach().to(b.dtype) - b).abs().max())  # noqa: E731
    try:
        out = m.fold_out(shape, m(*ins))
    except NotImplementedError as e:  # flex_attention on CPU refuses inputs needing grad
        out = m.fold_out(shape, m(*(x.detach() for x in ins)))
        row = {"out_err": err(out, ref["ref"][0]), "grad_note": str(e).splitlines()[0][:70]}
        row["out_x_torch"] = row["out_err"] / max(ref["torch_err"][0], 1e-300)
        return row
    row = {"out_err": err(out, ref["ref"][0])}
    row["out_x_torch"] = row["out_err"] / max(ref["torch_err"][0], 1e-300)
    # <out, dout> differentiated through the fold: packed-form input gradients
    grads = m.fold_grads(shape, torch.autograd.grad(out, ins, ref["dout"].to(dtype)))
    row["grad_err"] = max(err(a, b) for a, b in zip(grads, ref["ref"][1:]))
    row["grad_x_torch"] = row["grad_err"] / max(ref["torch_err"][1], 1e-300)
    return row


def reference(shape, device, dtype):
    """Reference output and q/k/v gradients (float32 for a 16-bit dtype, else float64),
    and the errors of the same reference run in ``dtype`` (plain torch in the benchmark's
    precision)."""
    q, k, v = packed_inputs(shape, device, dtype, 7)
    P, S = shape.lengths()
    g = torch.Generator(device="cpu").manual_seed(8)
    dout = torch.randn(shape.T, shape.hq, shape.d, generator=g).to(device)

    def run(dt):
        ins = [x.detach().to(dt).requires_grad_() for x in (q, k, v)]
        out = reference_prefix_attention(*ins, P, S)
        grads = torch.autograd.grad(out, ins, dout.to(dt))
        return [out.detach().to(ref_dtype)] + [x.to(ref_dtype) for x in grads]

    ref_dtype = torch.float32 if dtype.itemsize < 4 else torch.float64
    ref = run(ref_dtype)
    low = run(dtype)
    torch_err = (float((low[0] - ref[0]).abs().max()),
                 max(float((a - b).abs().max()) for a, b in zip(low[1:], ref[1:])))
    return {"ref": ref, "ref_dtype": str(ref_dtype), "dout": dout, "torch_err": torch_err}


# --------------------------------------------------------------------------------- main


COLUMNS = [
    H.Column("shape", 24, left=True), H.Column("method", 16, left=True),
    H.Column("fwd ms", 10, ".3f", "fwd_ms"), H.Column("f+b ms", 10, ".3f", "fwd_bwd_ms"),
    H.Column("fwd TF/s", 10, "#.3g", "fwd_tflops"),
    H.Column("f+b TF/s", 10, "#.3g", "fwd_bwd_tflops"),
    H.Column("fwd MiB", 9, ".0f", "fwd_peak_mib"),
    H.Column("f+b MiB", 9, ".0f", "fwd_bwd_peak_mib"),
    H.Column("1st call s", 11, ".2f", "first_call_s"),
    H.Column("  note", 0, key="note", left=True, fmt=lambda x: "  " + x[:80]),
]
CHECK_COLUMNS = [
    H.Column("method", 16, left=True), H.Column("out err", 11, ".2e", "out_err"),
    H.Column("x torch", 9, ".2f", "out_x_torch"), H.Column("grad err", 11, ".2e", "grad_err"),
    H.Column("x torch", 9, ".2f", "grad_x_torch"),
    H.Column("  note", 0, key="grad_note", left=True, fmt=lambda x: "  " + x[:80]),
]


def run_shape(methods, shape, device, dtype, repeats, budget_s, log):
    rows = []
    for name in METHODS:
        m = methods[name]
        info = {"method": name, "shape": shape.name, "P": shape.P, "S": shape.S, "G": shape.G}
        if isinstance(m, str):
            rows.append({**info, "skipped": m})
            continue
        try:
            rows.append(measure_method(m, shape, device, dtype, repeats, budget_s))
        except Exception as e:  # a backend that cannot run this shape: report, go on
            rows.append({**info, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log(rows[-1])
    return rows


def main():
    ap = H.parser(__doc__, devices=("cpu", "cuda", "auto"), device_default="auto", repeats=50)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    ap.add_argument("--shape", action="append", default=None, metavar="P,S,G[,HQ,HKV,D]",
                    help="measure this shape instead of the defaults (repeatable)")
    ap.add_argument("--methods", default=None, metavar="NAME,...",
                    help=f"only these methods, from {','.join(METHODS)}")
    args = ap.parse_args()
    if args.methods is not None:
        chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in chosen if m not in METHODS]
        if unknown or not chosen:
            ap.error(f"--methods: expected names from {','.join(METHODS)}, got {args.methods!r}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/attention.py: --device cuda but torch sees no GPU")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    repeats = min(args.repeats, 3) if args.quick else args.repeats
    budget_s = 0.5 if args.quick else 1.0
    warnings.filterwarnings("ignore", message=".*flex_attention.*")
    t_start = time.perf_counter()

    methods = make_methods(device, args.quick)
    if args.methods is not None:
        methods = {name: (m if name in chosen else "not in --methods")
                   for name, m in methods.items()}
    for name, m in methods.items():
        if isinstance(m, str):
            print(f"{name}: skipped: {m}")
    if args.shape:
        try:
            shapes = [parse_shape(t, cuda) for t in args.shape]
        except Exception as e:
            ap.error(f"--shape: {e}")
    else:
        shapes = default_shapes(cuda, args.quick)
    print(f"device {H.gpu_name() if cuda else H.cpu_name()}, {dtype}, torch {torch.__version__}\n")
    print("\n".join(H.table(COLUMNS, [])))

    def log(r):
        if "skipped" in r:
            print(f"{r['shape']:<24}{r['method']:<16}  skipped")
        else:
            print(H.table(COLUMNS, [r], lead=2)[1])
    rows = []
    for shape in shapes:
        rows += run_shape(methods, shape, device, dtype, repeats, budget_s, log)

    # Correctness on the first shape, after the timings (so the first timed call of each
    # method, first_call_s, includes any compilation).
    checks = []
    ref = reference(shapes[0], device, dtype)
    for name in METHODS:
        m = methods[name]
        if isinstance(m, str):
            continue
        try:
            checks.append({"method": name, **check_method(m, shapes[0], device, dtype, ref)})
        except Exception as e:
            checks.append({"method": name, "error": f"{type(e).__name__}: {e}"})
    print(f"\ncorrectness on {shapes[0].name} vs the {ref['ref_dtype']} reference (x torch: / "
          f"error of the reference in {dtype}, {ref['torch_err'][0]:.2e} out, "
          f"{ref['torch_err'][1]:.2e} grad; FlashAttention's rule: <= 2 out, <= 3 grad)")
    del ref
    print("\n".join(H.table(CHECK_COLUMNS, checks)))

    sweep_rows = []
    if args.plot:
        print("\nsweeps for the plot (fwd+bwd)")
        for axis, value, shape in sweeps(cuda, args.quick):
            for r in run_shape(methods, shape, device, dtype, max(3, repeats // 2),
                               budget_s / 2, log):
                r["sweep"], r["value"] = axis, value
                sweep_rows.append(r)
        plot(sweep_rows, args.plot, f"{H.gpu_name() if cuda else 'CPU'}, {dtype}")
    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.1f} s")
    H.write_json(args.json, {"benchmark": "attention", "device": str(device),
                             "dtype": str(dtype), "quick": args.quick, "checks": checks,
                             "rows": rows, "sweeps": sweep_rows, "total_s": total})


def plot(rows, path, title):
    plt = H.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, axis, xlabel in ((axes[0], "G", "G (suffixes per prefix)"),
                             (axes[1], "P", "P (prefix tokens)")):
        for name in METHODS:
            mine = [r for r in rows if r["sweep"] == axis and r["method"] == name]
            pts = [(r["value"], r["fwd_bwd_ms"]) for r in mine if "fwd_bwd_ms" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
                continue
            pts = [(r["value"], r["fwd_ms"]) for r in mine if "fwd_ms" in r]
            if pts:  # a method without a backward here (flex on CPU): its forward, dashed
                ax.plot(*zip(*pts), marker="x", linestyle="--", label=f"{name} (forward only)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms, forward+backward (dashed: forward only)")
        ax.grid(True, which="both", alpha=0.3)
    s = [r for r in rows if r["sweep"] == "G" and r["value"] > 1][:1]
    if s:
        axes[0].set_title(f"P = {s[0]['P']}, S = {s[0]['S']}")
    s = [r for r in rows if r["sweep"] == "P"][:1]
    if s:
        axes[1].set_title(f"S = {s[0]['S']}, G = {s[0]['G']}")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"shared-prefix attention, {title}")
    fig.tight_layout()
    H.save(fig, path)


if __name__ == "__main__":
    main()
