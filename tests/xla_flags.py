"""XLA flags the tests compile with, in one place (read by `tests/conftest.py` before JAX
initialises, and passed to the subprocesses some tests start).

`FAST_COMPILE` skips LLVM's optimisation of the compiled CPU code. The tests' programs are small,
so compiling dominates: a cold run of the default suite on 2 cores took 754 s instead of 907 s
(the parity file 103 s instead of 152 s), with the same results."""

FAST_COMPILE = "--xla_backend_optimization_level=0"
