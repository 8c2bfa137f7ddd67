"""Generate csrc/fd_grad/gaussian_table.h: the tables of the finite-difference family's
Gaussian directions, z = inverse normal CDF of a 32-bit random word, by table lookup.

Why a table and not Box-Muller: the fused perturb pass must run near the memory bandwidth,
and z must be the same bits on the CPU and the GPU. Box-Muller with a log, a sine and a
cosine written in single-rounded float operations (so both sides agree) costs ~2.3x the
memory time on an H200 (bench/NOTES-zo.md); one table lookup and a cubic per element costs
about as much as the generator itself.

The map. A word w gives the sign (bit 31) and t = 2^31 - (w & 0x7fffffff) in [1, 2^31],
and |z| = Qinv(x) with x = (t - 1/2) / 2^31 in (0, 1), Qinv(x) = sqrt(2) erfcinv(x) the
inverse of the two-sided tail P(|Z| > z): each of the 2^31 values of t has probability
2^-31, so |z| is the half-normal quantile at the cell's midpoint and z is N(0, 1) up to
the resolution 2^-31 of x (|z| <= Qinv(2^-32) = 6.33).
 - t < 64 (x < 3e-8, the far tail): kGaussianTail[t] = Qinv(x) itself.
 - t >= 64, with e = floor(log2 t) in [6, 31]: the level [2^e, 2^(e+1)) is split into 64
   cells by the 6 bits below t's leading one; the e - 6 bits under them give the position
   f in [0, 1) within the cell (its top 23 bits: one bit is dropped at e = 30), and Qinv = c0 + f (c1 + f (c2 + f c3)) with the cell's
   cubic (kGaussianCells, 4 floats per cell, level-major). Cells are uniform in x within a
   level and halve in width from level to level, so each spans a relative range of x of
   at most 1/64: Qinv is smooth over a cell even in the tail.
The cubic interpolates Qinv at the 4 Chebyshev nodes of the cell; coefficients are rounded
to float32, and the evaluation (float32, each operation rounded once, in the order above)
is checked here against float64 on a dense grid of every cell. Run:
    python scripts/gen_gaussian_table.py      (writes the header in place; needs scipy)
"""
from pathlib import Path

import numpy as np
from scipy.special import erfcinv

LEVELS = range(6, 32)
CELLS = 64
OUT = Path(__file__).resolve().parents[1] / "csrc" / "fd_grad" / "gaussian_table.h"


def qinv(t):
    """|z| for the (possibly fractional) t: sqrt(2) erfcinv((t - 1/2) / 2^31), float64."""
    return np.sqrt(2.0) * erfcinv((np.asarray(t, dtype=np.float64) - 0.5) / 2.0**31)


def fit_cell(e, c):
    """Cubic in f in [0, 1] through Qinv at the cell's Chebyshev nodes, float32 coeffs."""
    w = 2.0 ** (e - 6)
    t0 = 2.0**e + c * w
    if e == 31:  # only t = 2^31 exists at this level (f = 0 of cell 0)
        return np.array([qinv(2.0**31), 0.0, 0.0, 0.0], dtype=np.float32)
    nodes = 0.5 - 0.5 * np.cos((2 * np.arange(4) + 1) * np.pi / 8)
    # Interpolate the last representable position too: f reaches (w - 1) / w, not 1.
    vand = np.vander(nodes, 4, increasing=True)
    coeffs = np.linalg.solve(vand, qinv(t0 + nodes * w))
    return coeffs.astype(np.float32)


def horner_f32(k, f):
    """The kernel's evaluation order, every operation rounded to float32."""
    f = f.astype(np.float32)
    a = np.float32(k[3]) * f
    a = a.astype(np.float32) + np.float32(k[2])
    a = a.astype(np.float32) * f
    a = a.astype(np.float32) + np.float32(k[1])
    a = a.astype(np.float32) * f
    a = a.astype(np.float32) + np.float32(k[0])
    return a.astype(np.float32)


def main():
    cells = np.zeros((len(LEVELS), CELLS, 4), dtype=np.float32)
    worst_abs, worst_ulp = 0.0, 0.0
    for li, e in enumerate(LEVELS):
        for c in range(CELLS):
            k = fit_cell(e, c)
            cells[li, c] = k
            if e == 31:
                continue
            bits = e - 6
            n = min(2**bits, 4096)
            low = np.unique(np.linspace(0, 2**bits - 1, n).round().astype(np.int64))
            # The kernel keeps 23 bits of the position: f = floor(low 2^(23-bits)) 2^-23.
            f = (np.floor(low.astype(np.float64) * 2.0**(23 - bits)) * 2.0**-23).astype(np.float32)
            got = horner_f32(k, f).astype(np.float64)
            t = 2.0**e + c * 2.0**bits + low
            want = qinv(t)
            assert (got > 0).all(), (e, c)  # the kernel ORs the sign bit into |z|
            err = np.abs(got - want)
            worst_abs = max(worst_abs, float(err.max()))
            # Relative to float32's resolution where |z| >= 0.01 (closer to 0 the absolute
            # error is the meaningful one: z there is the cubic's small difference).
            big = want >= 0.01
            if big.any():
                ulp = np.spacing(want[big].astype(np.float32)).astype(np.float64)
                worst_ulp = max(worst_ulp, float((err[big] / ulp).max()))
    tail = np.zeros(64, dtype=np.float32)
    tail[1:] = qinv(np.arange(1, 64)).astype(np.float32)
    assert worst_abs < 1e-6, worst_abs
    print(f"max abs error {worst_abs:.3g}; {worst_ulp:.3g} float32 ulps of z where |z| >= 0.01")

    def fmt(values):
        lines = ["    " + ", ".join(f"{float(v):.8e}f" for v in values[i:i + 4])
                 for i in range(0, len(values), 4)]
        return ", \\\n".join(lines)

    cells_text, tail_text = fmt(cells.reshape(-1)), fmt(tail)

    text = f"""// Generated by scripts/gen_gaussian_table.py: do not edit. The map from a 32-bit word to
// a Gaussian value that uses these tables is described there and in directions.cuh.
// Checked at generation: the cubic cells, evaluated in float32 as the kernels do, are
// within {worst_abs:.2g} of float64 sqrt(2) erfcinv(x) (and {worst_ulp:.2g} float32 ulps of z
// where |z| >= 0.01).
#pragma once

// 26 levels (e = 6..31) x 64 cells x 4 coefficients (c0, c1, c2, c3), as an initializer list.
#define DK_FD_GAUSSIAN_CELLS \\
{cells_text}
// |z| for t = 0..63 (entry 0 unused: t >= 1).
#define DK_FD_GAUSSIAN_TAIL \\
{tail_text}
#define DK_FD_GAUSSIAN_LEVELS {len(LEVELS)}
#define DK_FD_GAUSSIAN_CELLS_PER_LEVEL {CELLS}
"""
    OUT.write_text(text)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
