"""Host cost of dk.zo's module hooks (issue 10): what each perturbed module adds to a forward.

    python bench/zo_hooks.py [--device cpu|cuda] [--modules 200] [--width 64] [--batch 4]
                             [--dtype float32|float16|bfloat16] [--unit-bytes auto|N ...]
                             [--repeats 20] [--json PATH]

The model is a stack of ``--modules`` small ``nn.Linear(width, width)`` (each owns a weight
and a bias), so the kernels and the matmuls cost next to nothing and what remains is the
host work per hooked module (Python hooks, descriptor building, the kernel call's dispatch,
scratch allocation, the ``.data`` swaps). Timed (median of --repeats, after a warm-up):

- ``forward``: the loss, no hooks;
- ``hooked forward``: the same loss evaluated once at a perturbation by dk.zo's module
  evaluator (every module swaps in its perturbed copy and back);
- ``ZOSGD step (module)`` and ``ZOSGD step (list)``: one ``dk.zo.ZOSGD`` step (2 forwards
  and one update) on the module (hooks) and on its parameter list (in place, backup copy).

``us per hook`` = (hooked forward - forward) / hooked units: the host cost of one unit's
pre + post hook. With ``--unit-bytes`` the module path is also timed with coarser hook
units (``ZOSGD(..., hook_unit_bytes=N)``; "auto" = the package's automatic choice), when
the installed diffkern has that option.
"""
from __future__ import annotations

import inspect
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

import diffkern as dk  # noqa: E402
from diffkern import zo as Z  # noqa: E402


def build(modules, width, batch, dtype, device):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(modules)])
    model = model.to(device=device, dtype=dtype)
    x = torch.randn(batch, width, device=device, dtype=dtype)

    def loss_fn():
        return model(x).float().square().mean()
    return model, loss_fn


def _has_unit_option():
    return "hook_unit_bytes" in inspect.signature(dk.zo.ZOSGD.__init__).parameters


def _evaluator(model, unit_bytes):
    flat = [p for p in model.parameters() if p.requires_grad]
    if unit_bytes is None:
        return Z._Evaluator([flat], model, "bench")
    return Z._Evaluator([flat], model, "bench", hook_unit_bytes=unit_bytes)


def _hooked_units(ev):
    # The pre-hooks the evaluator registered (pre and post are registered in pairs).
    return len(ev.handles) // 2


def run(args, device):
    dtype = getattr(torch, args.dtype)
    model, loss_fn = build(args.modules, args.width, args.batch, dtype, device)
    clock = H.clock_for(device)
    rep = dict(clock=clock, warmup=3, repeats=args.repeats)
    rows = []
    plain = H.measure(loss_fn, **rep).median
    rows.append(dict(case="forward", ms=plain * 1e3))

    configs = [None] + ([u for u in args.unit_bytes] if _has_unit_option() else [])
    for unit in configs:
        label = "" if unit is None else f" units<={unit}"
        pert = Z._Direction([12345], 0, 1e-3, "gaussian", "+")
        with _evaluator(model, unit) as ev:
            hooked = H.measure(lambda: ev.evaluate(loss_fn, pert), **rep).median
            units = _hooked_units(ev)
        rows.append(dict(case=f"hooked forward{label}", ms=hooked * 1e3, units=units,
                         us_per_hook=(hooked - plain) / units * 1e6))
        kw = {} if unit is None else dict(hook_unit_bytes=unit)
        opt = dk.zo.ZOSGD(model, lr=1e-6, seed=0, **kw)
        step = H.measure(lambda: opt.step(loss_fn), **rep).median
        rows.append(dict(case=f"ZOSGD step (module){label}", ms=step * 1e3, units=units,
                         us_per_hook=(step - 2 * plain) / (2 * units) * 1e6))
    opt = dk.zo.ZOSGD(list(model.parameters()), lr=1e-6, seed=0)
    step = H.measure(lambda: opt.step(loss_fn), **rep).median
    rows.append(dict(case="ZOSGD step (list)", ms=step * 1e3))
    return rows


def main(argv=None):
    ap = H.parser(__doc__, devices=("cpu", "cuda"), device_default="cpu", repeats=20,
                  plot=False)
    ap.add_argument("--modules", type=int, default=200)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--unit-bytes", nargs="*", default=["auto"],
                    help='coarser hook units to time too: byte budgets or "auto"')
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: a shared machine's spinning threads would "
                         "drown the host cost being measured)")
    args = ap.parse_args(argv)
    args.unit_bytes = [u if u == "auto" else int(u) for u in args.unit_bytes]
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = run(args, device)
    lines = H.table([H.Column("case", 34, left=True), H.Column("ms", 10, ".3f"),
                     H.Column("units", 7, "d"), H.Column("us/hook", 9, ".1f", "us_per_hook")],
                    rows, title=f"dk.zo hooks, {args.modules} x Linear({args.width}), {args.dtype}, "
                        f"{device}")
    print("\n".join(lines))
    H.write_json(args.json, dict(bench="zo_hooks", device=str(device), modules=args.modules,
                                 width=args.width, batch=args.batch, dtype=args.dtype,
                                 rows=rows))


if __name__ == "__main__":
    main()
