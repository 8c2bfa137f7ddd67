"""Where in (v, x) a log-Bessel op is least accurate: worst error per region.

    python bench/log_bessel_error_map.py [--op log_kv] [--what value|dx|dv]
                                         [--device cpu] [--top 10]

Uses every point of tests/reference/log_bessel_ref.npz (grid, transition and random sets;
d/dv only where stored). Rows are bands of v, columns bands of x; each cell prints
-log10 of the worst |got - ref| / max(1, |ref|) in it ("." no points, "!" non-finite
where the reference is finite), then the --top worst points. Runs in seconds; use it to
move a branch limit and see the effect region by region.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import diffkern as dk  # noqa: E402
from log_bessel import load_ref, mixed_error  # noqa: E402

V_EDGES = [0, 1e-12, 1e-2, 0.5, 2, 8, 20, 50, 200, 1e3, 1e4, 1e5, np.inf]
X_EDGES = [0, 1e-20, 1e-4, 1e-2, 0.3, 1, 2, 5, 20, 35, 100, 1e3, 1e4, 1e6, np.inf]

DX = {"log_iv": ("dlog_iv_dx", 0.0), "log_kv": ("dlog_kv_dx", 0.0),
      "log_ive": ("dlog_iv_dx", -1.0), "log_kve": ("dlog_kv_dx", 1.0)}
DV = {"log_iv": "dlog_iv_dv", "log_kv": "dlog_kv_dv",
      "log_ive": "dlog_iv_dv", "log_kve": "dlog_kv_dv"}


def evaluate(ref, op, what, device):
    f = getattr(dk, op)
    m = ref["has_dv"] if what == "dv" else np.ones(ref["v"].size, bool)
    v = torch.tensor(ref["v"][m], dtype=torch.float64, device=device,
                     requires_grad=(what == "dv"))
    x = torch.tensor(ref["x"][m], dtype=torch.float64, device=device,
                     requires_grad=(what == "dx"))
    y = f(v, x)
    if what == "value":
        got = y.detach()
        want = ref["iv_ratio" if op == "bessel_iv_ratio" else op][m]
    elif what == "dx":
        (got,) = torch.autograd.grad(y.sum(), (x,))
        key, shift = DX[op]
        want = ref[key][m] + shift
    else:
        (got,) = torch.autograd.grad(y.sum(), (v,))
        want = ref[DV[op]][m]
    return ref["v"][m], ref["x"][m], got.cpu().numpy(), want


def band(edges, i):
    def f(a):
        return "0" if a == 0 else ("inf" if np.isinf(a) else f"{a:g}")
    return f"[{f(edges[i])},{f(edges[i + 1])})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", default="log_kv",
                    choices=("log_iv", "log_kv", "log_ive", "log_kve", "bessel_iv_ratio"))
    ap.add_argument("--what", default="value", choices=("value", "dx", "dv"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args(argv)
    if args.op == "bessel_iv_ratio" and args.what != "value":
        sys.exit("references hold only values for bessel_iv_ratio")

    ref = load_ref()
    v, x, got, want = evaluate(ref, args.op, args.what, args.device)
    err = mixed_error(got, want)
    iv = np.searchsorted(V_EDGES, v, side="right") - 1
    ix = np.searchsorted(X_EDGES, x, side="right") - 1
    print(f"{args.op} {args.what}: -log10(worst mixed error) per region "
          f"({v.size} points; '!' = non-finite where the reference is finite)")
    head = f"{'v | x':>16s}" + "".join(f"{band(X_EDGES, j):>13s}" for j in range(len(X_EDGES) - 1))
    print(head)
    for i in range(len(V_EDGES) - 1):
        row = f"{band(V_EDGES, i):>16s}"
        for j in range(len(X_EDGES) - 1):
            sel = (iv == i) & (ix == j)
            if not sel.any():
                cell = "."
            else:
                e = err[sel].max()
                cell = "!" if np.isinf(e) else ("exact" if e == 0 else f"{-np.log10(e):.1f}")
            row += f"{cell:>13s}"
        print(row)
    order = np.argsort(-np.where(np.isnan(err), np.inf, err))[: args.top]
    print(f"\nworst {args.top} points:")
    for k in order:
        print(f"  v={float(v[k])!r:24} x={float(x[k])!r:24} got={float(got[k])!r:26} "
              f"ref={float(want[k])!r:26} "
              f"err={err[k]:.3g}")


if __name__ == "__main__":
    main()
