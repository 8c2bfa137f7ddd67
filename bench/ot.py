"""Entropic optimal transport benchmark: dk.ot.sinkhorn ("sns" and "sinkhorn") against peers.

    python bench/ot.py [--device cpu|cuda|all] [--quick] [--repeats R] [--threads T]
                       [--assignment-max-iter N] [--json PATH] [--plot PATH]

Problem: min <C, P> + eps * sum P log P over plans with marginals a, b (uniform here).
"err" everywhere is the L1 marginal error  sum_i |P 1 - a|_i + sum_j |P^T 1 - b|_j  of the
plan each solver returns (dk: res.plan; POT: its plan; OTT: exp((f + g - C) / eps) from its
potentials, which is what its `matrix` is for a cost-matrix geometry), computed here in
float64. It is the same for every method, so the comparison is at measured accuracy, not at
each library's nominal tolerance.

1. assignment (CPU, and CUDA when selected): random assignment problem, C ~ U[0, 1]
   (torch.manual_seed(0)), n = 500, eps = 1/1200, float64, tol = 1e-10. Iterations (and
   Newton steps) of dk "sns" vs dk "sinkhorn" (capped at --assignment-max-iter, 200000 by
   default, 2000 with --quick; a capped count is a lower bound, printed ">="), their ratio,
   and the solve time (median of up to --repeats solves, stopping after 2 s of solves).
2. gpu (CUDA): squared-Euclidean cost of n uniform points in [0, 1]^2 against n others,
   divided by its max; n in {1000, 4096}, eps in {1e-3, 1e-2}, float32 and float64,
   tol = 1e-6. Median wall time (CUDA events; perf_counter + block_until_ready for JAX)
   of up to --repeats solves (stopping after 2 s of solves) after one warm-up solve, for
   dk "sns", dk "sinkhorn" and the peers:
     POT     ot.sinkhorn(a, b, M, reg, method="sinkhorn_log", stopThr=tol) on torch CUDA
             tensors. POT's rule: the L2 norm of the column-marginal error (the row marginal
             is exact after its update) < stopThr, every 10 iterations; its L1 error can be
             up to sqrt(n) times larger.
     POT-L1  the same with stopThr = tol / sqrt(n), which bounds the L1 error by tol.
     OTT     ott-jax Sinkhorn(threshold=tol, lse_mode=True) on Geometry(cost_matrix=C,
             epsilon=eps) under jax.jit. OTT's default norm_error=1 is the L1 norm of the
             column-marginal error (row marginal exact), every inner_iterations=10
             iterations: the same rule as dk's.
   "dk/peer" = dk time / time of the fastest peer that stopped by its own rule;
   "dk/matched" = dk time / time of the fastest peer whose measured err is at most
   1.1 * max(tol, dk's measured err) (so a peer is not credited for stopping early).
3. batched (CUDA): B = 64 problems of n = 256 (the point-cloud cost of 2., one per batch
   element), eps in {1e-2, 1e-3}, float32: dk on the (B, n, n) cost vs OTT jax.jit(vmap)
   vs POT ot.batch.bregman_log_projection_batch (the log-Sinkhorn behind
   ot.batch.solve_batch; its rule: max over the batch of the L2 norm of the row-marginal
   error < tol, every 10 iterations; also run at tol / sqrt(n)), or, with a POT that has no
   ot.batch, a Python loop over ot.sinkhorn (labelled "loop"). err is the worst element.
4. cpu: the point-cloud problem of 2., n in {500, 1000}, eps in {1e-2, 1e-3}, float64,
   tol = 1e-6: dk "sns" and "sinkhorn" with 1 and T torch threads vs POT sinkhorn_log on
   NumPy arrays with stopThr = tol / sqrt(n) (L1-safe, so at the same accuracy; NumPy's
   exp/logsumexp run on one thread whatever T is, so it is timed once). Median of up to
   --repeats solves, stopping after 2 s of solves.

Iteration caps: max(2000, 20 / eps) for every solver in 2.-4.; a capped run is marked
"cap" and is not used as a peer for the ratios. Peers that are not importable (POT,
ott-jax, JAX, JAX without a GPU backend) are skipped with a note.

--plot PATH draws the L1 marginal error against iterations and against time for dk
"sinkhorn" and dk "sns" on the assignment problem and on the n = 1000, eps = 1e-3 float64
point-cloud problem (on CUDA when selected, else CPU). Each point is a separate solve from
scratch with max_iter = k and fixed_iterations=True, so its time is the time of k
iterations. Needs matplotlib.

Prints a table (last), writes JSON (--json). Absolute times are for the CPU/GPU named in
the output; compare ratios only within a run.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
import warnings

import numpy as np
import torch

# This file is named ot.py: run as a script, its folder comes first on sys.path and
# "import ot" would import it instead of POT. Import the harness from here first, then
# take the folder off the path.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _harness as H  # noqa: E402

sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
if getattr(sys.modules.get("ot"), "__file__", None) == os.path.abspath(__file__):
    del sys.modules["ot"]

import diffkern as dk  # noqa: E402

TOL_GEOM = 1e-6
TOL_ASSIGN = 1e-10
MATCH_SLACK = 1.1


def cap_for(eps):
    return max(2000, int(round(20 / eps)))


# ------------------------------------------------------------------------------------
# problems


def pointcloud_cost(n, seed, batch=None):
    """float64 CPU (n, n) or (batch, n, n): |x_i - y_j|^2 for uniform points in [0, 1]^2,
    divided by its max (per batch element)."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, 2) if batch is None else (batch, n, 2)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    y = torch.rand(shape, generator=g, dtype=torch.float64)
    c = ((x.unsqueeze(-2) - y.unsqueeze(-3)) ** 2).sum(-1)
    return c / c.amax(dim=(-2, -1), keepdim=True)


