#!/usr/bin/env bash
# The "one wheel for any torch >= 2.4" claim, tested: install ONE prebuilt diffkern wheel
# into a fresh virtual environment per torch version and run the op tests of every family
# there (log-Bessel, vMF, OT: custom ops, opcheck, torch.compile, autograd, DLPack).
#
# usage: scripts/ci/torch_matrix.sh WHEEL TORCH_VERSION...
#   PYTHON  base interpreter for the venvs (default: python3; must match the wheel's tag)
#   WORK    where the venvs go (default: build/ci); each is removed after its run (5.5-5.8 GB)
#
# The machine's pip constraint file caps torch at the release on its disk; the versions
# here are pinned exactly and come from PyPI, so the cap is lifted (PIP_CONSTRAINT=/dev/null
# overrides the config file's setting) -- it exists to steer unpinned installs, and the
# newest torch is above it. PyPI's torch wheels are CUDA builds: their nvidia-* packages
# are needed even on a CPU machine (`import torch` preloads cuBLAS/cuDNN; --no-deps fails).
set -euo pipefail

[ $# -ge 2 ] || { echo "usage: $0 WHEEL TORCH_VERSION..." >&2; exit 2; }
WHEEL=$(realpath "$1"); shift
PYTHON=${PYTHON:-python3}
WORK=$(realpath -m "${WORK:-build/ci}")
# The op tests of each family; the accuracy/reference files test the math, not the torch
# interface, and run in the README's full suite.
TESTS=(tests/test_log_bessel.py tests/test_distributions.py tests/test_ot.py)
# Monte-Carlo statistics of the vMF sampler (~40 s of the ~80 s): they test the math, which
# does not change with torch; the interface they use (rsample, autograd) is covered by the
# rest. The README's full suite runs them.
DESELECT="not sample_moments and not entropy_vs_monte_carlo and not unbiased_with_correction and not vs_finite_difference_and_score_function"

cd "$(dirname "$0")/../.."
mkdir -p "$WORK"
rc=0
for V in "$@"; do
  VENV="$WORK/venv-torch-$V"
  echo
  echo "--- torch $V: fresh venv ($("$PYTHON" --version)), the wheel $(basename "$WHEEL")"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  t0=$(date +%s)
  # One resolve: the wheel (its torch>=2.4 requirement included), its test extra, torch pinned.
  # (grep: this machine's pip config names local indexes that lack most packages; pip warns
  # once per package, which says nothing about the install.)
  # --no-compile: byte-compiling torch's ~10k .py files is a large share of the install time.
  PIP_CONSTRAINT=/dev/null "$VENV/bin/pip" install -q --no-compile "$WHEEL[test]" "torch==$V" 2>&1 |
    { grep -v 'is ignored: it is neither a file nor a directory' || true; }
  echo "torch $V: download + install took $(( $(date +%s) - t0 ))s"
  # From the repo root (tests import tests.reference); there is no diffkern/ here, so
  # the import must find the installed wheel: say where it came from.
  set +e
  "$VENV/bin/python" - <<'PY'
import torch, diffkern
print(f"torch {torch.__version__}, diffkern {diffkern.__version__} from {diffkern.__file__}")
assert "site-packages" in diffkern.__file__, "diffkern was not imported from the installed wheel"
PY
  r=$?
  t0=$(date +%s)
  [ "$r" -eq 0 ] && { "$VENV/bin/python" -m pytest -q -p no:cacheprovider -k "$DESELECT" "${TESTS[@]}"; r=$?; }
  set -e
  echo "torch $V: tests exit code $r, took $(( $(date +%s) - t0 ))s"
  [ "$r" -ne 0 ] && rc=1
  rm -rf "$VENV"
done
exit "$rc"
