"""High-precision (mpmath) references for the special-function tests and benchmarks."""