def assignment_cost(n=500, seed=0):
    torch.manual_seed(seed)
    return torch.rand(n, n, dtype=torch.float64)


# ------------------------------------------------------------------------------------
# measurement helpers


def l1_error(plan):
    """L1 marginal error against uniform marginals, in float64; (...,) CPU tensor."""
    if isinstance(plan, torch.Tensor):
        p = plan.detach().to(torch.float64)  # on its device
    else:  # NumPy or JAX array
        p = torch.from_numpy(np.array(plan, dtype=np.float64))
    n, m = p.shape[-2:]
    e = (p.sum(-1) - 1.0 / n).abs().sum(-1) + (p.sum(-2) - 1.0 / m).abs().sum(-1)
    return e.cpu()


def timed(fn, clock):
    """(output, seconds) of one call (bench/_harness.py): clock "cuda" (events) or "wall"."""
    return H.time_call(fn, clock)


def measure(solve, clock, repeats, warm=None, budget_s=None, stopped=None):
    """Median seconds of up to `repeats` calls of solve() after a warm-up call (warm(), or
    solve() when warm is None). When `stopped(output)` says the warm-up solve hit its cap,
    that solve is not repeated. Returns (last output, median seconds, runs timed)."""
    if warm is None:
        out, t0 = timed(solve, clock)
        if stopped is not None and not stopped(out):
            return out, t0, 1
    else:
        warm()
    t = H.measure(solve, clock=clock, warmup=0, repeats=repeats, budget_s=budget_s)
    return t.out, t.median, t.runs


def quiet(fn):
    """Call fn with "did not converge" warnings silenced (convergence is recorded)."""
    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    return run


def _cpu_tensor(x, dtype=None):
    """torch / NumPy / JAX / list -> CPU torch tensor (a copy where needed)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
    else:
        t = torch.from_numpy(np.array(x))
    return t if dtype is None else t.to(dtype)


def summarize(err, iters=None, newton=None, converged=None, own_err=None):
    """One row's numbers; batched quantities are reduced (worst error, max iterations)."""
    err = _cpu_tensor(err, torch.float64).reshape(-1)
    row = {"err": float(err.max()), "err_median": float(err.median())}
    if iters is not None:
        it = _cpu_tensor(iters, torch.int64).reshape(-1)
        row["iters"] = int(it.max())
        row["iters_median"] = float(it.double().median())
    if newton is not None:
        row["newton"] = int(_cpu_tensor(newton, torch.int64).max())
    if converged is not None:
        row["converged"] = bool(_cpu_tensor(converged, torch.bool).all())
    if own_err is not None:
        row["own_err"] = float(_cpu_tensor(own_err, torch.float64).max())
    return row


# ------------------------------------------------------------------------------------
# solvers: each make_* returns (solve, info) where solve() runs the solver and
# info(output) -> row dict (computes err here, outside the timing)


