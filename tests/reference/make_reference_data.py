"""Generate tests/reference/log_bessel_ref.npz: mpmath references for the log-Bessel ops.

    python tests/reference/make_reference_data.py [--out PATH] [--processes N] [--limit N]

Point sets (all inputs are float64 and are used exactly):

- ``grid``:   a tensor grid v x x (v in {0} U [1e-3, 1e6] with integer and half-integer
              orders, x in [1e-300, 1e10], denser over [1e-4, 1e6]); ``grid_shape`` and
              the row-major order allow heat maps.
- ``extra``:  for each grid order v >= 1, points in the transition region x = v z
              (z around 0.6627..., where eta(z) = 0, and around 1) and x ~ v^2.
- ``random``: v log-uniform in [1e-2, 1e4], x log-uniform in [1e-3, 1e5] (seed 20240611).

Stored arrays (float64 unless noted): v, x, set (uint8: 0 grid, 1 extra, 2 random),
log_iv, log_kv, log_ive, log_kve, iv_ratio, dlog_iv_dx, dlog_kv_dx, dlog_iv_dv,
dlog_kv_dv (NaN where not computed: only a subset has d/dv, see ``has_dv``),
method_i / method_k (uint8 codes into ``methods``), grid_v, grid_x.
Each value is the float64 rounding of a reference accurate to ~1e-40 (see mp_bessel.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from tests.reference import mp_bessel as R  # noqa: E402

Z0 = 0.6627434193491816  # root of eta(z) = sqrt(1+z^2) + log(z / (1 + sqrt(1+z^2)))
METHODS = ("special", "mp", "hankel", "debye")
SEED = 20240611


def grid_orders() -> np.ndarray:
    v = set(np.logspace(-3, 6, 46).tolist())
    v |= {0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 5.0, 7.5, 10.0, 10.5, 19.5, 20.0, 25.5,
          50.0, 100.0, 100.5, 1000.0, 12345.5}
    return np.array(sorted(v))


def grid_args() -> np.ndarray:
    x = set([1e-300, 1e-200, 1e-100, 1e-50, 1e-30, 1e-20, 1e-15, 1e-10, 1e-8, 1e-6, 1e-5])
    x |= set(np.logspace(-4, 6, 51).tolist())
    x |= {1e7, 1e8, 1e9, 1e10, 0.5, 1.5, 2.0, 20.0, 35.0}
    return np.array(sorted(x))


def extra_points(orders: np.ndarray):
    vs, xs = [], []
    for v in orders:
        if v < 1:
            continue
        cand = [v * z for z in (0.5, Z0 * 0.98, Z0, Z0 * 1.02, 0.9, 1.0, 1.1, 1.5)]
        cand += [v * v * c for c in (0.5, 1.0, 2.0)]
        for x in cand:
            if 1e-300 <= x <= 1e10:
                vs.append(float(v))
                xs.append(float(x))
    return np.array(vs), np.array(xs)


def random_points(n: int):
    rng = np.random.default_rng(SEED)
    v = np.exp(rng.uniform(np.log(1e-2), np.log(1e4), n))
    x = np.exp(rng.uniform(np.log(1e-3), np.log(1e5), n))
    return v, x


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "log_bessel_ref.npz"))
    ap.add_argument("--processes", type=int, default=os.cpu_count())
    ap.add_argument("--n-random", type=int, default=1000)
    ap.add_argument("--dv-every", type=int, default=1,
                    help="d/dv on every k-th grid point (plus all extra and random points)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N points (timing)")
    args = ap.parse_args(argv)

    gv, gx = grid_orders(), grid_args()
    V, X = np.meshgrid(gv, gx, indexing="ij")
    ev, ex = extra_points(gv)
    rv, rx = random_points(args.n_random)
    v = np.concatenate([V.ravel(), ev, rv])
    x = np.concatenate([X.ravel(), ex, rx])
    sets = np.concatenate([np.zeros(V.size, np.uint8), np.ones(ev.size, np.uint8),
                           np.full(rv.size, 2, np.uint8)])
    dv = np.zeros(v.size, bool)
    dv[: V.size: args.dv_every] = True
    dv[V.size: V.size + ev.size] = True
    dv[V.size + ev.size:] = True
    if args.limit:
        # a spread-out sample of every set, for timing
        idx = np.linspace(0, v.size - 1, args.limit).astype(int)
        v, x, sets, dv = v[idx], x[idx], sets[idx], dv[idx]
    print(f"{v.size} points ({dv.sum()} with d/dv), {args.processes} processes",
          file=sys.stderr)
    t0 = time.time()
    res = R.evaluate_many(v, x, dv, processes=args.processes, progress=True)
    elapsed = time.time() - t0
    print(f"evaluated in {elapsed:.1f} s", file=sys.stderr)

    out = {"v": v, "x": x, "set": sets, "has_dv": dv, "grid_v": gv, "grid_x": gx,
           "grid_shape": np.array(V.shape), "methods": np.array(METHODS)}
    for q in R.QUANTITIES:
        out[q] = np.array(res[q], dtype=np.float64)
    for kind in ("i", "k"):
        out[f"method_{kind}"] = np.array([METHODS.index(m) for m in res[f"method_{kind}"]],
                                         dtype=np.uint8)
    out["info"] = np.array(
        f"mpmath references, WORK_DPS={R.WORK_DPS}, target 1e-40 relative; "
        f"generated in {elapsed:.0f} s by tests/reference/make_reference_data.py")
    if args.limit:
        print("(--limit: not saving)", file=sys.stderr)
        return
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()
