"""von Mises-Fisher benchmark: concentration estimates/s, sampling and log_prob throughput.

    python bench/vmf.py [--n 1000000] [--repeats 5] [--device cpu|cuda|all] [--quick]
                        [--json PATH]

Concentration: a batch of ``n`` mean resultant lengths R = A_p(kappa) made from known
kappa (p uniform in [2, 32768], kappa log-uniform in [1e-6, 1e7]), solved back with
``concentration_from_mean_resultant_length`` (tolerance mode and the fixed 4-iteration
mode), with ``torch.set_num_threads(1)`` and with all threads on CPU. Reports estimates/s
(median of ``repeats``), the max relative error against the known kappa, the max error in
units of what float64 R determines (``4 eps / (1 - R)``, floored at 1e-12), and a cost
breakdown: evaluations of A_p per element, time of one A_p pass over the batch, and the
rest (elementwise Halley arithmetic + compaction). Peer in the same run: Banerjee et al.'s
closed-form approximation alone (no iteration), for its speed and its error.

Sampling: samples/s of ``VonMisesFisher.sample`` and ``log_prob`` evaluations/s for a few
(p, kappa). Times: median of --repeats after a warm-up (bench/_harness.py: CUDA events on
the GPU). --quick: n = 1e5, sampling sizes / 10, 3 repeats. Prints the machine (JSON) first
and the tables last; absolute times are for that machine.
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

import diffkern as dk  # noqa: E402
from diffkern.distributions import (VonMisesFisher, _solve_concentration,  # noqa: E402
                                    concentration_from_mean_resultant_length)


def _median_time(fn, device, repeats):
    return H.measure(fn, clock=H.clock_for(device), warmup=1, repeats=repeats).median


def _problem(n, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(2, 32769, (n,), generator=g).to(torch.float64)
    kappa = 10 ** (torch.rand(n, generator=g, dtype=torch.float64) * 13 - 6)
    p, kappa = p.to(device), kappa.to(device)
    r = dk.bessel_iv_ratio(p / 2 - 1, kappa)
    return p, kappa, r


def bench_concentration(n, device, repeats, threads):
    rows = []
    p, kappa, r = _problem(n, device)
    eps = torch.finfo(torch.float64).eps
    limit = torch.clamp(4 * eps / (1 - r), min=1e-12)
    well = 4 * eps / (1 - r) <= 1e-13
    for nthreads in threads:
        torch.set_num_threads(nthreads)
        for mode, iters in (("tolerance", None), ("fixed 4 iterations", 4)):
            est = concentration_from_mean_resultant_length(r, p, iterations=iters)
            rel = ((est - kappa) / kappa).abs()
            t = _median_time(lambda: concentration_from_mean_resultant_length(
                r, p, iterations=iters), device, repeats)
            rows.append(dict(
                bench="concentration", device=str(device), threads=nthreads, mode=mode, n=n,
                estimates_per_s=n / t, seconds=t, max_rel_err=rel.max().item(),
                max_rel_err_well_conditioned=rel[well].max().item(),
                fraction_well_conditioned=well.double().mean().item(),
                max_err_over_data_limit=(rel / limit).max().item()))
        # cost breakdown of the tolerance mode
        stats = []
        _solve_concentration(r, p, 16 * eps, 30, None, stats)
        t_ratio = _median_time(lambda: dk.bessel_iv_ratio(p / 2 - 1, kappa), device, repeats)
        t_total = rows[-2]["seconds"]
        evals = sum(stats)
        t_evals = t_ratio * evals / n
        ban = r * (p - r * r) / ((1 - r) * (1 + r))
        t_ban = _median_time(lambda: r * (p - r * r) / ((1 - r) * (1 + r)), device, repeats)
        rows.append(dict(
            bench="concentration breakdown", device=str(device), threads=nthreads, n=n,
            working_set_per_evaluation=stats, evaluations_per_element=evals / n,
            ratio_pass_seconds=t_ratio, ratio_evaluations_seconds=t_evals,
            other_seconds=t_total - t_evals, total_seconds=t_total,
            banerjee_only_estimates_per_s=n / t_ban,
            banerjee_only_max_rel_err=((ban - kappa) / kappa).abs().max().item()))
    return rows


def bench_sampling(device, repeats, threads, scale=1):
    rows = []
    cases = [(3, 10.0, 200_000 // scale), (64, 100.0, 50_000 // scale),
             (1000, 1e3, 4_000 // scale), (32768, 1e4, max(10, 100 // scale))]
    for nthreads in threads:
        torch.set_num_threads(nthreads)
        for p, kappa, n in cases:
            mu = torch.zeros(p, dtype=torch.float64, device=device)
            mu[0] = 1
            d = VonMisesFisher(mu, torch.tensor(kappa, dtype=torch.float64, device=device),
                               validate_args=False)
            t = _median_time(lambda: d.sample((n,)), device, repeats)
            x = d.sample((n,))
            t_lp = _median_time(lambda: d.log_prob(x), device, repeats)
            rows.append(dict(bench="sample/log_prob", device=str(device), threads=nthreads,
                             p=p, kappa=kappa, n=n, samples_per_s=n / t,
                             log_prob_per_s=n / t_lp))
    return rows


def print_tables(rows):
    conc = [r for r in rows if r["bench"] == "concentration"]
    brk = [r for r in rows if r["bench"] == "concentration breakdown"]
    samp = [r for r in rows if r["bench"] == "sample/log_prob"]
    dev, thr = H.Column("device", 8, left=True), H.Column("threads", 8, "d")
    L = H.table([dev, thr, H.Column("  mode", 22, key=lambda r: "  " + r["mode"], left=True),
                 H.Column("M est/s", 9, ".2f", key=lambda r: r["estimates_per_s"] / 1e6),
                 H.Column("max rel err", 12, ".1e", key="max_rel_err"),
                 H.Column("well-cond.", 11, ".1e", key="max_rel_err_well_conditioned"),
                 H.Column("% well", 7, ".0%", key="fraction_well_conditioned"),
                 H.Column("err/limit", 10, ".2f", key="max_err_over_data_limit")], conc,
                title="Concentration from R (well-cond.: max rel err where 4 eps / (1 - R) "
                      "<= 1e-13; err/limit: in units of what float64 R determines)")
    L.append("")
    L += H.table([dev, thr,
                  H.Column("A_p evals/el", 13, ".2f", key="evaluations_per_element"),
                  H.Column("A_p pass ms", 12, ".1f", key=lambda r: r["ratio_pass_seconds"] * 1e3),
                  H.Column("A_p ms", 8, ".1f", key=lambda r: r["ratio_evaluations_seconds"] * 1e3),
                  H.Column("rest ms", 8, ".1f", key=lambda r: r["other_seconds"] * 1e3),
                  H.Column("total ms", 9, ".1f", key=lambda r: r["total_seconds"] * 1e3),
                  H.Column("Banerjee M/s", 13, ".1f",
                           key=lambda r: r["banerjee_only_estimates_per_s"] / 1e6),
                  H.Column("Banerjee err", 13, ".1e", key="banerjee_only_max_rel_err")], brk,
                 title="Cost breakdown of the tolerance mode (Banerjee: the closed-form "
                       "approximation alone)")
    for r in brk:
        L.append(f"  working set per evaluation ({r['device']}, {r['threads']} thr): "
                 f"{r['working_set_per_evaluation']}")
    L.append("")
    L += H.table([dev, thr, H.Column("p", 6, "d"), H.Column("kappa", 8, "g"),
                  H.Column("n", 8, "d"),
                  H.Column("sample k/s", 11, ".1f", key=lambda r: r["samples_per_s"] / 1e3),
                  H.Column("log_prob M/s", 13, ".2f", key=lambda r: r["log_prob_per_s"] / 1e6)],
                 samp, title="VonMisesFisher.sample and log_prob")
    print("\n".join(L))


def main(argv=None):
    ap = H.parser(__doc__, repeats=5, plot=False)
    ap.add_argument("--n", type=int, default=None, help="batch (default 1e6, --quick 1e5)")
    ap.add_argument("--quick", action="store_true", help="small sizes, 3 repeats")
    args = ap.parse_args(argv)
    n = args.n or (100_000 if args.quick else 1_000_000)
    repeats = min(args.repeats, 3) if args.quick else args.repeats

    devices = [torch.device(d) for d in H.devices(args.device)]
    all_threads = torch.get_num_threads()
    machine = dict(H.environment(), processor=H.cpu_name(), gpu=H.gpu_name())
    print(json.dumps({k: machine[k] for k in ("platform", "processor", "cpu_count",
                                               "torch_threads", "torch", "diffkern", "gpu")}))
    rows = []
    for dev in devices:
        threads = sorted({1, all_threads}) if dev.type == "cpu" else [all_threads]
        rows += bench_concentration(n, dev, repeats, threads)
        rows += bench_sampling(dev, repeats, threads, scale=10 if args.quick else 1)
    torch.set_num_threads(all_threads)
    H.write_json(args.json, dict(machine=machine, rows=rows))
    print_tables(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