def make_dk(cost, eps, method, tol, max_iter, **kw):
    def solve():
        return dk.ot.sinkhorn(cost, eps=eps, method=method, tol=tol, max_iter=max_iter, **kw)

    def info(res):
        return summarize(l1_error(res.plan), res.iterations, res.newton_steps, res.converged,
                         res.marginal_error)
    return quiet(solve), info


def make_pot(ot, cost, eps, thr, cap):
    """ot.sinkhorn(method="sinkhorn_log") on the backend of `cost` (torch or NumPy)."""
    n, m = cost.shape
    if isinstance(cost, torch.Tensor):
        a = torch.full((n,), 1.0 / n, dtype=cost.dtype, device=cost.device)
        b = torch.full((m,), 1.0 / m, dtype=cost.dtype, device=cost.device)
    else:
        a = np.full(n, 1.0 / n, dtype=cost.dtype)
        b = np.full(m, 1.0 / m, dtype=cost.dtype)

    def solve():
        return ot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", numItermax=cap,
                           stopThr=thr, log=True)

    def info(out):
        plan, log = out
        errs = log.get("err", [])
        last = float(errs[-1]) if len(errs) else math.inf
        return summarize(l1_error(plan), [int(log["niter"]) + 1], converged=[last < thr])
    return quiet(solve), info


def pot_batch_module(ot):
    try:
        mb = importlib.import_module("ot.batch")
        if hasattr(mb, "bregman_log_projection_batch"):
            return mb
    except ImportError:
        pass
    return None


def make_pot_batched(ot, cost, eps, thr, cap):
    """(B, n, m) torch cost: ot.batch's log-Sinkhorn, or a loop over ot.sinkhorn."""
    bsz, n, m = cost.shape
    mb = pot_batch_module(ot)
    a = torch.full((bsz, n), 1.0 / n, dtype=cost.dtype, device=cost.device)
    b = torch.full((bsz, m), 1.0 / m, dtype=cost.dtype, device=cost.device)
    if mb is not None:
        def solve():
            return mb.bregman_log_projection_batch(-cost / eps, a, b, max_iter=cap, tol=thr,
                                                   grad="detach")

        def info(out):
            it = int(out["n_iters"]) + 1
            return summarize(l1_error(out["T"]), [it], converged=[it < cap])
        return quiet(solve), info, "ot.batch"

    def solve_loop():
        return [ot.sinkhorn(a[k], b[k], cost[k], eps, method="sinkhorn_log", numItermax=cap,
                            stopThr=thr, log=True) for k in range(bsz)]

    def info_loop(outs):
        plans = torch.stack([p for p, _ in outs])
        its = [int(log["niter"]) + 1 for _, log in outs]
        conv = [float(log["err"][-1]) < thr if log["err"] else False for _, log in outs]
        return summarize(l1_error(plans), its, converged=conv)
    return quiet(solve_loop), info_loop, "loop over ot.sinkhorn"


class OTT:
    """ott-jax, jitted, on one JAX device."""

    def __init__(self, jax, device):
        from ott.geometry import geometry
        from ott.problems.linear import linear_problem
        from ott.solvers.linear import sinkhorn
        import ott
        self.jax, self.dev = jax, device
        self.version = getattr(ott, "__version__", "?")
        self._mods = (geometry, linear_problem, sinkhorn)
        self._cache = {}

    def _fn(self, tol, cap, batched):
        key = (tol, cap, batched)
        if key not in self._cache:
            jax = self.jax
            geometry, linear_problem, sinkhorn = self._mods
            solver = sinkhorn.Sinkhorn(threshold=tol, lse_mode=True, max_iterations=cap)

            def one(c, a, b, eps):
                geom = geometry.Geometry(cost_matrix=c, epsilon=eps)
                out = solver(linear_problem.LinearProblem(geom, a=a, b=b))
                return out.f, out.g, out.n_iters, out.converged
            if batched:
                one = jax.vmap(one, in_axes=(0, None, None, None))
            self._cache[key] = jax.jit(one)
        return self._cache[key]

    def make(self, cost, eps, tol, cap):
        """cost: torch (n, m) or (B, n, m); copied to the JAX device outside the timing."""
        jax = self.jax
        jnp = jax.numpy
        c_np = cost.detach().cpu().numpy()
        dt = c_np.dtype
        n, m = c_np.shape[-2:]
        c = jax.device_put(c_np, self.dev)
        a = jax.device_put(np.full(n, 1.0 / n, dtype=dt), self.dev)
        b = jax.device_put(np.full(m, 1.0 / m, dtype=dt), self.dev)
        e = jax.device_put(np.asarray(eps, dtype=dt), self.dev)
        fn = self._fn(tol, cap, c_np.ndim == 3)

        def solve():
            return jax.block_until_ready(fn(c, a, b, e))

        def info(out):
            f, g, it, conv = out
            plan = jnp.exp((f[..., :, None] + g[..., None, :] - c) / e)
            return summarize(l1_error(np.asarray(plan)), np.asarray(it), converged=np.asarray(conv))
        return solve, info


