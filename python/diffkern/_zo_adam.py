"""ZOAdam (public as ``diffkern.zo.ZOAdam``): Adam moments on the directional ZO estimate."""
from __future__ import annotations

import torch

from ._zo_optim import _ZOOptimizer, _buffer_dtype, _estimate_tensor, _number


def _betas(fname, betas):
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise TypeError(f"{fname}: betas must be a pair (beta1, beta2), got {betas!r}") from None
    return (_number(fname, "betas[0]", b1, 0.0, 1.0, high_open=True),
            _number(fname, "betas[1]", b2, 0.0, 1.0, high_open=True))


class ZOAdam(_ZOOptimizer):
    """Adam on the SPSA / RGE estimate: forward passes only, no gradient tensors.

    The estimate is the one ``ZOSGD`` takes (same evaluations, same seeds mix(seed, step,
    group), same exact restore; see ``ZOSGD`` and ``diffkern.zo.grad``):
    g = sum_k c_k z_k, c_k = (L(theta+eps z_k) - L(theta-eps z_k)) / (2 eps n). Then, per
    parameter, as ``torch.optim.Adam`` (t = that parameter's step count):
    m <- b1 m + (1-b1) g, v <- b2 v + (1-b2) g^2,
    theta <- theta - lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + adam_eps).
    ``weight_decay``: added to g (L2, as Adam), or with ``decoupled_weight_decay=True``
    theta <- theta (1 - lr wd) first (AdamW).

    ``eps`` is the perturbation size of the estimate (as in ``ZOSGD``); Adam's
    denominator constant is ``adam_eps``. Param groups, ``state_dict`` /
    ``load_state_dict`` and LR schedulers (also ``OneCycleLR``, which cycles ``betas[0]``)
    work as for ``torch.optim.Adam``.

    Memory: unlike ZOSGD without momentum, Adam keeps two moment buffers per parameter
    (m and v, float32; float64 for float64 parameters), i.e. 8 bytes per element: 4x the
    weights of an fp16/bf16 model. During ``step`` one tensor's estimate g is materialized
    at a time (a float32 buffer the size of the largest parameter). The evaluations
    themselves cost what they cost for ``ZOSGD`` (module: inference + one module's
    parameters; list of tensors: one backup copy). A run is not replayable from scalars
    (the moments depend on every element of every past g): use ``state_dict``.

    ``step(closure)``: ``closure()`` returns the loss (runs under ``torch.no_grad()``);
    returns the mean of the 2n losses (0-d float64).
    """

    _NAME = "diffkern.zo.ZOAdam"

    def __init__(self, params, lr=1e-3, *, betas=(0.9, 0.999), adam_eps=1e-8,
                 weight_decay=0.0, decoupled_weight_decay=False, eps=1e-3,
                 num_directions=1, distribution="gaussian", seed=0, group="auto",
                 hook_unit_bytes=None):
        fname = self._NAME
        defaults = dict(lr=_number(fname, "lr", lr), betas=_betas(fname, betas),
                        adam_eps=_number(fname, "adam_eps", adam_eps),
                        weight_decay=_number(fname, "weight_decay", weight_decay),
                        decoupled_weight_decay=bool(decoupled_weight_decay))
        super().__init__(params, defaults, eps=eps, num_directions=num_directions,
                         distribution=distribution, seed=seed, group=group,
                         hook_unit_bytes=hook_unit_bytes)

    def _apply(self, g, group, ps, seed, coeffs, kdist):
        fname = f"{self._NAME}.step"
        # Checked at every step: a scheduler or the user may have written the group.
        lr = _number(fname, f"param_groups[{g}]['lr']", group["lr"])
        b1, b2 = _betas(f"{fname}: param_groups[{g}]", group["betas"])
        wd, aeps = float(group["weight_decay"]), float(group["adam_eps"])
        decoupled = bool(group["decoupled_weight_decay"])
        for t, p in enumerate(ps):
            st = self.state[p]
            if not st:
                st["step"] = 0
                st["exp_avg"] = torch.zeros(p.shape, dtype=_buffer_dtype(p), device=p.device)
                st["exp_avg_sq"] = torch.zeros_like(st["exp_avg"])
            grad = _estimate_tensor(p, t, seed, coeffs, kdist)
            # fp16/bf16 weights: the step runs on a float32 copy, rounded once at the end.
            w = p.detach() if p.dtype == grad.dtype else p.detach().to(grad.dtype)
            if wd and not decoupled:
                grad.add_(w, alpha=wd)
            if wd and decoupled:
                w = w.mul(1.0 - lr * wd)
            st["step"] += 1
            m, v = st["exp_avg"], st["exp_avg_sq"]
            m.lerp_(grad, 1.0 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
            bias1, bias2 = 1.0 - b1 ** st["step"], 1.0 - b2 ** st["step"]
            denom = (v.sqrt() / bias2 ** 0.5).add_(aeps)
            new = torch.addcdiv(w, m, denom, value=-lr / bias1)
            p.detach().copy_(new)
