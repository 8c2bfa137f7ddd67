"""log-Bessel benchmark: throughput and accuracy of the diffkern ops against peers.

    python bench/log_bessel.py [--device cpu|cuda|all] [--n N] [--repeats R]
                               [--threads T] [--json PATH] [--plot PATH]

Throughput (evaluations/s, median of ``repeats`` timed calls after a warm-up, cycling over
``--sets`` different input sets so no call re-reads the previous call's data):
  points v log-uniform in [1e-2, 1e4], x log-uniform in [1e-3, 1e5] (never zero);
  n = 1e6 on CPU, 1e7 on CUDA by default.
  CPU: every dk op in float64 and float32, with torch.set_num_threads(1) ("1 thread") and
       with T threads; peers SciPy (single-threaded) log(ive), log(kve), log(iv), log(kv),
       ive(v+1)/ive(v), float64.
  CUDA: CUDA events (triton.testing.do_bench when triton is importable); peers
       TensorFlow Probability's log_bessel_ive / log_bessel_kve on the JAX substrate when
       importable (a shim restores jax.interpreters.xla.pytype_aval_mappings, removed in
       JAX 0.7, which TFP still reads at import), and torch.special.i0e / i1e (orders 0
       and 1 only: a floor for what one elementwise special-function kernel costs).
  Per-call overhead: one-element tensor, dk.log_ive vs torch.special.i0e, per device.

Accuracy (float64, vs the committed mpmath references tests/reference/log_bessel_ref.npz):
  max and median of |got - ref| / max(1, |ref|) for dk and SciPy, and the fraction of
  non-finite outputs where the reference is finite (SciPy's iv/kv overflow; ive of large
  orders underflows to 0, so log(ive) = -inf).

Prints a table (last), writes JSON (--json), and --plot PATH draws a PNG heat map of the
float64 error of log I and log K over the reference (v, x) grid, dk and SciPy side by side
(needs matplotlib: pip install matplotlib, or the project's "bench" extra).
Absolute rates are for the CPU/GPU named in the output; compare ratios only within a run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

import diffkern as dk

HERE = os.path.dirname(os.path.abspath(__file__))
NPZ = os.path.join(os.path.dirname(HERE), "tests", "reference", "log_bessel_ref.npz")

OPS = ("log_iv", "log_kv", "log_ive", "log_kve", "bessel_iv_ratio")


# ------------------------------------------------------------------------------------
# inputs


def make_sets(n, nsets, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(nsets):
        u = torch.rand(2, n, generator=g, dtype=torch.float64)
        v = torch.exp(math.log(1e-2) + u[0] * (math.log(1e4) - math.log(1e-2)))
        x = torch.exp(math.log(1e-3) + u[1] * (math.log(1e5) - math.log(1e-3)))
        out.append((v.to(device=device, dtype=dtype), x.to(device=device, dtype=dtype)))
    return out


# ------------------------------------------------------------------------------------
# timing


def time_cpu(fn, sets, repeats):
    """Median seconds per call; calls cycle over the input sets."""
    fn(*sets[0])                                    # warm-up
    times = []
    for i in range(repeats):
        a = sets[(i + 1) % len(sets)]
        t = time.perf_counter()
        fn(*a)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_cuda(fn, sets, repeats):
    try:
        import triton.testing as tt
        k = [0]

        def call():
            k[0] += 1
            fn(*sets[k[0] % len(sets)])
        return tt.do_bench(call, warmup=25, rep=max(100, 20 * repeats),
                           return_mode="median") * 1e-3
    except Exception:
        pass
    for a in sets:                                  # warm-up, every set
        fn(*a)
    torch.cuda.synchronize()
    times = []
    for i in range(max(repeats, 10)):
        a = sets[i % len(sets)]
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(*a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e-3)
    return statistics.median(times)


def per_call_overhead(fn, device, calls=2000):
    """Median microseconds per call on a one-element tensor (batches of `calls`)."""
    v = torch.tensor([1.0], dtype=torch.float64, device=device)
    x = torch.tensor([2.0], dtype=torch.float64, device=device)
    for _ in range(50):
        fn(v, x)
    if device == "cuda":
        torch.cuda.synchronize()
    res = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            fn(v, x)
        if device == "cuda":
            torch.cuda.synchronize()
        res.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(res)


# ------------------------------------------------------------------------------------
# peers


def scipy_peers():
    import scipy.special as sps
    return {
        "log_iv": lambda v, x: np.log(sps.iv(v, x)),
        "log_kv": lambda v, x: np.log(sps.kv(v, x)),
        "log_ive": lambda v, x: np.log(sps.ive(v, x)),
        "log_kve": lambda v, x: np.log(sps.kve(v, x)),
        "bessel_iv_ratio": lambda v, x: sps.ive(v + 1, x) / sps.ive(v, x),
    }


def import_tfp_jax():
    """TFP's JAX substrate, or (None, reason). TFP reads
    jax.interpreters.xla.pytype_aval_mappings at import; JAX >= 0.7 removed that alias of
    jax.core.pytype_aval_mappings (jax._src.core in the newest releases), so put it back."""
    try:
        import jax
        jax.config.update("jax_enable_x64", True)
        from jax.interpreters import xla
        try:
            xla.pytype_aval_mappings  # noqa: B018
        except AttributeError:
            target = None
            for mod in ("jax.core", "jax._src.core"):
                try:
                    m = __import__(mod, fromlist=["pytype_aval_mappings"])
                    target = m.pytype_aval_mappings
                    break
                except (ImportError, AttributeError):
                    continue
            if target is None:
                return None, "no pytype_aval_mappings in jax.core or jax._src.core"
            xla.pytype_aval_mappings = target
        from tensorflow_probability.substrates import jax as tfp
        return (jax, tfp), None
    except Exception as e:  # not installed, or incompatible
        return None, f"{type(e).__name__}: {e}"


def bench_tfp_jax(n, repeats, nsets):
    got, why = import_tfp_jax()
    if got is None:
        return {"available": False, "reason": why}
    jax, tfp = got
    import jax.numpy as jnp
    out = {"available": True, "jax": jax.__version__,
           "device": str(jax.devices()[0])}
    fns = {"log_ive": jax.jit(tfp.math.log_bessel_ive),
           "log_kve": jax.jit(tfp.math.log_bessel_kve)}
    for dtype, jdt in (("float64", jnp.float64), ("float32", jnp.float32)):
        sets = []
        for v, x in make_sets(n, nsets, "cpu", torch.float64, seed=1):
            sets.append((jnp.asarray(v.numpy(), dtype=jdt), jnp.asarray(x.numpy(), dtype=jdt)))
        for name, f in fns.items():
            for a in sets:
                f(*a).block_until_ready()
            times = []
            for i in range(repeats):
                a = sets[i % len(sets)]
                t = time.perf_counter()
                f(*a).block_until_ready()
                times.append(time.perf_counter() - t)
            out[f"{name}/{dtype}"] = n / statistics.median(times)
    return out


# ------------------------------------------------------------------------------------
# throughput


def bench_cpu(n, repeats, nsets, threads):
    res = {"device": platform.processor() or platform.machine(), "n": n,
           "threads": threads, "rates": {}}
    saved = torch.get_num_threads()
    for dtype in (torch.float64, torch.float32):
        sets = make_sets(n, nsets, "cpu", dtype)
        dname = str(dtype).replace("torch.", "")
        for name in OPS:
            f = getattr(dk, name)
            for t in (1, threads):
                torch.set_num_threads(t)
                sec = time_cpu(f, sets, repeats)
                res["rates"][f"dk.{name}/{dname}/{t}t"] = n / sec
            torch.set_num_threads(saved)
    sets = [(v.numpy(), x.numpy()) for v, x in make_sets(n, nsets, "cpu", torch.float64)]
    for name, f in scipy_peers().items():
        with np.errstate(all="ignore"):
            sec = time_cpu(f, sets, repeats)
        res["rates"][f"scipy.{name}/float64/1t"] = n / sec
    res["overhead_us"] = {
        "dk.log_ive": per_call_overhead(dk.log_ive, "cpu"),
        "torch.special.i0e": per_call_overhead(lambda v, x: torch.special.i0e(x), "cpu"),
    }
    return res


def bench_cuda(n, repeats, nsets):
    res = {"device": torch.cuda.get_device_name(), "n": n, "rates": {}}
    for dtype in (torch.float64, torch.float32):
        sets = make_sets(n, nsets, "cuda", dtype)
        dname = str(dtype).replace("torch.", "")
        for name in OPS:
            res["rates"][f"dk.{name}/{dname}"] = n / time_cuda(getattr(dk, name), sets, repeats)
        res["rates"][f"torch.special.i0e/{dname}"] = n / time_cuda(
            lambda v, x: torch.special.i0e(x), sets, repeats)
        res["rates"][f"torch.special.i1e/{dname}"] = n / time_cuda(
            lambda v, x: torch.special.i1e(x), sets, repeats)
        del sets
    torch.cuda.empty_cache()
    res["tfp_jax"] = bench_tfp_jax(n, repeats, nsets)
    res["overhead_us"] = {
        "dk.log_ive": per_call_overhead(dk.log_ive, "cuda"),
        "torch.special.i0e": per_call_overhead(lambda v, x: torch.special.i0e(x), "cuda"),
    }
    return res


# ------------------------------------------------------------------------------------
# accuracy


REF_KEY = {"log_iv": "log_iv", "log_kv": "log_kv", "log_ive": "log_ive",
           "log_kve": "log_kve", "bessel_iv_ratio": "iv_ratio"}


def mixed_error(got, want):
    got = np.asarray(got, np.float64)
    err = np.zeros(want.shape)
    fin = np.isfinite(want)
    with np.errstate(all="ignore"):
        err[fin] = np.abs(got[fin] - want[fin]) / np.maximum(1.0, np.abs(want[fin]))
    err[fin & ~np.isfinite(got)] = np.inf
    return err


def load_ref():
    d = np.load(NPZ)
    return {k: d[k] for k in d.files}


def accuracy(ref, device="cpu"):
    v, x = ref["v"], ref["x"]
    tv = torch.tensor(v, dtype=torch.float64, device=device)
    tx = torch.tensor(x, dtype=torch.float64, device=device)
    out, errs = {}, {}
    peers = scipy_peers()
    for name in OPS:
        want = ref[REF_KEY[name]]
        fin = np.isfinite(want)
        for who, got in (("dk", getattr(dk, name)(tv, tx).cpu().numpy()),
                         ("scipy", _scipy_eval(peers[name], v, x))):
            e = mixed_error(got, want)
            errs[(who, name)] = e
            i = int(np.argmax(np.where(np.isfinite(e), e, -1)))
            finite = np.isfinite(e)
            out[f"{who}.{name}"] = {
                "max": float(np.max(e[finite])) if finite.any() else math.nan,
                "median": float(np.median(e[finite])) if finite.any() else math.nan,
                "nonfinite_frac": float(np.mean(~np.isfinite(got[fin]))),
                "worst": {"v": float(v[i]), "x": float(x[i]), "got": float(got[i]),
                          "ref": float(want[i])},
            }
    return out, errs


def _scipy_eval(f, v, x):
    with np.errstate(all="ignore"):
        return f(v, x)


# ------------------------------------------------------------------------------------
# plot


def plot(ref, errs, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import Normalize
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return
    nv, nx = (int(a) for a in ref["grid_shape"])
    gv, gx = ref["grid_v"], ref["grid_x"]
    # The grid is not uniform in log (sparse below x = 1e-4, v = 0 included): draw cells
    # by index and label the axes with the values.
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), sharex=True, sharey=True,
                             constrained_layout=True)
    norm = Normalize(vmin=-17, vmax=0)

    def ticks(vals, every):
        idx = list(range(0, len(vals), every))
        return idx, [("0" if a == 0 else f"{a:.0e}".replace("e+0", "e").replace("e-0", "e-")
                      .replace("e+", "e")) for a in vals[idx]]

    for row, name in enumerate(("log_iv", "log_kv")):
        for col, who in enumerate(("dk", "scipy")):
            e = errs[(who, name)][: nv * nx].reshape(nv, nx)
            with np.errstate(divide="ignore"):
                le = np.log10(np.where(np.isfinite(e), np.maximum(e, 1e-17), 1.0))
            ax = axes[row, col]
            m = ax.pcolormesh(np.arange(nx), np.arange(nv), le, norm=norm, cmap="viridis",
                              shading="nearest")
            ax.set_title(f"{who}: {name} (yellow: error >= 1 or non-finite)")
            xi, xl = ticks(gx, 5)
            vi, vl = ticks(gv, 4)
            ax.set_xticks(xi, xl, rotation=60, fontsize=7)
            ax.set_yticks(vi, vl, fontsize=7)
            if row == 1:
                ax.set_xlabel("x (grid index; labels are values)")
            if col == 0:
                ax.set_ylabel("v")
    fig.colorbar(m, ax=axes, shrink=0.8, label="log10(|got - ref| / max(1, |ref|))")
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


# ------------------------------------------------------------------------------------
# report


def fmt_rate(r):
    return f"{r / 1e6:10.2f} M/s"


def print_table(results):
    lines = []
    if "cpu" in results:
        c = results["cpu"]
        lines.append(f"CPU ({c['device']}, n={c['n']:.0e}, {c['threads']} threads); "
                     "ratio = dk 1 thread / SciPy")
        lines.append(f"{'op':18s}{'dtype':>9s}{'dk 1 thread':>15s}{'dk ' + str(c['threads']) + ' threads':>15s}"
                     f"{'SciPy':>15s}{'ratio':>8s}")
        r = c["rates"]
        for name in OPS:
            for dname in ("float64", "float32"):
                one = r[f"dk.{name}/{dname}/1t"]
                allt = r[f"dk.{name}/{dname}/{c['threads']}t"]
                sp = r.get(f"scipy.{name}/float64/1t") if dname == "float64" else None
                ratio = f"{one / sp:8.2f}" if sp else f"{'':8s}"
                lines.append(f"{name:18s}{dname:>9s}{fmt_rate(one):>15s}{fmt_rate(allt):>15s}"
                             f"{fmt_rate(sp) if sp else '':>15s}{ratio}")
        o = c["overhead_us"]
        lines.append(f"per-call overhead, 1 element: dk.log_ive {o['dk.log_ive']:.2f} us, "
                     f"torch.special.i0e {o['torch.special.i0e']:.2f} us")
        lines.append("")
    if "cuda" in results:
        g = results["cuda"]
        lines.append(f"CUDA ({g['device']}, n={g['n']:.0e})")
        r = g["rates"]
        t = g["tfp_jax"]
        lines.append(f"{'op':18s}{'dtype':>9s}{'dk':>15s}{'TFP (JAX)':>15s}{'dk/TFP':>8s}")
        for name in OPS:
            for dname in ("float64", "float32"):
                d = r[f"dk.{name}/{dname}"]
                p = t.get(f"{name}/{dname}") if t.get("available") else None
                lines.append(f"{name:18s}{dname:>9s}{fmt_rate(d):>15s}"
                             f"{fmt_rate(p) if p else 'n/a':>15s}"
                             f"{(f'{d / p:8.2f}') if p else '':8s}")
        for name in ("torch.special.i0e", "torch.special.i1e"):
            for dname in ("float64", "float32"):
                lines.append(f"{name:18s}{dname:>9s}{fmt_rate(r[f'{name}/{dname}']):>15s}"
                             "   (orders 0/1 only: a floor)")
        if not t.get("available"):
            lines.append(f"TFP (JAX) not available: {t.get('reason')}")
        o = g["overhead_us"]
        lines.append(f"per-call overhead, 1 element: dk.log_ive {o['dk.log_ive']:.2f} us, "
                     f"torch.special.i0e {o['torch.special.i0e']:.2f} us")
        lines.append("")
    if "accuracy" in results:
        a = results["accuracy"]
        lines.append("Accuracy, float64, vs mpmath (|got - ref| / max(1, |ref|)), "
                     f"{results['accuracy_points']} reference points")
        lines.append(f"{'op':18s}{'dk max':>11s}{'dk median':>11s}{'dk nonfin':>10s}"
                     f"{'SciPy max':>11s}{'SciPy med':>11s}{'SciPy nonfin':>13s}")
        for name in OPS:
            d, s = a[f"dk.{name}"], a[f"scipy.{name}"]
            lines.append(f"{name:18s}{d['max']:11.2e}{d['median']:11.2e}"
                         f"{d['nonfinite_frac']:10.1%}{s['max']:11.2e}{s['median']:11.2e}"
                         f"{s['nonfinite_frac']:13.1%}")
        worst = max((a[f"dk.{n}"] for n in OPS), key=lambda q: q["max"])
        lines.append(f"dk worst point: {worst['worst']}")
    print("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    ap.add_argument("--n", type=int, default=None, help="points (default 1e6 CPU, 1e7 CUDA)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sets", type=int, default=3, help="input sets rotated between calls")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--no-accuracy", action="store_true")
    args = ap.parse_args(argv)

    results = {"torch": torch.__version__, "python": platform.python_version(),
               "platform": platform.platform()}
    try:
        import scipy
        results["scipy"] = scipy.__version__
    except ImportError:
        sys.exit("SciPy is the CPU peer: pip install scipy")
    cuda_ok = torch.cuda.is_available()
    try:
        cuda_ok = cuda_ok and bool(dk.build_info()["cuda"])
    except Exception:
        pass
    if args.device in ("cpu", "all"):
        print("timing CPU ...", file=sys.stderr)
        results["cpu"] = bench_cpu(args.n or 1_000_000, args.repeats, args.sets, args.threads)
    if args.device in ("cuda", "all"):
        if cuda_ok:
            print("timing CUDA ...", file=sys.stderr)
            results["cuda"] = bench_cuda(args.n or 10_000_000, args.repeats, args.sets)
        elif args.device == "cuda":
            sys.exit("no usable CUDA device (torch.cuda.is_available() or the diffkern build)")
    if not args.no_accuracy or args.plot:
        ref = load_ref()
        acc, errs = accuracy(ref, "cpu")
        results["accuracy"] = acc
        results["accuracy_points"] = int(ref["v"].size)
        if cuda_ok and args.device in ("cuda", "all"):
            results["accuracy_cuda"] = accuracy(ref, "cuda")[0]
        if args.plot:
            plot(ref, errs, args.plot)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    print_table(results)


if __name__ == "__main__":
    main()