# ------------------------------------------------------------------------------------
# peers: import once, never fail


def load_peers(want_jax):
    peers = {"notes": []}
    try:
        import ot
        peers["pot"] = ot
        peers["pot_version"] = ot.__version__
    except Exception as e:
        peers["notes"].append(f"POT skipped (pip install pot): {type(e).__name__}: {e}")
    if want_jax:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        try:
            import jax
            jax.config.update("jax_enable_x64", True)
            peers["jax"] = jax
            peers["jax_version"] = jax.__version__
        except Exception as e:
            peers["notes"].append(f"OTT-JAX skipped (no JAX): {type(e).__name__}: {e}")
    return peers


def ott_on(peers, device):
    """An OTT helper on `device` ("cpu"/"cuda") or None, with a note saying why not."""
    key = f"ott_{device}"
    if key in peers:
        return peers[key]
    peers[key] = None
    jax = peers.get("jax")
    if jax is None:
        return None
    try:
        devs = jax.devices("gpu" if device == "cuda" else "cpu")
    except Exception as e:
        peers["notes"].append(f"OTT-JAX skipped on {device}: JAX has no such backend "
                              f"({type(e).__name__}: {e})")
        return None
    try:
        peers[key] = OTT(jax, devs[0])
        peers["ott_version"] = peers[key].version
        peers[f"jax_device_{device}"] = str(devs[0])
    except Exception as e:
        peers["notes"].append(f"OTT-JAX skipped (pip install ott-jax): {type(e).__name__}: {e}")
    return peers[key]


def run_row(rows, label, make, clock, repeats, warm=None, budget_s=None, extra=None):
    """Time one solver, append its row; a solver that raises becomes a row with 'error'."""
    row = {"method": label}
    if extra:
        row.update(extra)
    try:
        solve, info = make()
        def stopped_by_rule(out):
            return info(out).get("converged", True)
        out, sec, runs = measure(solve, clock, repeats, warm=warm, budget_s=budget_s,
                                 stopped=stopped_by_rule if warm is None else None)
        row.update(info(out))
        row["time_s"] = sec
        row["runs"] = runs
    except Exception as e:  # a broken peer must not stop the benchmark
        row["error"] = f"{type(e).__name__}: {e}"
        print(f"  {label}: {row['error']}", file=sys.stderr)
    rows.append(row)
    return row


def add_ratios(rows, tol, dk_labels=("dk sns", "dk sinkhorn")):
    """dk/peer and dk/matched on the dk rows of one configuration."""
    peers = [r for r in rows if not r["method"].startswith("dk") and "time_s" in r
             and r.get("converged", True)]
    for r in rows:
        if r["method"] not in dk_labels or "time_s" not in r:
            continue
        if peers:
            best = min(peers, key=lambda p: p["time_s"])
            r["vs_peer"] = r["time_s"] / best["time_s"]
            r["peer"] = best["method"]
        bound = MATCH_SLACK * max(tol, r["err"])
        matched = [p for p in peers if p["err"] <= bound]
        if matched:
            best = min(matched, key=lambda p: p["time_s"])
            r["vs_matched"] = r["time_s"] / best["time_s"]
            r["matched_peer"] = best["method"]


# ------------------------------------------------------------------------------------
# 1. assignment


