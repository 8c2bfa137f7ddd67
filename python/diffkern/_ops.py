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
