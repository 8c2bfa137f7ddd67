"""von Mises-Fisher benchmark: concentration estimates/s, sampling and log_prob throughput.

    python bench/vmf.py [--n 1000000] [--repeats 5] [--device cpu|cuda|all] [--json PATH]

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
(p, kappa). Absolute times are for the machine printed at the top.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

import diffkern as dk
from diffkern.distributions import (VonMisesFisher, _solve_concentration,
                                    concentration_from_mean_resultant_length)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device, repeats):
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


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


def bench_sampling(device, repeats, threads):
    rows = []
    cases = [(3, 10.0, 200_000), (64, 100.0, 50_000), (1000, 1e3, 4_000), (32768, 1e4, 100)]
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)

    devices = []
    if args.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if args.device in ("cuda", "all") and torch.cuda.is_available() and \
            dk.build_info().get("cuda"):
        devices.append(torch.device("cuda"))
    all_threads = torch.get_num_threads()
    machine = dict(platform=platform.platform(), processor=platform.processor(),
                   cpu_count=os.cpu_count(), torch_threads=all_threads,
                   torch=torch.__version__, diffkern=dk.__version__,
                   gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    print(json.dumps(machine))
    rows = []
    for dev in devices:
        threads = sorted({1, all_threads}) if dev.type == "cpu" else [all_threads]
        rows += bench_concentration(args.n, dev, args.repeats, threads)
        rows += bench_sampling(dev, args.repeats, threads)
    torch.set_num_threads(all_threads)

    for row in rows:
        if row["bench"] == "concentration":
            print(f"[{row['device']}, {row['threads']} thr] concentration ({row['mode']}): "
                  f"{row['estimates_per_s'] / 1e6:.2f} M estimates/s; max rel err "
                  f"{row['max_rel_err']:.1e} (well-conditioned R: "
                  f"{row['max_rel_err_well_conditioned']:.1e}, "
                  f"{100 * row['fraction_well_conditioned']:.0f}% of points); "
                  f"max err / data limit {row['max_err_over_data_limit']:.2f}")
        elif row["bench"] == "concentration breakdown":
            print(f"[{row['device']}, {row['threads']} thr]   breakdown: "
                  f"{row['evaluations_per_element']:.2f} A_p evaluations/element "
                  f"(working set {row['working_set_per_evaluation']}); one A_p pass "
                  f"{row['ratio_pass_seconds'] * 1e3:.1f} ms, A_p total "
                  f"{row['ratio_evaluations_seconds'] * 1e3:.1f} ms, rest "
                  f"{row['other_seconds'] * 1e3:.1f} ms of {row['total_seconds'] * 1e3:.1f} ms;"
                  f" Banerjee only: {row['banerjee_only_estimates_per_s'] / 1e6:.1f} M/s, "
                  f"max rel err {row['banerjee_only_max_rel_err']:.1e}")
        else:
            print(f"[{row['device']}, {row['threads']} thr] p={row['p']:>5} "
                  f"kappa={row['kappa']:g}: sample {row['samples_per_s'] / 1e3:.1f} k/s, "
                  f"log_prob {row['log_prob_per_s'] / 1e6:.2f} M/s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(machine=machine, rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
