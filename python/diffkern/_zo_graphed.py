"""CUDA-graph replay of ``loss_fn`` for dk.zo.grad(cuda_graph=True) (private).

Why. An estimate with many points (RGE with 32 directions, CGE with thousands of
coordinates) calls the same forward again and again on a model that is small enough for
the host to be the bottleneck: a ResNet-18 at batch 32 spends most of its ~2 ms forward in
Python module calls and kernel launches, so the GPU idles. Batching the points
(``batch_size``, vmap) feeds the GPU but multiplies the activations and the parameter
copies by the batch. A CUDA graph removes the host cost at the memory of one forward.

How. The evaluator perturbs the parameters in place (one fused launch) and restores them
from a backup copy (``zo._Evaluator``'s list strategy, bit-exact): the forward's kernels
then read the same addresses at every point, so ``loss_fn`` is captured once, after one
eager call (the warm-up: cuDNN/cuBLAS choose their algorithms and allocate workspaces
outside the capture), and replayed for every other point. Each replay's loss is copied out
of the graph's static output before the next replay overwrites it.

Contract (what capture needs; the errors say so): ``loss_fn`` runs on CUDA tensors and
returns a one-element CUDA tensor; no host reads (``.item()``, printing, data-dependent
Python branches), no shapes that change between calls. Python side effects of ``loss_fn``
run at the warm-up and at the capture only: a loss_fn that draws a new batch per call
would be replayed on the captured batch. Random operations (dropout) draw new values at
every replay, as eager calls do.
"""
from __future__ import annotations

import torch
from torch import Tensor


def check_params(fname, flat):
    """The device of the parameters: one CUDA device for all of them."""
    if not torch.cuda.is_available():
        raise ValueError(f"{fname}: cuda_graph=True needs CUDA, and this torch has no CUDA "
                         f"device")
    devices = {p.device for p in flat}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        where = ", ".join(sorted(str(d) for d in devices))
        raise ValueError(f"{fname}: cuda_graph=True needs every parameter on one CUDA "
                         f"device; they are on {where}")
    return next(iter(devices))


class GraphedLoss:
    """``loss_fn`` as a callable: the first call eager, the second captured into a CUDA
    graph and replayed, every later call a replay. Returns the graph's static output (the
    caller copies it before the next call). ``close()`` frees the graph and its memory."""

    def __init__(self, fname, loss_fn, device, fn="loss_fn"):
        self.fname, self.loss_fn, self.device, self.fn = fname, loss_fn, device, fn
        self.graph, self.out, self.calls = None, None, 0

    def _checked(self, out, when):
        if not (isinstance(out, Tensor) and out.device == self.device and out.numel() == 1):
            what = (f"a tensor of shape {tuple(out.shape)} on {out.device}"
                    if isinstance(out, Tensor) else type(out).__name__)
            raise ValueError(f"{self.fname}: with cuda_graph=True, {self.fn} must return a "
                             f"one-element tensor on {self.device} (the loss the graph "
                             f"computes); {when} it returned {what}")
        return out

    def __call__(self):
        self.calls += 1
        if self.calls == 1:  # eager warm-up
            return self._checked(self.loss_fn(), "its first call")
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.out

    def _capture(self):
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(self.device), torch.cuda.graph(graph):
                out = self.loss_fn()
        except Exception as e:
            raise RuntimeError(
                f"{self.fname}: cuda_graph=True: {self.fn} could not be captured in a CUDA "
                f"graph ({type(e).__name__}: {e}). A captured {self.fn} may not read values "
                f"back to the host (.item(), print, Python branches on tensor values) or "
                f"change shapes between calls; use cuda_graph=False for this loss") from e
        self.out = self._checked(out, "during capture").detach()
        self.graph = graph

    def close(self):
        self.graph, self.out = None, None
