"""Per-call overhead: dk.log_ive on a one-element tensor against torch.special.i0e.

    python bench/overhead.py [--device cpu|cuda|all] [--calls 2000] [--repeats 7]
                             [--modes plain,autograd,backward,compile] [--profile]
                             [--json PATH]

vMF log-likelihoods in a training loop call the log-Bessel ops on tiny tensors, where the
cost is the Python and dispatch path, not the kernel. Both functions get the same
one-element float64 tensors (v = 1.5, x = 2.0); i0e ignores v. Per mode, the median over
--repeats batches of --calls back-to-back calls (one synchronize per batch on CUDA) of the
time per call, in microseconds, and dk / i0e:

  plain     no autograd (inputs without requires_grad). Target: dk <= 2x i0e.
  autograd  x.requires_grad: the forward only (records the graph).
  backward  x.requires_grad: forward + torch.autograd.grad of the output.
  compile   a torch.compile'd function (default backend) calling the op, no autograd.

Extra rows (no target): dk.log_ive with a Python float order (the general input path),
and dk.log_iv for comparison with the scaled function.

--profile splits the plain-mode microseconds through the public API only: cProfile of
dk.log_ive calls (per callee: calls per op call and share of the profiled time, scaled to
the unprofiled time per call), and the unprofiled cost of the torch calls any fast path
makes (allocate the output, read the grad mode, the current stream, the thread count, a
data pointer), for reference. cProfile does not see nanobind functions: the call into the
core (and the kernel) is counted in the self time of the Python function that makes it.
"""
from __future__ import annotations

import cProfile
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

import diffkern as dk  # noqa: E402

MODES = ("plain", "autograd", "backward", "compile")
TARGET = 2.0  # dk / i0e, plain mode


def _inputs(device, grad):
    v = torch.tensor([1.5], dtype=torch.float64, device=device)
    x = torch.tensor([2.0], dtype=torch.float64, device=device, requires_grad=grad)
    return v, x


def _i0e(v, x):
    return torch.special.i0e(x)


def _callables(mode, device, backend):
    """{label: (fn, args)} timed in ``mode``."""
    grad = mode in ("autograd", "backward")
    v, x = _inputs(device, grad)
    fns = {"dk.log_ive": dk.log_ive, "torch.special.i0e": _i0e}
    if mode == "plain":
        fns["dk.log_ive, float v"] = None
        fns["dk.log_iv"] = dk.log_iv
    out = {}
    for label, f in fns.items():
        if label == "dk.log_ive, float v":
            out[label] = (dk.log_ive, (1.5, x))
            continue
        if mode == "backward":
            ones = torch.ones_like(x)

            def f(v, x, f=f, ones=ones):
                return torch.autograd.grad(f(v, x), x, ones)
        elif mode == "compile":
            def call(v, x, f=f):
                return f(v, x)
            f = torch.compile(call, fullgraph=True, backend=backend)
        out[label] = (f, (v, x))
    return out


def measure_mode(device, mode, calls, repeats, backend="inductor"):
    """{label: microseconds per call} for one mode on one device."""
    res = {}
    for label, (f, args) in _callables(mode, device, backend).items():
        warmup = 3 if mode == "compile" else 50  # compile: the first call compiles
        t = H.per_call(f, args, device=device, calls=calls, repeats=repeats, warmup=warmup)
        res[label] = t.median * 1e6
    return res


def plain_overhead(device, calls=2000, repeats=7):
    """dk.log_ive and torch.special.i0e per call, no autograd (bench/log_bessel.py uses it)."""
    r = measure_mode(device, "plain", calls, repeats)
    return {k: r[k] for k in ("dk.log_ive", "torch.special.i0e")}


# ------------------------------------------------------------------------------ profile


