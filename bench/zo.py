"""Zeroth-order and finite-difference benchmark (issue 10): dk.zo and dk.fd against the loops
their users write today, peers side by side in one run.

    python bench/zo.py [--parts a,b,c,d,e] [--device auto|cpu|cuda] [--quick] [--repeats 5]
                       [--json PATH] [--plot PATH]

Parts (default sizes; --quick shrinks every size for a smoke run, also on CPU):

a. One perturb pass over the parameters of an OPT-1.3B-sized model (built from OPTConfig, or
   the same tensor shapes by hand without transformers; random weights, fp16 on CUDA, fp32 on
   CPU), timed as one pass of a loop of 10 back-to-back passes (a training loop's steady
   state; "1 call ms" is one call alone, its host time included): dk's fused multi-tensor
   kernel (Gaussian and Rademacher) against a MeZO-style loop
   (per tensor ``z = torch.normal(...)``; ``p.data.add_(eps * z)``, as MeZO's trainer does it)
   and against the copy floor (one device copy of the same number of bytes); also dk's fused
   update pass (theta -= lr * c * z, z regenerated). GB/s counts one read and one write of
   every parameter byte.
b. One optimizer step on that model, batch 16 x 256 tokens, timed as one step of a loop of 5
   (steady state: a step's host setup overlaps the previous step's update kernel; "1 call ms"
   is one step alone after a synchronize), every row alike: ``dk.zo.ZOSGD`` (module: forward
   hooks, no weight copy), a MeZO-style step (perturb +eps, loss, perturb -2eps, loss, perturb
   +eps, projected gradient ``.item()``, update regenerating z by the same seed), and the floor
   2 forwards + 1 copy pass. Peak memory (CUDA max_memory_allocated) of each against
   inference (one forward with the loss under no_grad).
c. Restore: after ``dk.zo.grad`` (SPSA; module and list-of-tensors paths) the fraction of
   parameter elements whose bits changed, fp16 / bf16 / fp32 (expected 0), next to the
   fraction a MeZO-style +eps z, -2eps z, +eps z round trip changes (an OPT-125M-sized model).
d. RGE (forward differences) with 32 directions on a ResNet-18-sized CIFAR network (built by
   hand: torchvision is not needed): the sequential ``dk.zo.grad`` loop, plain
   ``vmap(functional_call)`` over all 32 perturbed parameter sets (dk's directions), the same
   vmap in chunks of 8 directions, and dk.zo.grad(batch_size=33 and 8) (the perturbed
   stacks written by dk's fused kernel, then vmap(functional_call)).
   Time and peak memory; the estimates are compared with the sequential one.
e. ``dk.fd.jacobian`` (batched central differences) against torch.autograd.gradcheck's
   numerical Jacobian: on the device, a 10,000-input float64 function (an MLP), the column
   loop timed on a subset of columns and extrapolated linearly to all of them (it does the
   same work per column; the subset is printed), calibrated against torch's own
   ``get_numerical_jacobian`` on a smaller input; on CPU a cheap (elementwise) and an
   expensive (MLP) function, both peers in full, and for the cheap one (a circulant
   two-diagonal Jacobian) dk.fd.jacobian with its sparsity pattern (column colouring).

Times: median of --repeats after a warm-up (bench/_harness.py; CUDA events on the GPU).
"""
from __future__ import annotations

import inspect
import math
import os
import resource
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

import diffkern as dk  # noqa: E402
from diffkern import _zo_kernels as K  # noqa: E402

PARTS = "abcde"


# ----------------------------------------------------------------------------- helpers

def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_memory(fn, device):
    """(fn(), peak bytes allocated during fn) on CUDA; (fn(), None) on CPU (the process'
    peak RSS is not per call)."""
    if torch.device(device).type != "cuda":
        return fn(), None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated()


def timed(fn, device, repeats, warmup=1, budget_s=2.0):
    """Median of up to ``repeats`` calls, stopping once the timed calls add up to
    ``budget_s`` (keeps the whole run within its few minutes on slow peers)."""
    return H.measure(fn, clock=H.clock_for(device), warmup=warmup, repeats=repeats,
                     budget_s=budget_s)


def gib(b):
    return None if b is None else b / 2**30


def guarded(rows, label, fn):
    """Runs one measurement; a failure becomes an error row, so one peer cannot sink the run."""
    try:
        rows.extend(fn())
    except Exception as e:  # reported in the table and the JSON
        rows.append({"peer": label, "error": f"{type(e).__name__}: {e}"})
        if os.environ.get("BENCH_ZO_RAISE"):
            raise


# -------------------------------------------------------------- OPT-shaped language model

OPT_1_3B = dict(vocab_size=50272, hidden_size=2048, ffn_dim=8192, num_hidden_layers=24,
                num_attention_heads=32, max_position_embeddings=2048)
