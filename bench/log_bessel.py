"""log-Bessel benchmark: throughput and accuracy of the diffkern ops against peers.

    python bench/log_bessel.py [--device cpu|cuda|all] [--n N] [--repeats R] [--quick]
                               [--threads T] [--json PATH] [--plot PATH] [--no-accuracy]

Throughput (evaluations/s, median of ``repeats`` timed calls after a warm-up, cycling over
``--sets`` different input sets so no call re-reads the previous call's data):
  points v log-uniform in [1e-2, 1e4], x log-uniform in [1e-3, 1e5] (never zero);
  n = 1e6 on CPU, 1e7 on CUDA by default.
  CPU: every dk op in float64 and float32, with torch.set_num_threads(1) ("1 thread") and
       with T threads; peers SciPy (single-threaded) log(ive), log(kve), log(iv), log(kv),
       ive(v+1)/ive(v), float64.
  CUDA: CUDA events, one pair per call (bench/_harness.py), median of max(R, 10); peers
       TensorFlow Probability's log_bessel_ive / log_bessel_kve on the JAX substrate when
       importable (a shim restores jax.interpreters.xla.pytype_aval_mappings, removed in
       JAX 0.7, which TFP still reads at import), and torch.special.i0e / i1e (orders 0
       and 1 only: a floor for what one elementwise special-function kernel costs).
  Per-call overhead: one-element tensor, dk.log_ive vs torch.special.i0e, per device, no
  autograd (bench/overhead.py has the autograd and torch.compile modes and a profile).

Accuracy (float64, vs the committed mpmath references tests/reference/log_bessel_ref.npz):
  max and median of |got - ref| / max(1, |ref|) for dk and SciPy, and the fraction of
  non-finite outputs where the reference is finite (SciPy's iv/kv overflow; ive of large
  orders underflows to 0, so log(ive) = -inf).

Prints a table (last), writes JSON (--json), and --plot PATH draws a PNG heat map of the
float64 error of log I and log K over the reference (v, x) grid, dk and SciPy side by side
(needs matplotlib: pip install matplotlib, or the project's "bench" extra).
Absolute rates are for the CPU/GPU named in the output; compare ratios only within a run.
--quick: n = 1e5 (CPU) / 1e6 (CUDA), 3 repeats, for checking that the script runs.
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402
from overhead import plain_overhead  # noqa: E402

import diffkern as dk  # noqa: E402

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
# timing (bench/_harness.py)


def time_cpu(fn, sets, repeats):
    """Median seconds per call; calls cycle over the input sets."""
    return H.measure(fn, sets, clock="wall", warmup=1, repeats=repeats).median


def time_cuda(fn, sets, repeats):
    """Median seconds per call (CUDA events), after one warm-up call per input set."""
    return H.measure(fn, sets, clock="cuda", warmup=len(sets),
                     repeats=max(repeats, 10)).median


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
            t = H.measure(lambda *a, f=f: f(*a).block_until_ready(), sets, clock="wall",
                          warmup=len(sets), repeats=repeats)
            out[f"{name}/{dtype}"] = t.rate(n)
    return out


# ------------------------------------------------------------------------------------
# throughput


def bench_cpu(n, repeats, nsets, threads):
    res = {"device": H.cpu_name(), "n": n,
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
    res["overhead_us"] = plain_overhead("cpu")
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
    res["overhead_us"] = plain_overhead("cuda")
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
    plt = H.pyplot()
    if plt is None:
        return
    from matplotlib.colors import Normalize
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
    H.save(fig, path)


# ------------------------------------------------------------------------------------
# report


def print_table(results):
    lines = []
    rate = H.rate
    if "cpu" in results:
        c = results["cpu"]
        t, r = c["threads"], c["rates"]
        rows = []
        for name in OPS:
            for dname in ("float64", "float32"):
                one = r[f"dk.{name}/{dname}/1t"]
                sp = r.get(f"scipy.{name}/float64/1t") if dname == "float64" else None
                rows.append({"op": name, "dtype": dname, "one": one,
                             "all": r[f"dk.{name}/{dname}/{t}t"], "scipy": sp,
                             "ratio": one / sp if sp else None})
        cols = [H.Column("op", 18, left=True), H.Column("dtype", 9),
                H.Column("dk 1 thread", 15, rate, key="one"),
                H.Column(f"dk {t} threads", 15, rate, key="all"),
                H.Column("SciPy", 15, rate, key="scipy"), H.Column("ratio", 8, ".2f")]
        lines += H.table(cols, rows, title=f"CPU ({c['device']}, n={c['n']:.0e}, {t} threads); "
                                          "ratio = dk 1 thread / SciPy")
        o = c["overhead_us"]
        lines.append(f"per-call overhead, 1 element: dk.log_ive {o['dk.log_ive']:.2f} us, "
                     f"torch.special.i0e {o['torch.special.i0e']:.2f} us")
        lines.append("")
    if "cuda" in results:
        g = results["cuda"]
        r, tfp = g["rates"], g["tfp_jax"]
        rows = []
        for name in OPS:
            for dname in ("float64", "float32"):
                d = r[f"dk.{name}/{dname}"]
                p = tfp.get(f"{name}/{dname}") if tfp.get("available") else None
                rows.append({"op": name, "dtype": dname, "dk": d, "tfp": p or "n/a",
                             "ratio": d / p if p else None})
        for name in ("torch.special.i0e", "torch.special.i1e"):
            for dname in ("float64", "float32"):
                rows.append({"op": name, "dtype": dname, "dk": r[f"{name}/{dname}"],
                             "note": "   (orders 0/1 only: a floor)"})
        cols = [H.Column("op", 18, left=True), H.Column("dtype", 9),
                H.Column("dk", 15, rate, key="dk"),
                H.Column("TFP (JAX)", 15, lambda v: v if isinstance(v, str) else rate(v),
                         key="tfp"),
                H.Column("dk/TFP", 8, ".2f", key="ratio"), H.Column("", 0, key="note")]
        lines += H.table(cols, rows, title=f"CUDA ({g['device']}, n={g['n']:.0e})")
        if not tfp.get("available"):
            lines.append(f"TFP (JAX) not available: {tfp.get('reason')}")
        o = g["overhead_us"]
        lines.append(f"per-call overhead, 1 element: dk.log_ive {o['dk.log_ive']:.2f} us, "
                     f"torch.special.i0e {o['torch.special.i0e']:.2f} us")
        lines.append("")
    if "accuracy" in results:
        a = results["accuracy"]
        rows = []
        for name in OPS:
            d, s = a[f"dk.{name}"], a[f"scipy.{name}"]
            rows.append({"op": name, "dmax": d["max"], "dmed": d["median"],
                         "dnf": d["nonfinite_frac"], "smax": s["max"], "smed": s["median"],
                         "snf": s["nonfinite_frac"]})
        cols = [H.Column("op", 18, left=True), H.Column("dk max", 11, ".2e", key="dmax"),
                H.Column("dk median", 11, ".2e", key="dmed"),
                H.Column("dk nonfin", 10, ".1%", key="dnf"),
                H.Column("SciPy max", 11, ".2e", key="smax"),
                H.Column("SciPy med", 11, ".2e", key="smed"),
                H.Column("SciPy nonfin", 13, ".1%", key="snf")]
        lines += H.table(cols, rows, title="Accuracy, float64, vs mpmath (|got - ref| / "
                         f"max(1, |ref|)), {results['accuracy_points']} reference points")
        worst = max((a[f"dk.{n}"] for n in OPS), key=lambda q: q["max"])
        lines.append(f"dk worst point: {worst['worst']}")
    print("\n".join(lines))


def main(argv=None):
    ap = H.parser(__doc__, repeats=5)
    ap.add_argument("--n", type=int, default=None,
                    help="points (default 1e6 CPU, 1e7 CUDA; --quick 1e5 / 1e6)")
    ap.add_argument("--quick", action="store_true", help="small sizes, 3 repeats")
    ap.add_argument("--sets", type=int, default=3, help="input sets rotated between calls")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-accuracy", action="store_true")
    args = ap.parse_args(argv)
    repeats = min(args.repeats, 3) if args.quick else args.repeats

    results = H.environment()
    try:
        import scipy
        results["scipy"] = scipy.__version__
    except ImportError:
        sys.exit("SciPy is the CPU peer: pip install scipy")
    devices = H.devices(args.device)
    if "cpu" in devices:
        print("timing CPU ...", file=sys.stderr)
        n = args.n or (100_000 if args.quick else 1_000_000)
        results["cpu"] = bench_cpu(n, repeats, args.sets, args.threads)
    if "cuda" in devices:
        print("timing CUDA ...", file=sys.stderr)
        n = args.n or (1_000_000 if args.quick else 10_000_000)
        results["cuda"] = bench_cuda(n, repeats, args.sets)
    if not args.no_accuracy or args.plot:
        ref = load_ref()
        acc, errs = accuracy(ref, "cpu")
        results["accuracy"] = acc
        results["accuracy_points"] = int(ref["v"].size)
        if "cuda" in devices:
            results["accuracy_cuda"] = accuracy(ref, "cuda")[0]
        if args.plot:
            plot(ref, errs, args.plot)
    H.write_json(args.json, results)
    print_table(results)


if __name__ == "__main__":
    main()