def bench_assignment(device, cap, threads, repeats):
    if device == "cpu":
        torch.set_num_threads(threads)
    c = assignment_cost().to(device)
    eps = 1.0 / 1200
    clock = "cuda" if device == "cuda" else "wall"
    small = pointcloud_cost(64, 1).to(device)
    warm = quiet(lambda: dk.ot.sinkhorn(small, eps=0.05, method="sns", tol=1e-8))
    rows = []
    print(f"assignment on {device} ...", file=sys.stderr)
    for meth in ("sns", "sinkhorn"):
        run_row(rows, f"dk {meth}", lambda meth=meth: make_dk(c, eps, meth, TOL_ASSIGN, cap),
                clock, repeats, warm=warm, budget_s=2.0)
    out = {"n": 500, "eps": eps, "tol": TOL_ASSIGN, "dtype": "float64", "cap": cap,
           "threads": threads if device == "cpu" else None, "rows": rows}
    s, k = rows
    if "iters" in s and "iters" in k:
        out["iter_ratio"] = k["iters"] / max(1, s["iters"])
        out["iter_ratio_is_lower_bound"] = not k.get("converged", False)
    if "time_s" in s and "time_s" in k:
        out["time_ratio"] = k["time_s"] / s["time_s"]
    return out


# ------------------------------------------------------------------------------------
# 2. single problems on the GPU (also callable on "cpu" for testing)


# GPU rows: up to --repeats timed solves per method, stopping once 2 s have been spent, so
# millisecond solves get many samples (their median is sensitive to host noise) while the
# slow peers are not run for minutes.
ROW_BUDGET_S = 2.0


def bench_single(device, peers, sizes, epss, dtypes, repeats):
    ot = peers.get("pot")
    ott = ott_on(peers, device)
    clock = "cuda" if device == "cuda" else "wall"
    configs = []
    for dtype in dtypes:
        for n in sizes:
            c64 = pointcloud_cost(n, seed=n)
            for eps in epss:
                c = c64.to(device=device, dtype=dtype)
                cap = cap_for(eps)
                dname = str(dtype).replace("torch.", "")
                print(f"single {device} {dname} n={n} eps={eps:g} ...", file=sys.stderr)
                rows = []
                for meth in ("sns", "sinkhorn"):
                    run_row(rows, f"dk {meth}",
                            lambda meth=meth: make_dk(c, eps, meth, TOL_GEOM, cap), clock, repeats,
                            budget_s=ROW_BUDGET_S)
                if ot is not None:
                    for label, thr in (("POT", TOL_GEOM), ("POT-L1", TOL_GEOM / math.sqrt(n))):
                        run_row(rows, label, lambda thr=thr: make_pot(ot, c, eps, thr, cap), clock,
                                repeats, budget_s=ROW_BUDGET_S)
                if ott is not None:
                    run_row(rows, "OTT", lambda: ott.make(c, eps, TOL_GEOM, cap), "wall", repeats,
                            budget_s=ROW_BUDGET_S)
                add_ratios(rows, TOL_GEOM)
                configs.append({"dtype": dname, "n": n, "eps": eps, "cap": cap, "rows": rows})
                c = None  # free it before the next problem
                if device == "cuda":
                    torch.cuda.empty_cache()
    return configs


# ------------------------------------------------------------------------------------
# 3. batched


def bench_batched(device, peers, bsz, n, epss, repeats):
    ot = peers.get("pot")
    ott = ott_on(peers, device)
    clock = "cuda" if device == "cuda" else "wall"
    c = pointcloud_cost(n, seed=7, batch=bsz).to(device=device, dtype=torch.float32)
    configs = []
    for eps in epss:
        cap = cap_for(eps)
        print(f"batched {device} B={bsz} n={n} eps={eps:g} ...", file=sys.stderr)
        rows = []
        for meth in ("sns", "sinkhorn"):
            run_row(rows, f"dk {meth}", lambda meth=meth: make_dk(c, eps, meth, TOL_GEOM, cap),
                    clock, repeats, budget_s=ROW_BUDGET_S)
        pot_kind = None
        if ot is not None:
            for label, thr in (("POT", TOL_GEOM), ("POT-L1", TOL_GEOM / math.sqrt(n))):
                def mk(thr=thr):
                    nonlocal pot_kind
                    solve, info, pot_kind = make_pot_batched(ot, c, eps, thr, cap)
                    return solve, info
                run_row(rows, label, mk, clock, repeats, budget_s=ROW_BUDGET_S)
            for r in rows:
                if r["method"].startswith("POT"):
                    r["pot_kind"] = pot_kind
                    if pot_kind and pot_kind.startswith("loop"):
                        r["method"] += " (loop)"
        if ott is not None:
            run_row(rows, "OTT vmap", lambda: ott.make(c, eps, TOL_GEOM, cap), "wall", repeats,
                    budget_s=ROW_BUDGET_S)
        add_ratios(rows, TOL_GEOM)
        configs.append({"dtype": "float32", "B": bsz, "n": n, "eps": eps, "cap": cap,
                        "rows": rows})
    return configs