OPT_125M = dict(vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=2048)
OPT_TINY = dict(vocab_size=1000, hidden_size=64, ffn_dim=256, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=128)


class _Layer(nn.Module):
    def __init__(self, h, f, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(h, h), nn.Linear(h, h)
        self.v_proj, self.out_proj = nn.Linear(h, h), nn.Linear(h, h)
        self.self_attn_layer_norm, self.final_layer_norm = nn.LayerNorm(h), nn.LayerNorm(h)
        self.fc1, self.fc2 = nn.Linear(h, f), nn.Linear(f, h)

    def forward(self, x):
        b, s, h = x.shape
        y = self.self_attn_layer_norm(x)
        q, k, v = (p(y).view(b, s, self.heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out_proj(a.transpose(1, 2).reshape(b, s, h))
        return x + self.fc2(F.relu(self.fc1(self.final_layer_norm(x))))


class HandOPT(nn.Module):
    """OPT's parameter shapes (pre-LayerNorm decoder, learned positions offset by 2, tied
    LM head) in plain torch, for machines without transformers."""

    def __init__(self, vocab_size, hidden_size, ffn_dim, num_hidden_layers,
                 num_attention_heads, max_position_embeddings):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.embed_positions = nn.Embedding(max_position_embeddings + 2, hidden_size)
        self.layers = nn.ModuleList(_Layer(hidden_size, ffn_dim, num_attention_heads)
                                    for _ in range(num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(hidden_size)
        # Tied as transformers ties it: lm_head owns the same Parameter, so dk's hooks on
        # lm_head perturb it there too.
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids, labels=None):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device) + 2
        x = self.embed_tokens(input_ids) + self.embed_positions(pos)
        for layer in self.layers:
            x = layer(x)
        return F.cross_entropy(self.lm_head(self.final_layer_norm(x))[:, :-1].flatten(0, 1)
                               .float(), labels[:, 1:].flatten())


def build_lm(shape, device, dtype):
    """(model, loss_fn(batch) -> scalar, source): transformers' OPTForCausalLM when
    importable, else HandOPT; random weights built on the device in ``dtype``."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            try:
                from transformers import OPTConfig, OPTForCausalLM
                cfg = OPTConfig(**shape, word_embed_proj_dim=shape["hidden_size"], dropout=0.0,
                                attention_dropout=0.0)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = OPTForCausalLM(cfg)
                source = "transformers.OPTForCausalLM"

                def loss_fn(ids):
                    return model(input_ids=ids, labels=ids).loss
            except ImportError:
                model = HandOPT(**shape)
                source = "HandOPT (transformers not installed)"

                def loss_fn(ids):
                    return model(ids, labels=ids)
    finally:
        torch.set_default_dtype(old)
    model.eval().requires_grad_(True)
    return model, loss_fn, source


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def param_bytes(ps):
    return sum(p.numel() * p.element_size() for p in ps)


# ------------------------------------------------------------------- MeZO-style peers

def mezo_perturb(params, seed, scale, eps):
    """MeZO's perturbation: torch's global RNG reseeded, one torch.normal per tensor."""
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device,
                         dtype=p.data.dtype)
        p.data.add_(scale * eps * z)


def mezo_step(params, loss_fn, seed, eps, lr):
    mezo_perturb(params, seed, 1, eps)
    loss1 = loss_fn()
    mezo_perturb(params, seed, -2, eps)
    loss2 = loss_fn()
    mezo_perturb(params, seed, 1, eps)
    projected = ((loss1 - loss2) / (2 * eps)).item()
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device,
                         dtype=p.data.dtype)
        p.data.sub_(lr * projected * z)
    return loss1


# ---------------------------------------------------------------------------- part a

def per_pass(fn, device, repeats, passes=10):
    """Timing of one pass in a loop of ``passes`` back-to-back calls (median over repeats of
    the loop's time / passes): a training loop's steady state, where each call's host work
    (argument checks, the launch) overlaps the previous call's kernel. On CPU the same with
    the wall clock."""
    return timed(lambda: [fn() for _ in range(passes)], device, repeats).scaled(1.0 / passes)


def part_a(cfg, device, repeats):
    model, _, source = build_lm(cfg["lm"], device, cfg["dtype"])
    params = trainable(model)
    nbytes = param_bytes(params)
    n = sum(p.numel() for p in params)
    info = dict(model=source, tensors=len(params), elements=n, bytes=nbytes,
                dtype=str(cfg["dtype"]))
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    rows = []

    def row(peer, fn, launches=None):
        # ms: one pass in a loop of passes (steady state); ms_single: one call alone,
        # its host time (checks, launch) included.
        t = per_pass(fn, device, repeats)
        single = timed(fn, device, repeats)
        return dict(peer=peer, ms=t.median * 1e3, gbps=2 * nbytes / t.median / 1e9,
                    launches=launches, ms_single=single.median * 1e3, **t.row())

    guarded(rows, "copy floor", lambda: [row("copy floor (same bytes)",
                                             lambda: dst.copy_(src), 1)])
    seeds = iter(range(10**6))
    for dist in ("gaussian", "rademacher"):
        guarded(rows, f"dk {dist}", lambda dist=dist: [row(
            f"dk perturb_ ({dist})",
            lambda: K.perturb_(params, next(seeds), 0, 1e-9, dist), 1)])
    guarded(rows, "dk update_", lambda: [row(
        "dk update_ (1 direction, gaussian)",
        lambda: K.update_(params, [(next(seeds), 0, 1.0)], 1e-9), 1)])
    guarded(rows, "MeZO loop", lambda: [row(
        "MeZO loop (torch.normal per tensor)",
        lambda: mezo_perturb(params, next(seeds), 1, 1e-9), 3 * len(params))])
    floor = next((r["ms"] for r in rows if r["peer"].startswith("copy") and "ms" in r), None)
    for r in rows:
        if floor and "ms" in r:
            r["of_copy_bandwidth"] = floor / r["ms"]
    del model, params, src, dst
    return dict(info=info, rows=rows)


# ---------------------------------------------------------------------------- part b

def part_b(cfg, device, repeats, copy_ms=None):
    model, loss_of, source = build_lm(cfg["lm"], device, cfg["dtype"])
    params = trainable(model)
    batch, seq = cfg["batch"]
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, cfg["lm"]["vocab_size"], (batch, seq), generator=g).to(device)
    closure = lambda: loss_of(ids)  # noqa: E731
    largest = max(param_bytes(list(m.parameters(recurse=False))) for m in model.modules())
    weights = param_bytes(params)
    rows = []

    # Every row: one call in a loop of calls (a training loop's steady state, where a step's
    # setup overlaps the previous step's last kernel; "ms"), and one call alone after a
    # synchronize ("1 call ms").
    with torch.no_grad():  # timed first: the peak is then that of a warm forward
        fwd = per_pass(closure, device, repeats, passes=5)
        fwd1 = timed(closure, device, repeats)
        _, inference_peak = peak_memory(closure, device)
    rows.append(dict(peer="1 forward (inference, no_grad)", ms=fwd.median * 1e3,
                     ms_single=fwd1.median * 1e3, peak_gib=gib(inference_peak), **fwd.row()))
    if copy_ms is None:
        src = torch.empty(weights, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        copy_ms = per_pass(lambda: dst.copy_(src), device, repeats).median * 1e3
        del src, dst
    floor_ms = 2 * fwd.median * 1e3 + copy_ms
    rows.append(dict(peer="floor: 2 forwards + 1 copy pass", ms=floor_ms))

    def zosgd_rows(unit=None):
        opt = dk.zo.ZOSGD(model, lr=1e-7, eps=1e-3, seed=0, history=False,
                          hook_unit_bytes=unit)
        t = per_pass(lambda: opt.step(closure), device, repeats, passes=5)
        t1 = timed(lambda: opt.step(closure), device, repeats)
        _, peak = peak_memory(lambda: opt.step(closure), device)
        label = "dk.zo.ZOSGD (module, hooks)" if unit is None else \
            f"dk.zo.ZOSGD (module, hook_unit_bytes={unit!r})"
        return [dict(peer=label, ms=t.median * 1e3, ms_single=t1.median * 1e3,
                     peak_gib=gib(peak), **t.row())]

    def zosgd_list_rows():
        opt = dk.zo.ZOSGD(params, lr=1e-7, eps=1e-3, seed=0, history=False)
        t = per_pass(lambda: opt.step(closure), device, repeats, passes=5)
        t1 = timed(lambda: opt.step(closure), device, repeats)
        _, peak = peak_memory(lambda: opt.step(closure), device)
        return [dict(peer="dk.zo.ZOSGD (list: backup copy)", ms=t.median * 1e3,
                     ms_single=t1.median * 1e3, peak_gib=gib(peak), **t.row())]

    def mezo_rows():
        seeds = iter(range(10**6))
        with torch.no_grad():
            t = per_pass(lambda: mezo_step(params, closure, next(seeds), 1e-3, 1e-7), device,
                         repeats, passes=5)
            t1 = timed(lambda: mezo_step(params, closure, next(seeds), 1e-3, 1e-7), device,
                       repeats)
            _, peak = peak_memory(lambda: mezo_step(params, closure, next(seeds), 1e-3, 1e-7),
                                  device)
        return [dict(peer="MeZO-style step", ms=t.median * 1e3, ms_single=t1.median * 1e3,
                     peak_gib=gib(peak), **t.row())]

    guarded(rows, "dk.zo.ZOSGD (module, hooks)", zosgd_rows)
    guarded(rows, "dk.zo.ZOSGD (module, hook_unit_bytes='auto')", lambda: zosgd_rows("auto"))
    guarded(rows, "dk.zo.ZOSGD (list: backup copy)", zosgd_list_rows)
    guarded(rows, "MeZO-style step", mezo_rows)
    for r in rows:
        if "ms" in r:
            r["of_floor"] = r["ms"] / floor_ms
        if r.get("peak_gib") is not None and inference_peak:
            r["over_inference"] = r["peak_gib"] * 2**30 / inference_peak - 1
    # The targets read the fastest module-path row whose peak memory is within the target
    # (the hook granularities trade hooks per forward for scratch memory).
    allowed = inference_peak * 1.02 + largest if inference_peak else None
    module_rows = [r for r in rows if r["peer"].startswith("dk.zo.ZOSGD (module") and "ms" in r]
    within = [r for r in module_rows if allowed is None or r.get("peak_gib") is None
              or r["peak_gib"] * 2**30 <= allowed]
    zo = min(within or module_rows, key=lambda r: r["ms"], default=None)
    mezo = next((r for r in rows if r["peer"] == "MeZO-style step" and "ms" in r), None)
    targets = {}
    if zo:
        targets["zosgd_row"] = zo["peer"]
        targets["zosgd_of_floor"] = zo["ms"] / floor_ms  # target <= 1.15
        if mezo:
            targets["speedup_vs_mezo"] = mezo["ms"] / zo["ms"]  # target >= 1.6
        if zo.get("peak_gib") is not None and inference_peak:
            # target: peak <= inference * 1.02 + the largest module's parameters
            targets["peak_allowed_gib"] = gib(inference_peak * 1.02 + largest)
            targets["peak_within_target"] = zo["peak_gib"] * 2**30 <= inference_peak * 1.02 + largest
    info = dict(model=source, batch=batch, seq=seq, weights_gib=gib(weights),
                largest_module_gib=gib(largest), copy_ms=copy_ms, floor_ms=floor_ms,
                **targets)
    del model, params
    return dict(info=info, rows=rows)


# ---------------------------------------------------------------------------- part c

def _changed_fraction(before, params):
    changed = sum(int((b != p.detach().view(b.dtype)).sum()) for b, p in zip(before, params))
    return changed / sum(b.numel() for b in before)


def _bits(params):
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return [p.detach().view(ints[p.element_size()]).clone() for p in params]


def part_c(cfg, device, repeats):
    rows = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        def one(dtype=dtype):
            model, loss_of, source = build_lm(cfg["lm_c"], device, dtype)
            params = trainable(model)
            g = torch.Generator(device="cpu").manual_seed(1)
            ids = torch.randint(0, cfg["lm_c"]["vocab_size"], cfg["batch_c"],
                                generator=g).to(device)
            closure = lambda: loss_of(ids)  # noqa: E731
            out = dict(peer=str(dtype).split(".")[1], model=source,
                       elements=sum(p.numel() for p in params))
            before = _bits(params)
            dk.zo.grad(closure, model, seed=3, num_directions=2)
            out["dk_module_changed"] = _changed_fraction(before, params)
            est = dk.zo.grad(closure, params, seed=3, num_directions=2)
            out["dk_list_changed"] = _changed_fraction(before, params)
            del est
            with torch.no_grad():
                for scale in (1, -2, 1):
                    mezo_perturb(params, 3, scale, 1e-3)
            out["mezo_changed"] = _changed_fraction(before, params)
            del model, params
            return [out]
        guarded(rows, str(dtype).split(".")[1], one)
    return dict(info=dict(eps=1e-3, estimator="spsa, 2 directions"), rows=rows)


# ---------------------------------------------------------------------------- part d

class _Basic(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool; 11.2M parameters at width 64)."""

    def __init__(self, width=64, classes=10):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w),
                                  nn.ReLU())
        blocks, cin = [], w
        for i, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
            for j in range(2):
                blocks.append(_Basic(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


def _has_option(name):
    """Whether this build's dk.zo.grad takes the keyword ``name``."""
    return name in inspect.signature(dk.zo.grad).parameters


def _has_batched_grad():
    """Whether this build's dk.zo.grad takes batch_size (batched evaluation by vmap)."""
    return _has_option("batch_size")


def part_d(cfg, device, repeats):
    torch.manual_seed(0)
    width, batch, size, ndir = cfg["resnet"]
    model = ResNet18(width).to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    names = [n for n, p in model.named_parameters()]
    params = [p for p in model.parameters()]
    eps, seed = 1e-3, 11
    loss_fn = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    rows = []
    results = {}

    def sequential(unit=None, target=None):
        with torch.no_grad():
            return dk.zo.grad(loss_fn, model if target is None else target, estimator="rge",
                              mode="forward", num_directions=ndir, eps=eps, seed=seed,
                              **({} if unit is None else dict(hook_unit_bytes=unit))).grads

    def vmapped(chunk):
        """RGE forward differences with dk's directions z(seed, k, t, .), perturbed parameter
        sets evaluated by vmap(functional_call) ``chunk`` directions at a time."""
        from torch.func import functional_call
        with torch.no_grad():
            base = loss_fn()

            def loss_at(pdict):
                return F.cross_entropy(functional_call(model, pdict, (x,)), y)
            grads = [torch.zeros_like(p) for p in params]
            for start in range(0, ndir, chunk):
                ks = range(start, min(start + chunk, ndir))
                zs = [torch.stack([K.direction(t, p, seed, k) for k in ks])
                      for t, p in enumerate(params)]
                batched = {n: p.unsqueeze(0) + eps * z for n, p, z in zip(names, params, zs)}
                losses = torch.vmap(loss_at)(batched)
                coeff = (losses - base) / eps / ndir
                for gr, z in zip(grads, zs):
                    gr.add_(torch.tensordot(coeff.to(z.dtype), z, dims=1))
                del batched, zs
            return grads

    whole = sum(p.numel() * p.element_size() for p in params)
    peers = [("sequential loop (dk.zo.grad)", sequential),
             # The same loop with fewer hooks (host time per evaluation): units up to the
             # largest module ("auto"), or the whole model as one unit (one scratch copy of
             # every parameter), and the list path (perturbed in place, one backup copy).
             ("sequential, hook_unit_bytes='auto'", lambda: sequential("auto")),
             ("sequential, one hook unit (whole model)", lambda: sequential(whole)),
             ("sequential, list path (backup copy)", lambda: sequential(target=params)),
             # The host-bound forward captured once in a CUDA graph and replayed per point
             # (parameters perturbed in place, one backup copy).
             ("dk.zo.grad(cuda_graph=True)", lambda: dk.zo.grad(
                 loss_fn, model, estimator="rge", mode="forward", num_directions=ndir,
                 eps=eps, seed=seed, cuda_graph=True).grads),
             (f"vmap(functional_call), all {ndir}", lambda: vmapped(ndir)),
             (f"vmap(functional_call), chunks of {max(1, ndir // 4)}",
              lambda: vmapped(max(1, ndir // 4)))]
    batched = _has_batched_grad()
    if batched:  # ndir + 1 points (theta and the ndir perturbed ones): one chunk, or four;
        # and small chunks (2, 4 points), whose peak memory can stay within the target's 2x
        # of the sequential loop (vmap multiplies the activations by the chunk too)
        for bs in sorted({ndir + 1, max(1, ndir // 4), 4, 2}, reverse=True):
            peers.append((f"dk.zo.grad(batch_size={bs})",
                          lambda bs=bs: dk.zo.grad(
                              loss_fn, model, estimator="rge", mode="forward",
                              num_directions=ndir, eps=eps, seed=seed,
                              batch_size=bs).grads))
    if torch.device(device).type != "cuda" or not _has_option("cuda_graph"):
        peers = [p for p in peers if p[0] != "dk.zo.grad(cuda_graph=True)"]
    # The memory reference: one plain forward (inference), no estimate.
    with torch.no_grad():
        _, inference_peak = peak_memory(loss_fn, device)
    for label, fn in peers:
        def one(label=label, fn=fn):
            t = timed(fn, device, repeats)
            out, peak = peak_memory(fn, device)
            # Kept on the host: estimates held on the GPU would count in every later
            # row's peak (each is one copy of the parameters in float32).
            results[label] = [o.cpu() for o in out]
            del out
            return [dict(peer=label, ms=t.median * 1e3, peak_gib=gib(peak), **t.row())]
        guarded(rows, label, one)
    if not batched:
        rows.append(dict(peer="dk.zo.grad(batch_size=...)",
                         error="not in this build yet (dk.zo.grad has no batch_size)"))
    ref = results.get(peers[0][0])
    seq_peak = next((r.get("peak_gib") for r in rows if r["peer"] == peers[0][0]), None)
    for r in rows:
        out = results.get(r["peer"])
        if ref is not None and out is not None:
            num = math.sqrt(sum(float((a - b).double().square().sum()) for a, b in zip(out, ref)))
            den = math.sqrt(sum(float(b.double().square().sum()) for b in ref))
            r["rel_diff_vs_sequential"] = num / den
        if seq_peak and r.get("peak_gib") is not None:
            r["memory_vs_sequential"] = r["peak_gib"] / seq_peak
    info = dict(params=sum(p.numel() for p in params), width=width, batch=batch,
                image=size, directions=ndir, inference_peak_gib=gib(inference_peak))
    # The target: dk's batched RGE at least as fast as vmap(functional_call) over all
    # directions, within 2x the sequential loop's peak memory: the fastest dk row within it.
    vmap_all = next((r for r in rows if r["peer"].startswith("vmap(functional_call), all")
                     and "ms" in r), None)
    def fits(r):
        return "ms" in r and r.get("memory_vs_sequential") is not None and \
            r["memory_vs_sequential"] <= 2
    within = [r for r in rows if r["peer"].startswith("dk.zo.grad(batch_size") and fits(r)]
    if within:
        best = min(within, key=lambda r: r["ms"])
        info["batched_within_2x_memory"] = best["peer"]
        info["batched_within_2x_ms"] = best["ms"]
        if vmap_all:
            info["speedup_vs_vmap_all"] = vmap_all["ms"] / best["ms"]  # target >= 1
    # Any dk row (batched or not) within the memory bound: what a user with that budget
    # should run, reported next to the batched-only answer.
    any_dk = [r for r in rows if not r["peer"].startswith("vmap") and fits(r)]
    if any_dk:
        best = min(any_dk, key=lambda r: r["ms"])
        info["dk_fastest_within_2x_memory"] = best["peer"]
        info["dk_fastest_within_2x_ms"] = best["ms"]
        if vmap_all:
            info["dk_fastest_within_2x_vs_vmap_all"] = vmap_all["ms"] / best["ms"]
    return dict(info=info, rows=rows)


# ---------------------------------------------------------------------------- part e

def column_loop(fn, x, eps, columns):
    """gradcheck's numerical Jacobian, restricted to ``columns``: the per-column work of
    torch.autograd.gradcheck._compute_numerical_gradient (perturb the entry in place, two
    calls, central difference)."""
    flat = x.view(-1)
    cols = []
    for j in columns:
        entry = flat[j]
        orig = entry.clone()
        entry.copy_(orig - eps)
        outa = fn(x)
        entry.copy_(orig + eps)
        outb = fn(x)
        entry.copy_(orig)
        cols.append(((outb - outa) / (2 * eps)).detach().reshape(-1))
    return torch.stack(cols, 1)


def torch_numerical_jacobian(fn, x, eps):
    gc = sys.modules["torch.autograd.gradcheck"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in favour of gradcheck itself
        # It perturbs the inputs that require grad; fn gets the tuple of inputs.
        x = x.detach().clone().requires_grad_(True)
        with torch.no_grad():
            return gc.get_numerical_jacobian(lambda xs: fn(xs[0]), (x,), eps=eps)[0].t()


def _mlp(n, hidden, m, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w1 = (torch.randn(hidden, n, generator=g, dtype=torch.float64) / math.sqrt(n)).to(device)
    b1 = torch.randn(hidden, generator=g, dtype=torch.float64).to(device)
    w2 = (torch.randn(m, hidden, generator=g, dtype=torch.float64) / math.sqrt(hidden)).to(device)

    def f(x):  # (..., n) -> (..., m): accepts a leading batch dimension
        return torch.tanh(x @ w1.T + b1) @ w2.T

    def exact(x):
        s = 1 - torch.tanh(x @ w1.T + b1) ** 2
        return (w2 * s) @ w1
    return f, exact


def _cheap(device):
    def f(x):  # elementwise with a neighbour: a banded (circulant) Jacobian, m = n
        return torch.sin(x) * torch.cos(torch.roll(x, 1, -1))

    def exact(x):
        n = x.numel()
        j = torch.zeros(n, n, dtype=x.dtype, device=x.device)
        idx = torch.arange(n, device=x.device)
        j[idx, idx] = torch.cos(x) * torch.cos(torch.roll(x, 1, -1))
        j[idx, (idx - 1) % n] += -torch.sin(x) * torch.sin(torch.roll(x, 1, -1))
        return j
    return f, exact


def _circulant_pattern(n):
    """The cheap function's pattern: entry (i, i) and (i, i - 1 mod n)."""
    idx = torch.arange(n)
    pattern = torch.zeros(n, n, dtype=torch.bool)
    pattern[idx, idx] = True
    pattern[idx, (idx - 1) % n] = True
    return pattern


def part_e(cfg, device, repeats):
    rows = []
    eps_loop = 1e-6  # gradcheck's default for float64

    def case(name, f, exact, n, subset, calibrate_n=None, peer_full=False,
             sparsity=None, dev=device):
        # dev: where this case runs (the "cheap" and "expensive" cases are CPU cases also
        # when the benchmark runs on CUDA).
        g = torch.Generator(device="cpu").manual_seed(5)
        x = torch.randn(n, generator=g, dtype=torch.float64).to(dev)
        ref = exact(x)
        scale = float(ref.abs().max())
        out = []

        def dk_row():
            t = timed(lambda: dk.fd.jacobian(f, x), dev, repeats)
            err = float((t.out - ref).abs().max()) / scale
            return [dict(case=name, peer="dk.fd.jacobian (batched)", n=n, ms=t.median * 1e3,
                         columns_timed=n, max_rel_err=err, **t.row())]
        guarded(out, "dk.fd.jacobian", dk_row)
        if sparsity is not None:
            def sparse_row():
                pattern = sparsity(n)
                t = timed(lambda: dk.fd.jacobian(f, x, sparsity=pattern), dev, repeats)
                err = float((t.out - ref).abs().max()) / scale
                colours = dk.fd.color_columns(*torch.nonzero(pattern, as_tuple=True), n)[1]
                return [dict(case=name, peer=f"dk.fd.jacobian (sparsity: {colours} colours)",
                             n=n, ms=t.median * 1e3, columns_timed=n, max_rel_err=err,
                             **t.row())]
            guarded(out, "dk.fd.jacobian sparsity", sparse_row)
        if peer_full:
            def full_row():
                t = timed(lambda: torch_numerical_jacobian(f, x.clone(), eps_loop), dev,
                          max(1, repeats // 2), warmup=0)  # a long loop: no warm-up needed
                err = float((t.out.to(ref.dtype) - ref).abs().max()) / scale
                return [dict(case=name, peer="gradcheck get_numerical_jacobian", n=n,
                             ms=t.median * 1e3, columns_timed=n, max_rel_err=err, **t.row())]
            guarded(out, "gradcheck get_numerical_jacobian", full_row)
        else:
            def loop_row():
                cols = range(0, n, max(1, n // subset))
                xs = x.clone()
                t = timed(lambda: column_loop(f, xs, eps_loop, cols), dev,
                          max(1, repeats // 2), warmup=0)
                err = float((t.out - ref[:, list(cols)]).abs().max()) / scale
                r = dict(case=name, peer="gradcheck column loop (extrapolated)", n=n,
                         ms=t.median * 1e3 * n / len(cols), columns_timed=len(cols),
                         max_rel_err=err, **t.row())
                if calibrate_n:  # torch's own function against our loop, on a smaller n
                    fs, _ = _mlp(calibrate_n, 256, 64, dev, seed=1)
                    xc = torch.randn(calibrate_n, dtype=torch.float64, device=dev)
                    a = timed(lambda: torch_numerical_jacobian(fs, xc.clone(), eps_loop),
                              dev, 2, warmup=0).median
                    b = timed(lambda: column_loop(fs, xc.clone(), eps_loop,
                                                  range(calibrate_n)), dev, 2,
                              warmup=0).median
                    r["torch_over_loop_at_calibration_n"] = a / b
                    r["calibration_n"] = calibrate_n
                return [r]
            guarded(out, "gradcheck column loop", loop_row)
        base = next((r["ms"] for r in out if r["peer"].startswith("dk") and "ms" in r), None)
        for r in out:
            if base and "ms" in r:
                r["vs_dk"] = r["ms"] / base
        rows.extend(out)

    dev_type = torch.device(device).type
    n_big, sub, cal = cfg["fd_big"]
    if dev_type == "cuda" or cfg["quick"]:
        f, exact = _mlp(n_big, 256, 64, device)
        case(f"MLP {n_big}->256->64 on {dev_type}", f, exact, n_big, sub, calibrate_n=cal)
    n_cheap, n_exp = cfg["fd_cpu"]
    f, exact = _cheap("cpu")
    case("cheap: sin(x)*cos(roll(x)), cpu", f, exact, n_cheap, None, peer_full=True,
         sparsity=_circulant_pattern, dev="cpu")
    f, exact = _mlp(n_exp, 1024, 256, "cpu")
    case(f"expensive: MLP {n_exp}->1024->256, cpu", f, exact, n_exp, None, peer_full=True,
         dev="cpu")
    return dict(info=dict(loop_eps=eps_loop, dk_eps="cbrt(float64 eps) * max(1, |x|)"),
                rows=rows)


# ----------------------------------------------------------------------------- driver

def config(quick, device):
    cuda = torch.device(device).type == "cuda"
    if quick:
        return dict(quick=True, lm=OPT_TINY, lm_c=OPT_TINY, batch=(2, 32), batch_c=(2, 16),
                    dtype=torch.float16 if cuda else torch.float32,
                    resnet=(8, 4, 16, 8), fd_big=(2000, 100, 200), fd_cpu=(300, 200))
    return dict(quick=False, lm=OPT_1_3B, lm_c=OPT_125M, batch=(16, 256), batch_c=(4, 128),
                dtype=torch.float16 if cuda else torch.float32,
                resnet=(64, 32, 32, 32), fd_big=(10_000, 1000, 1000), fd_cpu=(2000, 500))


COLUMNS = {
    "a": [H.Column("peer", 38, left=True), H.Column("ms", 10, ".3f"),
          H.Column("1 call ms", 10, ".3f", key="ms_single"),
          H.Column("GB/s", 9, ".1f", key="gbps"), H.Column("of copy bw", 11, ".1%",
                                                           key="of_copy_bandwidth"),
          H.Column("launches", 10, "d")],
    "b": [H.Column("peer", 36, left=True), H.Column("ms", 10, ".2f"),
          H.Column("1 call ms", 10, ".2f", key="ms_single"),
          H.Column("x floor", 9, ".3f", key="of_floor"),
          H.Column("peak GiB", 10, ".3f", key="peak_gib"),
          H.Column("vs inference", 13, "+.2%", key="over_inference")],
    "c": [H.Column("dtype", 10, left=True, key="peer"),
          H.Column("dk.zo.grad module", 19, ".2e", key="dk_module_changed"),
          H.Column("dk.zo.grad list", 17, ".2e", key="dk_list_changed"),
          H.Column("MeZO round trip", 17, ".2%", key="mezo_changed")],
    "d": [H.Column("peer", 40, left=True), H.Column("ms", 10, ".2f"),
          H.Column("peak GiB", 10, ".3f", key="peak_gib"),
          H.Column("x seq mem", 10, ".2f", key="memory_vs_sequential"),
          H.Column("rel diff", 10, ".1e", key="rel_diff_vs_sequential")],
    "e": [H.Column("case", 38, left=True), H.Column("peer", 38, left=True),
          H.Column("n", 7, "d"), H.Column("ms", 11, ".2f"), H.Column("x dk", 8, ".1f",
                                                                     key="vs_dk"),
          H.Column("cols timed", 11, "d", key="columns_timed"),
          H.Column("max rel err", 12, ".1e", key="max_rel_err"),
          H.Column("torch/loop", 11, ".2f", key="torch_over_loop_at_calibration_n")],
}
TITLES = {"a": "a. one perturb pass over the parameters (fraction of copy bandwidth: higher is better)",
          "b": "b. one optimizer step (x floor: lower is better)",
          "c": "c. fraction of parameter elements changed after evaluating (0 = exact restore)",
          "d": "d. RGE, forward differences, batched directions",
          "e": "e. finite-difference Jacobian: dk.fd.jacobian vs gradcheck's numerical Jacobian"}


def plot(results, path):
    plt = H.pyplot()
    if plt is None:
        return
    parts = [p for p in "abde" if p in results]
    if not parts:
        return
    fig, axes = plt.subplots(1, len(parts), figsize=(5 * len(parts), 4), squeeze=False)
    for ax, p in zip(axes[0], parts):
        rows = [r for r in results[p]["rows"] if "ms" in r]
        labels = [(r["case"].split(":")[0].split(",")[0][:16] + ": " if "case" in r else "")
                  + r["peer"][:34] for r in rows]
        ax.barh(range(len(rows)), [r["ms"] for r in rows])
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.set_xlabel("ms")
        if p == "e":
            ax.set_xscale("log")
        ax.set_title(TITLES[p].split(" (")[0][:48], fontsize=8)
    fig.tight_layout()
    H.save(fig, path)


def main(argv=None):
    ap = H.parser(__doc__, devices=("auto", "cpu", "cuda"), device_default="auto")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help="comma-separated subset of a,b,c,d,e (default all)")
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 repeats (smoke run)")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"--parts: unknown part(s) {bad}; choose from {','.join(PARTS)}")
    device = H.devices(args.device)[0]
    repeats = min(args.repeats, 2) if args.quick else args.repeats
    cfg = config(args.quick, device)
    env = H.environment()
    print(f"device {device} ({env['gpu_name'] or env['cpu_name']}), torch {env['torch']}, "
          f"{'quick' if args.quick else 'default'} sizes", flush=True)
    results = {}
    runners = dict(a=part_a, b=part_b, c=part_c, d=part_d, e=part_e)
    for p in parts:
        kwargs = {}
        if p == "b" and "a" in results:
            kwargs["copy_ms"] = next((r["ms"] for r in results["a"]["rows"]
                                      if r["peer"].startswith("copy") and "ms" in r), None)
        start = time.perf_counter()
        try:
            results[p] = runners[p](cfg, device, repeats, **kwargs)
        except Exception as e:
            results[p] = dict(info={}, rows=[{"peer": "(part)", "error": f"{type(e).__name__}: {e}"}])
            if os.environ.get("BENCH_ZO_RAISE"):
                raise
        results[p]["seconds"] = time.perf_counter() - start
        if device == "cuda":
            torch.cuda.empty_cache()
        info = results[p]["info"]
        print("\n".join(H.table(COLUMNS[p], results[p]["rows"], title=f"\n{TITLES[p]}",
                                lead=2 if p == "e" else 1)))
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in info.items()) + f"  [{results[p]['seconds']:.1f} s]",
              flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    H.write_json(args.json, dict(device=device, quick=args.quick, parts=results,
                                 peak_rss_bytes=rss))
    if args.plot:
        plot(results, args.plot)
    errors = [r for res in results.values() for r in res["rows"] if "error" in r
              and not r["error"].startswith("not in this build")]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
