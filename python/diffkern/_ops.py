"""Helpers shared by every family's torch ops (kept tiny and torch-only)."""
from __future__ import annotations

import torch


def current_stream_handle(tensor: torch.Tensor) -> int:
    """The cudaStream_t (as an int) that an op on ``tensor`` must launch on.

    Read at every call, never cached: users switch streams with ``torch.cuda.stream(...)``
    and CUDA-graph capture runs on a side stream. 0 for CPU tensors (ignored there).
    """
    if tensor.device.type == "cuda":
        return torch.cuda.current_stream(tensor.device).cuda_stream
    return 0


def num_threads() -> int:
    """CPU threads for the core's OpenMP loops: follow torch.set_num_threads()."""
    return torch.get_num_threads()


def skips_dispatcher(*tensors) -> bool:
    """True when a call on these needs nothing from torch's dispatcher, so a family may call
    its core directly (same results, less per-call overhead): not compiling (checked first:
    under torch.compile nothing else may be traced), each argument exactly torch.Tensor (no
    fake or subclass tensor, no array-like), no autograd to record, no functorch wrapper."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if type(t) is not torch.Tensor or (grad and t.requires_grad) or _is_functorch_wrapped(t):
            return False
    return True


_is_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor",
                                lambda t: False)
