"""Soak test: random problems per public op for a given time, each under a wall-clock guard.

    python scripts/soak.py [--seconds 120] [--device cpu|cuda] [--seed 0] [--out DIR]
                           [--timeout 60] [--threads 1] [--ot-share 0.3]
    python scripts/soak.py --replay DIR/<kind>-<op>-<index>.pt

Ops: dk.log_iv, log_ive, log_kv, log_kve, bessel_iv_ratio (float64/float32/float16 inputs,
sizes up to 4096, orders and arguments from subnormals to the largest finite, infinities,
NaN, negatives, negative integer orders), and VonMisesFisher sample / log_prob / entropy /
fit_von_mises_fisher (p from 2 to 1000, concentrations from 1e-6 to the largest finite and
inf), and dk.prefix_attention forward + backward (every fifth problem; random layouts, heads,
dtypes and switches, scripts/soak_attention.py says which and the contract). Problem i is
a deterministic function of (seed, i). Each one runs in a worker process
whose reply must arrive within --timeout seconds: no reply is a *hang* (the worker is
killed and restarted), a dead worker a *crash*, an exception on valid input an
*exception*, and a result that breaks the contract a *wrong* result:

* log-Bessel: the documented NaN / limit values (special.py's docstring), SciPy's ive/kve
  in float64 where they are normal numbers (1e-12 relative for float64 results, 2e-5 for
  float32, 2 eps for float16), mpmath at one moderate point, finite wherever the true value
  is finite and fits the dtype, result dtype and shape;
* vMF: samples finite and on the sphere; kappa (1 - mu.x) averaged over the batch within 6
  standard errors of kappa (1 - A_p(kappa)) (A_p from dk.bessel_iv_ratio, itself checked
  above); log_prob and entropy finite and equal to mpmath at one element; the
  concentration solver's round trip kappa -> A_p(kappa) -> kappa (1e-9 relative); fit
  dtypes and shapes;
* attention: the dense float64 reference on the CPU, FlashAttention's error rule on CUDA,
  finite results, the deterministic mode's bits repeated (soak_attention.py).

Every failure is saved in --out as <kind>-<op>-<index>.pt (the op and its inputs) plus a
.json line of what happened; --replay reruns one. OT: when bench/soak_ot.py exists its
main() runs for --ot-share of the time with its own guard and reproducers (in DIR/ot).
The table and report.json (in --out) give calls, hangs, crashes, exceptions and wrong
results per op. Exit status 1 if anything failed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import multiprocessing as mp
import os
import sys
import time

import soak_attention

LOG_OPS = ("log_iv", "log_ive", "log_kv", "log_kve", "bessel_iv_ratio")
VMF_OPS = ("vmf_sample", "vmf_log_prob", "vmf_entropy", "vmf_fit")
I_FAMILY = ("log_iv", "log_ive", "bessel_iv_ratio")
# The log-Bessel oracle is shared with the property tests (tests/reference/).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
SPECIAL = [0.0, -0.0, 5e-324, 1e-310, 1e-300, 1e-45, 1e-30, 1e-8, 0.5, 1.0, 2.5, 30.0, 1e3,
           1e8, 1e15, 1e38, 1e150, 1e155, 1e300, 1.7e308, math.inf, math.nan, -1.0, -2.0,
           -2.5, -1e-300, -math.inf]


# ------------------------------------------------------------------------- problems


def _draw_values(rng, n, dtype_name):
    """n values from a mixture: log-uniform over the dtype's whole range, moderate
    uniform, integers (negative ones too), and special values."""
    import numpy as np

    hi = 308.0 if dtype_name == "float64" else (38.0 if dtype_name == "float32" else 4.8)
    lo = -323.0 if dtype_name == "float64" else (-45.0 if dtype_name == "float32" else -7.0)
    kind = rng.integers(0, 4, n)
    out = np.empty(n)
    out[kind == 0] = 10.0 ** rng.uniform(lo, hi, (kind == 0).sum())
    out[kind == 1] = rng.uniform(0, 200, (kind == 1).sum())
    out[kind == 2] = rng.integers(-6, 60, (kind == 2).sum())
    sp = kind == 3
    out[sp] = np.asarray(SPECIAL)[rng.integers(0, len(SPECIAL), sp.sum())]
    # mostly regular problems: special values in a tenth of the elements
    keep = (kind != 3) | (rng.random(n) < 0.4)
    out[~keep] = 10.0 ** rng.uniform(-3, 3, (~keep).sum())
    return out


def make_problem(seed: int, index: int, device: str) -> dict:
    """The problem (op + inputs as CPU tensors and parameters), deterministic in (seed, index)."""
    import numpy as np
    import torch

    if index % 5 == 4:  # its own stream, so the other ops' problems keep their draws' shape
        return soak_attention.make_problem(np.random.default_rng([seed, index, 1]), device)
    rng = np.random.default_rng([seed, index])
    if rng.random() < 0.6:
        op = LOG_OPS[rng.integers(len(LOG_OPS))]
        dt = ["float64", "float32", "float16"][rng.choice(3, p=[0.5, 0.4, 0.1])]
        n = int(rng.choice([1, 7, 64, 1000, 4096]))
        # broadcast sometimes: v of shape (n, 1) against x of shape (m,)
        if rng.random() < 0.2 and n > 1:
            m = int(rng.integers(1, 9))
            v = _draw_values(rng, n, dt).reshape(n, 1)
            x = _draw_values(rng, m, dt)
        else:
            v = _draw_values(rng, n, dt)
            x = _draw_values(rng, n, dt)
        return dict(op=op, dtype=dt, device=device,
                    v=torch.from_numpy(v).to(getattr(torch, dt)),
                    x=torch.from_numpy(x).to(getattr(torch, dt)))
    op = VMF_OPS[rng.integers(len(VMF_OPS))]
    dt = ["float64", "float32", "float16"][rng.choice(3, p=[0.5, 0.4, 0.1])]
    p = int(rng.choice([2, 3, 4, 10, 100, 1000]))
    b = int(rng.choice([1, 4, 32]))
    top = {"float64": 308.0, "float32": 38.0, "float16": 4.8}[dt]
    kap = 10.0 ** rng.uniform(-6, top, b)
    kap[rng.random(b) < 0.05] = math.inf
    loc = rng.standard_normal((b, p))
    loc /= np.linalg.norm(loc, axis=-1, keepdims=True)
    return dict(op=op, dtype=dt, device=device, p=p, n=int(rng.choice([1, 16, 200])),
                loc=torch.from_numpy(loc), kappa=torch.from_numpy(kap),
                torch_seed=int(rng.integers(2 ** 31)))


# -------------------------------------------------------------------------- checks


def _log_bessel_reference(op, v, x):
    """(ref, known) from the shared contract oracle (tests/reference/log_bessel_contract.py),
    plus where the value must be finite and a crude bound on its magnitude."""
    import numpy as np

    from tests.reference.log_bessel_contract import reference

    ref, known = reference(op, v, x)
    with np.errstate(all="ignore"):
        nan = np.isnan(v) | np.isnan(x) | (x < 0) | (np.isinf(v) & (x == np.inf))
        if op in I_FAMILY:
            nan |= (v < 0) & ~(np.isfinite(v) & (v == np.floor(v)))
        # finite wherever the value is finite and (by a crude bound) fits the dtype
        regular = ~nan & np.isfinite(v) & np.isfinite(x) & (x > 0)
        av = np.abs(v)
        bound = x + (av + 1) * (np.abs(np.log(x)) + np.log1p(av) + 2) + 10
        if op == "bessel_iv_ratio":
            bound = np.where(v >= 0, 1.0, 2 * av / x + 1)
    return ref, known, regular, bound


def mp_converged(*args, **kwargs):
    from tests.reference.log_bessel_contract import mp_converged as shared

    return shared(*args, **kwargs)


def check_log_bessel(dk, prob):
    import mpmath
    import numpy as np
    import torch

    op, dt = prob["op"], getattr(torch, prob["dtype"])
    dev = prob["device"]
    v, x = prob["v"].to(dev), prob["x"].to(dev)
    out = getattr(dk, op)(v, x)
    fails = []
    shape = torch.broadcast_shapes(v.shape, x.shape)
    if out.dtype != dt or out.shape != shape or out.device != v.device:
        fails.append(f"dtype/shape/device {out.dtype}/{tuple(out.shape)}/{out.device}, want "
                     f"{dt}/{tuple(shape)}/{v.device}")
    compute = torch.float32 if dt == torch.float16 else dt
    vv = v.to(compute).double().cpu().expand(shape).numpy()
    xx = x.to(compute).double().cpu().expand(shape).numpy()
    got = out.double().cpu().numpy()
    ref, known, regular, bound = _log_bessel_reference(op, vv, xx)
    fi = torch.finfo(dt)
    with np.errstate(all="ignore"):
        ref_r = torch.from_numpy(np.ascontiguousarray(ref)).to(dt).double().numpy()
        rel = {torch.float64: 1e-12, torch.float32: 2e-5}.get(dt, 2 * fi.eps)
        tol = rel * (np.abs(ref) + (fi.tiny if dt != torch.float64 else 0.0)
                     if op == "bessel_iv_ratio" else np.maximum(1.0, np.abs(ref)))
        same = (np.isnan(got) & np.isnan(ref)) | (got == ref_r) | (
            np.isfinite(ref_r) & (np.abs(got - ref) <= tol))
        bad = known & ~same
        nonfinite = regular & (bound < 0.5 * fi.max) & ~np.isfinite(got)
    for mask, what in ((bad, "value"), (nonfinite, "not finite")):
        if mask.any():
            i = np.flatnonzero(mask)[0]
            fails.append(f"{what}: {op}(v={vv.flat[i]!r}, x={xx.flat[i]!r}) in {dt} = "
                         f"{got.flat[i]!r}, reference {ref.flat[i]!r} ({int(mask.sum())} of "
                         f"{mask.size} elements)")
    # one moderate point against mpmath at 30 digits (float64 only: tight tolerance)
    mod = regular & (np.abs(vv) <= 300) & (xx >= 1e-20) & (xx <= 1e4)
    if op in I_FAMILY:
        mod &= vv >= 0
    idx = np.flatnonzero(mod)
    if dt == torch.float64 and idx.size:
        i = idx[0]
        a, b = float(vv.flat[i]), float(xx.flat[i])
        def value():
            if op == "bessel_iv_ratio":
                return mpmath.besseli(a + 1, b) / mpmath.besseli(a, b)
            if op in ("log_iv", "log_ive"):
                return mpmath.log(mpmath.besseli(a, b)) - (b if op == "log_ive" else 0)
            return mpmath.log(mpmath.besselk(a, b)) + (b if op == "log_kve" else 0)

        want = mp_converged(value)
        scale = abs(want) if op == "bessel_iv_ratio" else max(1.0, abs(want))
        if want is not None and not abs(got.flat[i] - want) <= 1e-14 * scale:
            fails.append(f"mpmath: {op}({a!r}, {b!r}) = {got.flat[i]!r}, mpmath {want!r}")
    return fails, int(out.numel())


def check_vmf(dk, prob):
    import torch
    from diffkern.distributions import (VonMisesFisher,
                                        concentration_from_mean_resultant_length)

    op, dt, dev, p = prob["op"], getattr(torch, prob["dtype"]), prob["device"], prob["p"]
    torch.manual_seed(prob["torch_seed"])
    loc = prob["loc"].to(dev, dt)
    loc = (loc.double() / loc.double().norm(dim=-1, keepdim=True)).to(dt)
    kappa = prob["kappa"].to(dev, dt)
    kappa = torch.where(kappa > 0, kappa, torch.full_like(kappa, torch.finfo(dt).tiny))
    d = VonMisesFisher(loc, kappa, validate_args=True)
    fails = []
    k64 = kappa.double()
    finite_k = torch.isfinite(k64)
    if op in ("vmf_sample", "vmf_log_prob", "vmf_fit"):
        x = d.sample((prob["n"],))
        eps = torch.finfo(torch.float32 if dt == torch.float16 else dt).eps
        tol = 4 * eps + (torch.finfo(dt).eps if dt == torch.float16 else 0)
        if x.dtype != dt or x.shape != (prob["n"],) + kappa.shape + (p,):
            fails.append(f"sample dtype/shape {x.dtype}/{tuple(x.shape)}")
        if not torch.isfinite(x).all():
            fails.append("sample not finite")
        elif not ((x.double().norm(dim=-1) - 1).abs() <= tol).all():
            fails.append(f"sample off the sphere by "
                         f"{(x.double().norm(dim=-1) - 1).abs().max().item():.2e}")
        if op == "vmf_sample" and dt != torch.float16:
            # kappa (1 - w) against kappa (1 - A_p) for moderate kappa (no cancellation)
            sel = finite_k & (k64 <= 1e6)
            if sel.any() and prob["n"] > 1:
                mu = loc.double()
                s = (0.5 * ((x.double() - mu) ** 2).sum(-1) * k64)[:, sel]
                a = dk.bessel_iv_ratio(p / 2 - 1, k64[sel])
                mean = k64[sel] * (1 - a)
                var = k64[sel] ** 2 * ((1 - a) * (1 + a) - (p - 1) * a / k64[sel])
                z = (s.mean(0) - mean).sum() / (var.sum() / s.shape[0]).sqrt()
                if abs(z.item()) > 6:
                    fails.append(f"kappa(1-w) mean off by {z.item():.1f} standard errors")
        if op == "vmf_log_prob":
            lp = d.log_prob(x)
            point = (kappa == math.inf).expand(lp.shape)
            if torch.isnan(lp).any() or not torch.isfinite(lp[~point]).all() and dt != \
                    torch.float16:
                fails.append("log_prob NaN or not finite at a finite kappa")
            fails += _vmf_mpmath(d, x, kappa, p, dt, "log_prob", lp)
        if op == "vmf_fit":
            mu_hat, k_hat = dk.distributions.fit_von_mises_fisher(x.movedim(0, -2))
            if mu_hat.dtype != dt or k_hat.dtype != dt or k_hat.shape != kappa.shape:
                fails.append(f"fit dtype/shape {mu_hat.dtype}/{k_hat.dtype}/"
                             f"{tuple(k_hat.shape)}")
            if torch.isnan(k_hat).any() or (k_hat < 0).any():
                fails.append(f"fit kappa NaN or negative: {k_hat.tolist()[:4]}")
            if dt == torch.float64:  # the solver's round trip on exact mean lengths
                sel = finite_k & (k64 >= 1e-6) & (k64 <= 1e7)
                if sel.any():
                    r = dk.bessel_iv_ratio(p / 2 - 1, k64[sel])
                    est = concentration_from_mean_resultant_length(r, p)
                    err = ((est - k64[sel]) / k64[sel]).abs().max().item()
                    if err > 1e-9:
                        fails.append(f"concentration round trip error {err:.1e}")
    else:
        h = d.entropy()
        if h.dtype != dt or h.shape != kappa.shape:
            fails.append(f"entropy dtype/shape {h.dtype}/{tuple(h.shape)}")
        if dt != torch.float16 and not torch.isfinite(h[finite_k]).all():
            fails.append("entropy not finite at a finite kappa")
        if (h[~finite_k] != -math.inf).any():
            fails.append("entropy at kappa = inf is not -inf")
        if not (torch.isfinite(d.mean).all() and torch.isfinite(d.variance).all()):
            fails.append("mean/variance not finite")
        fails += _vmf_mpmath(d, None, kappa, p, dt, "entropy", h)
    return fails, int(kappa.numel())


def _vmf_mpmath(d, x, kappa, p, dt, what, got):
    """One element with 1e-6 <= kappa <= 1e4 against mpmath (float64 only)."""
    import mpmath
    import torch

    if dt != torch.float64:
        return []
    sel = ((kappa >= 1e-6) & (kappa <= 1e4)).nonzero()
    if not len(sel):
        return []
    j = int(sel[0, 0])
    k = float(kappa[j])

    def value():
        nu, K = mpmath.mpf(p) / 2 - 1, mpmath.mpf(k)
        i0 = mpmath.besseli(nu, K)
        log_c = nu * mpmath.log(K) - mpmath.mpf(p) / 2 * mpmath.log(2 * mpmath.pi) - \
            mpmath.log(i0)
        if what == "entropy":
            return -log_c - K * mpmath.besseli(nu + 1, K) / i0
        xs, mu = x[0, j].tolist(), d.loc[j].tolist()
        return log_c + K * mpmath.fsum(mpmath.mpf(a) * mpmath.mpf(b) for a, b in zip(xs, mu))

    want = mp_converged(value)
    have = float(got[j]) if what == "entropy" else float(got[0, j])
    if want is not None and not abs(have - want) <= 1e-12 * max(1.0, abs(want)) + 1e-15 * k:
        return [f"mpmath {what}: p={p}, kappa={k!r}: {have!r} vs {want!r}"]
    return []


def run_problem(dk, prob):
    if prob["op"] in soak_attention.OPS:
        return soak_attention.check(dk, prob)
    if prob["op"] in LOG_OPS:
        return check_log_bessel(dk, prob)
    return check_vmf(dk, prob)


# ------------------------------------------------------------------- worker and guard


def _worker(conn, seed, device, threads):
    import torch

    import diffkern as dk

    if threads:
        torch.set_num_threads(threads)
    while True:
        msg = conn.recv()
        if msg is None:
            return
        prob = make_problem(seed, msg, device)
        try:
            fails, elements = run_problem(dk, prob)
            conn.send(("ok", fails, elements))
        except Exception as e:  # noqa: BLE001 - every exception on valid input is a finding
            conn.send(("exception", [f"{type(e).__name__}: {e}"[:2000]], 0))


class Worker:
    def __init__(self, seed, device, threads):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, seed, device, threads),
                                daemon=True)
        self.proc.start()

    def ask(self, index, timeout):
        """("ok"|"exception", fails, elements), ("hang", ...) or ("crash", ...)."""
        self.conn.send(index)
        if self.conn.poll(timeout):
            try:
                return self.conn.recv()
            except (EOFError, OSError):  # a worker that died mid-reply resets the pipe
                pass
        if not self.proc.is_alive():
            return ("crash", [f"worker died, exit code {self.proc.exitcode}"], 0)
        return ("hang", [f"no reply within {timeout} s"], 0)

    def stop(self, kill=False):
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()


def save_failure(out, kind, index, prob, messages):
    import torch

    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, f"{kind}-{prob['op']}-{index}")
    torch.save(prob, base + ".pt")
    with open(base + ".json", "w") as fh:
        json.dump(dict(kind=kind, op=prob["op"], index=index, dtype=prob["dtype"],
                       device=prob["device"], messages=messages,
                       replay=f"python scripts/soak.py --replay {base}.pt"), fh, indent=1)


def replay(path):
    import torch

    import diffkern as dk

    prob = torch.load(path, weights_only=False)
    print(f"{prob['op']} ({prob['dtype']}, {prob['device']}):")
    fails, _ = run_problem(dk, prob)
    print("\n".join(fails) if fails else "no failure now")
    return 1 if fails else 0


# ---------------------------------------------------------------------------- main


def run_ot(args, seconds):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench",
                        "soak_ot.py")
    if not os.path.exists(path):
        print("[soak] OT: bench/soak_ot.py not found, OT skipped")
        return None
    # A plain import from bench/ on sys.path: soak_ot's spawned workers import it by name.
    bench = os.path.dirname(os.path.abspath(path))
    if bench not in sys.path:
        sys.path.insert(0, bench)
    mod = importlib.import_module("soak_ot")
    out = os.path.join(args.out, "ot")
    os.makedirs(out, exist_ok=True)
    js = os.path.join(out, "report.json")
    print(f"[soak] OT: bench/soak_ot.py for {seconds:.0f} s", flush=True)
    code = mod.main(["--device", args.device, "--seed", str(args.seed), "--out", out,
                     "--json", js, "--time-budget", str(seconds), "--progress", "0",
                     "--timeout", str(args.timeout)])
    with open(js) as fh:
        rep = json.load(fh)
    rep["exit_code"] = code
    return rep


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="soak_out")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="wall-clock guard per problem, seconds")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the worker")
    ap.add_argument("--ot-share", type=float, default=0.3,
                    help="fraction of --seconds for bench/soak_ot.py (0: no OT)")
    ap.add_argument("--replay", default=None)
    args = ap.parse_args(argv)
    if args.replay:
        return replay(args.replay)

    t0 = time.time()
    budget = args.seconds * (1 - args.ot_share)
    stats = {op: dict(calls=0, elements=0, hang=0, crash=0, exception=0, wrong=0)
             for op in LOG_OPS + VMF_OPS + soak_attention.OPS}
    failures = []
    worker = Worker(args.seed, args.device, args.threads)
    index = 0
    while time.time() - t0 < budget:
        prob_op = make_problem(args.seed, index, "cpu")["op"]
        kind, msgs, elements = worker.ask(index, args.timeout)
        st = stats[prob_op]
        st["calls"] += 1
        st["elements"] += elements
        if kind in ("hang", "crash"):
            worker.stop(kill=True)
            worker = Worker(args.seed, args.device, args.threads)
        if kind == "ok" and msgs:
            kind = "wrong"
        if kind != "ok":
            st[kind] += 1
            failures.append(dict(kind=kind, op=prob_op, index=index, messages=msgs))
            save_failure(args.out, kind, index, make_problem(args.seed, index, args.device),
                         msgs)
        index += 1
    worker.stop()
    wall = time.time() - t0

    ot = run_ot(args, args.seconds - wall) if args.ot_share > 0 else None

    cols = ("calls", "elements", "hang", "crash", "exception", "wrong")
    print(f"\nsoak on {args.device}, seed {args.seed}: {index} problems in {wall:.0f} s "
          f"(guard {args.timeout:g} s per problem)")
    print(f"{'op':18s}" + "".join(f"{c:>11s}" for c in cols))
    for op, st in stats.items():
        print(f"{op:18s}" + "".join(f"{st[c]:>11d}" for c in cols))
    tot = {c: sum(st[c] for st in stats.values()) for c in cols}
    print(f"{'total':18s}" + "".join(f"{tot[c]:>11d}" for c in cols))
    for f in failures[:20]:
        print(f"  {f['kind']} {f['op']} #{f['index']}: {f['messages'][0][:200]}")
    if ot is not None:
        print(f"OT (bench/soak_ot.py): hangs {ot['hangs']}, failures {ot['failures'] or 'none'}, "
              + ", ".join(f"{dt}: {d['problems']} problems, SNS converged "
                          f"{d['sns_converged_pct']:.2f}%" for dt, d in ot["per_dtype"].items()))
    report = dict(device=args.device, seed=args.seed, seconds=args.seconds, wall_s=wall,
                  problems=index, timeout=args.timeout, per_op=stats, totals=tot,
                  failures=failures, ot=ot)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.json"), "w") as fh:
        json.dump(report, fh, indent=1, default=str)
    print(f"report: {os.path.join(args.out, 'report.json')}; reproducers in {args.out}")
    bad = tot["hang"] + tot["crash"] + tot["exception"] + tot["wrong"]
    if ot is not None:
        bad += ot["hangs"] + sum(ot["failures"].values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