def profile(device, calls):
    """Where the plain-mode microseconds of dk.log_ive go (public API only)."""
    v, x = _inputs(device, False)
    total = H.per_call(dk.log_ive, (v, x), device=device, calls=calls).median * 1e6
    prof = cProfile.Profile()
    for _ in range(50):
        dk.log_ive(v, x)
    prof.enable()
    for _ in range(calls):
        dk.log_ive(v, x)
    prof.disable()
    if device == "cuda":
        torch.cuda.synchronize()
    st = pstats.Stats(prof)
    rows, profiled = [], 0.0
    for (file, line, name), (cc, nc, tt, ct, callers) in st.stats.items():
        profiled += tt
        where = name if file == "~" else f"{os.path.basename(file)}:{line}({name})"
        rows.append({"function": where, "calls_per_op": nc / calls, "self_s": tt})
    for r in rows:
        r["share"] = r["self_s"] / profiled if profiled else 0.0
        r["us_scaled"] = r["share"] * total
    rows.sort(key=lambda r: -r["self_s"])

    # Unprofiled cost of torch calls a direct path makes, each on its own.
    cuda = device == "cuda"
    steps = {
        "python call of a no-op function": (lambda a, b: None, (v, x)),
        "torch.compiler.is_compiling()": (lambda: torch.compiler.is_compiling(), ()),
        "torch.is_grad_enabled()": (torch.is_grad_enabled, ()),
        "x.new_empty(x.shape)": (lambda a: a.new_empty(a.shape), (x,)),
        "torch.empty_like(x)": (torch.empty_like, (x,)),
        "torch.empty(shape, dtype=, device=)": (
            lambda a: torch.empty(a.shape, dtype=a.dtype, device=a.device), (x,)),
        "x.device.type": (lambda a: a.device.type, (x,)),
        "x.data_ptr()": (lambda a: a.data_ptr(), (x,)),
        "tuple(x.shape), x.stride()": (lambda a: (tuple(a.shape), a.stride()), (x,)),
        "torch.get_num_threads()": (torch.get_num_threads, ()),
    }
    if cuda:
        steps["torch.cuda.current_stream(dev).cuda_stream"] = (
            lambda a: torch.cuda.current_stream(a.device).cuda_stream, (x,))
    steps["torch.special.i0e(x) (whole op)"] = (torch.special.i0e, (x,))
    prims = {k: H.per_call(f, a, device=device, calls=calls).median * 1e6
             for k, (f, a) in steps.items()}
    return {"total_us": total, "profiled_calls": calls, "cprofile": rows[:15],
            "torch_steps_us": prims}


# -------------------------------------------------------------------------------- main


def report(results):
    L = []
    for dev, r in results["devices"].items():
        L.append(f"Per-call overhead, one float64 element ({r['name']}); us per call, "
                 f"median of {results['repeats']} x {results['calls']} calls")
        rows = []
        for mode in results["modes"]:
            m = r["modes"].get(mode)
            if m is None:
                continue
            if "error" in m:
                rows.append({"mode": mode, "error": m["error"]})
                continue
            base = m["torch.special.i0e"]
            for label, us in m.items():
                row = {"mode": mode, "op": label, "us": us, "ratio": us / base}
                if mode == "plain" and label == "dk.log_ive":
                    row["target"] = "met" if us <= TARGET * base else "missed"
                rows.append(row)
        cols = [H.Column("mode", 10, left=True), H.Column("op", 22, key="op", left=True),
                H.Column("us/call", 10, ".2f", key="us"), H.Column("x i0e", 8, ".2f", key="ratio"),
                H.Column(f"target <= {TARGET:g}x", 17, key="target")]
        L += H.table(cols, rows)
        if "profile" in r:
            p = r["profile"]
            L.append(f"-- profile of dk.log_ive (plain): {p['total_us']:.2f} us per call "
                     "unprofiled; cProfile self time per callee, scaled to that total")
            cols = [H.Column("function", 62, left=True), H.Column("calls/op", 9, ".1f",
                    key="calls_per_op"), H.Column("share", 7, ".0%"),
                    H.Column("~us", 7, ".2f", key="us_scaled")]
            L += H.table(cols, p["cprofile"])
            L.append("-- the same torch calls on their own (unprofiled, us per call):")
            for k, us in p["torch_steps_us"].items():
                L.append(f"   {k:50s}{us:8.3f}")
        L.append("")
    print("\n".join(L).rstrip())


def main(argv=None):
    ap = H.parser(__doc__, repeats=7, plot=False)
    ap.add_argument("--calls", type=int, default=2000, help="calls per timed batch")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma-separated subset of {','.join(MODES)}")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend")
    ap.add_argument("--profile", action="store_true", help="split the plain-mode cost")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"--modes: unknown {bad}; choose from {MODES}")
    results = {"calls": args.calls, "repeats": args.repeats, "modes": modes,
               "target_ratio_plain": TARGET, "compile_backend": args.backend, "devices": {}}
    for dev in H.devices(args.device):
        name = H.gpu_name() if dev == "cuda" else H.cpu_name()
        r = {"name": name, "modes": {}}
        for mode in modes:
            print(f"overhead {dev} {mode} ...", file=sys.stderr)
            try:
                r["modes"][mode] = measure_mode(dev, mode, args.calls, args.repeats, args.backend)
            except Exception as e:  # e.g. no C++ compiler for inductor: report, go on
                r["modes"][mode] = {"error": f"{type(e).__name__}: {e}"}
        plain = r["modes"].get("plain", {})
        if "dk.log_ive" in plain:
            r["plain_ratio"] = plain["dk.log_ive"] / plain["torch.special.i0e"]
            r["target_met"] = r["plain_ratio"] <= TARGET
        if args.profile:
            r["profile"] = profile(dev, args.calls)
        results["devices"][dev] = r
    H.write_json(args.json, results)
    report(results)


if __name__ == "__main__":
    main()
