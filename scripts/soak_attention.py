"""Shared-prefix attention problems for scripts/soak.py: random layouts, heads, dtypes and
switches for ``dk.prefix_attention`` forward + backward, and the contract each must meet.

A problem is a packed layout (1-3 groups; prefixes of 0 to 1500 tokens, 1 to 8 members
each, suffixes of 0 to 300 tokens, one-token ones included; smaller on the CPU), query/KV
heads (GQA and MQA included), a head dim (CPU: any of 1, 7, 16, 64; CUDA: 64 or 128), a dtype (CPU: float64 or
float32; CUDA: bfloat16 or float16), the softmax scale (default or drawn), the input
magnitude (1 or 4: sharp softmaxes), the deterministic switch, and on CUDA the backward's
test switches DK_PA_BWD_KEYS (64 / 128 keys per block), DK_PA_BWD_CHUNKS (split prefix
key tiles) and DK_PA_FWD_SM90 / DK_PA_BWD_SM90 (0 / 1: the mma.sync or Hopper's wgmma
kernels, whatever the default), which the launchers read at every call.

The contract (the same as tests/test_attention.py's):
* CPU: outputs and q/k/v gradients (one random upstream gradient) against the dense float64
  reference of tests/reference/prefix_attention_ref.py, within 1e-10 (float64) or 1e-6
  (float32) of 1 + the reference's largest magnitude;
* CUDA: FlashAttention's rule against the same reference in float32 on the GPU: error <=
  2x that of the reference computed in the low dtype (outputs), <= 3x (gradients);
* every result finite; in deterministic mode a second run gives the same bits.
"""
from __future__ import annotations

OPS = ("prefix_attention",)
_SWITCHES = ("DK_PA_BWD_KEYS", "DK_PA_BWD_CHUNKS", "DK_PA_FWD_SM90", "DK_PA_BWD_SM90")


def make_problem(rng, device: str) -> dict:
    """One problem from a numpy Generator: lengths, shapes and switches (inputs are drawn
    by the check from ``torch_seed``, so the problem stays small to save)."""
    cuda = device == "cuda"
    # The dense float64 reference holds every member's score matrix for autograd: the CPU's
    # problems are kept smaller (prefixes < 400, <= 6 members, suffixes < 150).
    long_prefix, members_max, suffix_max = (1500, 9, 300) if cuda else (400, 7, 150)
    groups = int(rng.integers(1, 4))
    prefix, suffixes = [], []
    for _ in range(groups):
        prefix.append(int(rng.choice([0, 1, int(rng.integers(2, 200)),
                                      int(rng.integers(200, long_prefix))],
                                     p=[0.1, 0.1, 0.6, 0.2])))
        members = int(rng.integers(1, members_max))
        suffixes.append([int(rng.choice([0, 1, int(rng.integers(2, suffix_max))],
                                        p=[0.1, 0.15, 0.75])) for _ in range(members)])
    heads = [(2, 2), (4, 1), (8, 2), (4, 4), (6, 3), (32, 1)] if cuda else \
        [(1, 1), (2, 1), (4, 2), (3, 3), (6, 2)]
    hq, hkv = heads[int(rng.integers(len(heads)))]
    d = int(rng.choice([64, 128])) if cuda else int(rng.choice([1, 7, 16, 64]))
    dtype = (["bfloat16", "float16"] if cuda else ["float64", "float32"])[int(rng.integers(2))]
    switches = {}
    if cuda:
        keys = rng.choice(["", "64", "128"])
        chunks = rng.choice(["", "", "", "1", "2", "3", "4"])
        fwd_sm90, bwd_sm90 = (rng.choice(["", "0", "1"]) for _ in range(2))
        switches = {k: str(v) for k, v in zip(_SWITCHES, (keys, chunks, fwd_sm90, bwd_sm90))
                    if v}
    return dict(op="prefix_attention", dtype=dtype, device=device, prefix=prefix,
                suffixes=suffixes, hq=hq, hkv=hkv, d=d,
                scale=None if rng.random() < 0.7 else float(rng.uniform(0.01, 1.0)),
                magnitude=float(rng.choice([1.0, 4.0])),
                deterministic=bool(rng.random() < 0.5), switches=switches,
                torch_seed=int(rng.integers(2 ** 31)))


def _inputs(prob, torch):
    g = torch.Generator().manual_seed(prob["torch_seed"])
    T = sum(prob["prefix"]) + sum(sum(s) for s in prob["suffixes"])
    mk = lambda h: torch.randn(T, h, prob["d"], generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = (mk(h) * prob["magnitude"] for h in (prob["hq"], prob["hkv"], prob["hkv"]))
    return q, k, v, mk(prob["hq"])


def _grads(out, xs, dout, torch):
    return torch.autograd.grad(out, xs, dout.to(out.dtype))


def check(dk, prob):
    """(failure messages, elements): the contract of the module docstring."""
    import torch

    from diffkern.checks.prefix_attention import kernel_switches

    # The problem's switches, the others unset (not inherited from the environment).
    with kernel_switches(**{k: prob["switches"].get(k) for k in _SWITCHES}):
        return _check(dk, prob, torch)


def _check(dk, prob, torch):
    from tests.reference.attention_dense import flash_attention_rule
    from tests.reference.prefix_attention_ref import reference_prefix_attention as ref_fn

    dev = torch.device(prob["device"])
    dt = getattr(torch, prob["dtype"])
    P, S, scale = prob["prefix"], prob["suffixes"], prob["scale"]
    layout = dk.PrefixLayout.from_lengths(P, S, device=dev)
    q64, k64, v64, dout64 = _inputs(prob, torch)
    xs = [x.to(dev, dt).requires_grad_() for x in (q64, k64, v64)]
    fails = []
    out = dk.prefix_attention(*xs, layout, scale=scale, deterministic=prob["deterministic"])
    g = _grads(out, xs, dout64.to(dev), torch)
    got = [out, *g]
    names = ("out", "dq", "dk", "dv")
    for name, x in zip(names, got):
        if not bool(torch.isfinite(x).all()):
            fails.append(f"{name}: non-finite values")
    if prob["deterministic"]:
        out2 = dk.prefix_attention(*xs, layout, scale=scale, deterministic=True)
        again = [out2, *_grads(out2, xs, dout64.to(dev), torch)]
        for name, a, b in zip(names, got, again):
            if not torch.equal(a, b):
                fails.append(f"{name}: deterministic mode gave other bits on a second run")

    def reference(dtype, device):
        ys = [x.detach().to(device, dtype).requires_grad_() for x in xs]
        r = ref_fn(*ys, P, S, scale=scale)
        return [r, *_grads(r, ys, dout64.to(device), torch)]

    if dev.type == "cpu":
        want = reference(torch.float64, dev)
        tol = 1e-10 if dt == torch.float64 else 1e-6
        for name, a, b in zip(names, got, want):
            err = (a.double() - b).abs().max().item() if a.numel() else 0.0
            lim = tol * (1 + (b.abs().max().item() if b.numel() else 0.0))
            if not err <= lim:
                fails.append(f"{name}: error {err:.3e} > {lim:.3e} against the float64 reference")
    else:
        fails += flash_attention_rule(got, reference(torch.float32, dev), reference(dt, dev),
                                      names)
    return fails, int(out.shape[0] * out.shape[1])