# ------------------------------------------------------------------------------------
# 4. CPU


def bench_cpu(peers, sizes, epss, repeats, threads):
    ot = peers.get("pot")
    saved = torch.get_num_threads()
    small = pointcloud_cost(64, 1)
    configs = []
    tcounts = sorted({1, threads})
    for n in sizes:
        c = pointcloud_cost(n, seed=n)
        for eps in epss:
            cap = cap_for(eps)
            print(f"cpu n={n} eps={eps:g} ...", file=sys.stderr)
            rows = []
            for meth in ("sns", "sinkhorn"):
                warm = quiet(lambda meth=meth: dk.ot.sinkhorn(small, eps=eps, method=meth,
                                                            tol=TOL_GEOM, max_iter=cap))
                for t in tcounts:
                    torch.set_num_threads(t)
                    run_row(rows, f"dk {meth}",
                            lambda meth=meth: make_dk(c, eps, meth, TOL_GEOM, cap), "wall",
                            repeats, warm=warm, budget_s=2.0, extra={"threads": t})
                torch.set_num_threads(saved)
            if ot is not None:
                cn = c.numpy()
                warm = quiet(lambda: ot.sinkhorn(np.full(64, 1 / 64), np.full(64, 1 / 64),
                                                 small.numpy(), eps, method="sinkhorn_log"))
                run_row(rows, "POT-L1 numpy",
                        lambda: make_pot(ot, cn, eps, TOL_GEOM / math.sqrt(n), cap), "wall",
                        repeats, warm=warm, budget_s=2.0, extra={"threads": 1})
            pot = [r for r in rows if r["method"].startswith("POT") and "time_s" in r]
            for r in rows:
                if r["method"].startswith("dk") and pot and "time_s" in r:
                    r["vs_peer"] = r["time_s"] / pot[0]["time_s"]
                    r["peer"] = pot[0]["method"]
            configs.append({"dtype": "float64", "n": n, "eps": eps, "cap": cap, "rows": rows})
    return configs


# ------------------------------------------------------------------------------------
# plot


def trace(c, eps, method, kmax, tol, device, points=14):
    """L1 error of the plan after exactly k iterations, for k on a geometric grid."""
    if kmax <= 4 * points:  # short (SNS) runs: every k
        ks = list(range(1, kmax + 1))
    else:
        ks = sorted({max(1, int(round(k))) for k in np.geomspace(1, kmax, points)})
    clock = "cuda" if device == "cuda" else "wall"
    out = []
    fixed = True
    for k in ks:
        def solve(k=k):
            if fixed:
                return dk.ot.sinkhorn(c, eps=eps, method=method, tol=tol, max_iter=k,
                                      fixed_iterations=True)
            return dk.ot.sinkhorn(c, eps=eps, method=method, tol=0.0, max_iter=k)
        try:
            res, sec = timed(quiet(solve), clock)
        except Exception as e:
            if not fixed:
                print(f"  trace {method}: {type(e).__name__}: {e}", file=sys.stderr)
                break
            fixed = False  # fixed_iterations not supported here: run to the cap with tol=0
            res, sec = timed(quiet(solve), clock)
        out.append({"max_iter": k, "iterations": int(res.iterations.max()),
                    "newton": int(res.newton_steps.max()), "time_s": sec,
                    "err": float(l1_error(res.plan).max()), "fixed_iterations": fixed})
    return out


def collect_traces(device, results, cap):
    """Traces for the plot, each up to 1.3x the iterations an ordinary solve to 1e-10 takes
    (for the assignment problem: the counts of section 1)."""
    traces = {}
    small = pointcloud_cost(64, 1).to(device)
    quiet(lambda: dk.ot.sinkhorn(small, eps=0.05, method="sns", tol=1e-8))()  # warm-up
    asg = results.get("assignment", {}).get(device, {}).get("rows", [])
    need = {r["method"]: r.get("iters") for r in asg}
    problems = (("assignment n=500 eps=1/1200 float64", assignment_cost(), 1 / 1200, cap, need),
                ("point cloud n=1000 eps=1e-3 float64", pointcloud_cost(1000, seed=1000), 1e-3,
                 20_000, {}))
    for title, c, eps, kcap, known in problems:
        c = c.to(device)
        print(f"plot traces on {device} ({title}) ...", file=sys.stderr)
        traces[title] = {}
        for meth in ("sinkhorn", "sns"):
            k = known.get(f"dk {meth}")
            if k is None:
                res = quiet(lambda meth=meth: dk.ot.sinkhorn(c, eps=eps, method=meth,
                                                             tol=TOL_ASSIGN, max_iter=kcap))()
                k = int(res.iterations.max())
            kmax = k if k >= kcap else int(1.3 * k) + 1
            traces[title][f"dk {meth}"] = trace(c, eps, meth, kmax, TOL_ASSIGN, device)
    return traces


