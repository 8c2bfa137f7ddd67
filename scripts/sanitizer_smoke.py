"""Small CUDA workload for compute-sanitizer (memcheck, racecheck): every family's
``sanitizer_workload("cuda")`` from ``diffkern/checks/<family>.py`` (found there, not
listed here). Sizes stay tiny: the sanitizer slows kernels down ~100x.

    compute-sanitizer --tool memcheck python scripts/sanitizer_smoke.py

DK_SANITIZE_FAMILIES="sinkhorn" (names or aliases such as "ot"; default: all) limits the
families exercised. A family without a workload fails the run: its kernels would go
unchecked.
"""
import os
import sys
import time

import torch

import diffkern as dk
from diffkern import checks


def main() -> int:
    if not torch.cuda.is_available() or not dk.build_info()["cuda"]:
        print("sanitizer_smoke: no CUDA device or no CUDA kernels in this build", file=sys.stderr)
        return 1
    try:
        names = checks.resolve(os.environ.get("DK_SANITIZE_FAMILIES"))
    except ValueError as e:
        print(f"sanitizer_smoke: DK_SANITIZE_FAMILIES: {e}", file=sys.stderr)
        return 2
    failed = 0
    for name in names:
        workload = getattr(checks.load(name), "sanitizer_workload", None)
        if workload is None:
            print(f"sanitizer_smoke: {name}: no sanitizer_workload() in diffkern/checks/{name}.py",
                  file=sys.stderr)
            failed += 1
            continue
        t = time.perf_counter()
        calls = workload("cuda")
        torch.cuda.synchronize()
        print(f"sanitizer_smoke: {name}: {calls} calls ok in {time.perf_counter() - t:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