def plot(traces, path, device_name):
    plt = H.pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(len(traces), 2, figsize=(12, 4.5 * len(traces)),
                             constrained_layout=True, squeeze=False)
    for row, (title, tr) in enumerate(traces.items()):
        for col, (key, xlabel) in enumerate((("iterations", "iterations (Sinkhorn + Newton)"),
                                             ("time_s", "seconds (one solve of k iterations)"))):
            ax = axes[row, col]
            for name, pts in tr.items():
                xs = [p[key] for p in pts]
                ys = [max(p["err"], 1e-17) for p in pts]
                ax.loglog(xs, ys, "o-", ms=3, label=name)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("L1 marginal error (float64)")
            ax.set_title(f"{title} ({device_name})")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    H.save(fig, path)
    return True


# ------------------------------------------------------------------------------------
# report


def _stop(r):
    return "yes" if r.get("converged", True) else "cap"


def _newton(r):
    return r["newton"] if r.get("newton") is not None else "-"


# Columns of the solver tables (sections 2-4); rows are the JSON rows.
METHOD = H.Column("method", 16, left=True)
MS = H.Column("ms", 11, ".2f", key=lambda r: r["time_s"] * 1e3)
ITERS = H.Column("iters", 8, "d")
NEWTON = H.Column("newton", 7, key=_newton)
ERR = H.Column("err", 11, ".2e")
STOP = H.Column("stop", 5, key=_stop)
VS_PEER = H.Column("dk/peer", 8, ".2f", key="vs_peer")
SOLVER_COLS = [METHOD, MS, ITERS, NEWTON, ERR, STOP, VS_PEER,
               H.Column("dk/match", 9, ".2f", key="vs_matched")]
ASSIGN_COLS = [METHOD, H.Column("iters", 9, "d"), H.Column("newton", 8, "d",
               key=lambda r: r.get("newton", 0)), ERR, STOP, H.Column("s", 10, ".3f",
               key="time_s")]
CPU_COLS = [METHOD, H.Column("threads", 8, "d"), MS, ITERS, NEWTON, ERR, STOP, VS_PEER]


def print_table(results):
    L = []
    for note in results.get("notes", []):
        L.append(f"note: {note}")
    if results.get("notes"):
        L.append("")
    for dev, a in results.get("assignment", {}).items():
        L += H.table(ASSIGN_COLS, a["rows"], title=(
            f"1. Random assignment n=500, eps=1/1200, float64, tol {a['tol']:.0e} "
            f"({results['devices'][dev]}"
            + (f", {a['threads']} threads" if a.get("threads") else "") + ")"))
        if "iter_ratio" in a:
            ge = ">=" if a["iter_ratio_is_lower_bound"] else ""
            L.append(f"iterations sinkhorn / sns: {ge}{a['iter_ratio']:.1f}"
                     + (f"; time sinkhorn / sns: {ge}{a['time_ratio']:.1f}" if "time_ratio" in a
                        else ""))
        L.append("")
    if "single" in results:
        L.append(f"2. Point cloud, tol {TOL_GEOM:.0e} ({results['devices']['cuda']}); "
                 "ms = median solve; err = L1 marginal error of the returned plan (float64); "
                 "stop: own rule met or 'cap'")
        for cfg in results["single"]:
            L += H.table(SOLVER_COLS, cfg["rows"],
                         title=f"-- {cfg['dtype']} n={cfg['n']} eps={cfg['eps']:g}")
        L.append("dk/peer: vs the fastest peer that stopped by its rule; dk/match: vs the "
                 f"fastest peer with err <= {MATCH_SLACK} * max(tol, dk err). POT: L2 of the "
                 "column error < tol; POT-L1: < tol/sqrt(n); OTT: L1 < tol (as dk).")
        L.append("")
    if "batched" in results:
        L.append(f"3. Batched point clouds, float32, tol {TOL_GEOM:.0e} "
                 f"({results['devices']['cuda']}); err = worst element; iters = max over batch")
        for cfg in results["batched"]:
            L += H.table(SOLVER_COLS, cfg["rows"],
                         title=f"-- B={cfg['B']} n={cfg['n']} eps={cfg['eps']:g}")
        L.append("")
    if "cpu" in results:
        L.append(f"4. CPU point cloud, float64, tol {TOL_GEOM:.0e} ({results['devices']['cpu']}); "
                 "dk/peer = dk / POT-L1 numpy (single-threaded)")
        for cfg in results["cpu"]:
            L += H.table(CPU_COLS, cfg["rows"], title=f"-- n={cfg['n']} eps={cfg['eps']:g}",
                         lead=2)
        L.append("")
    print("\n".join(L).rstrip())


# ------------------------------------------------------------------------------------


def main(argv=None):
    ap = H.parser(__doc__, repeats=None)
    ap.add_argument("--quick", action="store_true",
                    help="short run: fewer sizes, assignment cap 2000, 2 repeats")
    ap.add_argument("--repeats", type=int, default=None, help="timed solves (default 5, quick 2)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--assignment-max-iter", type=int, default=None,
                    help="cap for dk sinkhorn on the assignment problem (default 200000, "
                         "quick 2000)")
    args = ap.parse_args(argv)

    if not hasattr(dk, "ot") or not hasattr(dk.ot, "sinkhorn"):
        sys.exit("this diffkern has no dk.ot.sinkhorn (rebuild: pip install -e .)")
    quick = args.quick
    repeats = args.repeats or (2 if quick else 5)
    cap_asg = args.assignment_max_iter or (2000 if quick else 200_000)

    devices = H.devices(args.device)
    notes = []
    if args.device == "all" and "cuda" not in devices:
        notes.append("no usable CUDA device: sections 2 and 3 skipped")

    peers = load_peers(want_jax="cuda" in devices)
    notes += peers["notes"]
    results = {
        **H.environment(), "quick": quick, "repeats": repeats,
        "threads": args.threads, "tol": {"assignment": TOL_ASSIGN, "point_cloud": TOL_GEOM},
        "devices": {"cpu": H.cpu_name()},
        "peers": {k: peers[k] for k in ("pot_version", "jax_version") if k in peers},
        "notes": notes,
    }
    if "cuda" in devices:
        results["devices"]["cuda"] = torch.cuda.get_device_name()

    saved = torch.get_num_threads()
    results["assignment"] = {}
    for dev in devices:
        results["assignment"][dev] = bench_assignment(dev, cap_asg, args.threads, repeats)
    torch.set_num_threads(saved)

    if "cuda" in devices:
        sizes = (1000,) if quick else (1000, 4096)
        epss = (1e-2,) if quick else (1e-3, 1e-2)
        results["single"] = bench_single("cuda", peers, sizes, epss,
                                         (torch.float32, torch.float64), repeats)
        results["batched"] = bench_batched("cuda", peers, 64, 256,
                                           (1e-2,) if quick else (1e-2, 1e-3), repeats)
    if "cpu" in devices:
        sizes = (500,) if quick else (500, 1000)
        epss = (1e-2,) if quick else (1e-2, 1e-3)
        results["cpu"] = bench_cpu(peers, sizes, epss, repeats, args.threads)
        torch.set_num_threads(saved)
    for k in ("ott_version", "jax_device_cuda"):
        if k in peers:
            results["peers"][k] = peers[k]
    for note in peers["notes"]:
        if note not in notes:
            notes.append(note)

    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("--plot needs matplotlib (pip install matplotlib); no traces, no plot",
              file=sys.stderr)
        notes.append("--plot skipped: matplotlib is not installed")
    elif args.plot:
        dev = "cuda" if "cuda" in devices else "cpu"
        torch.set_num_threads(args.threads)
        traces = collect_traces(dev, results, cap_asg)
        torch.set_num_threads(saved)
        results["traces"] = {"device": results["devices"][dev], "problems": traces}
        plot(traces, args.plot, results["devices"][dev])
    H.write_json(args.json, results)
    print_table(results)


if __name__ == "__main__":
    main()
