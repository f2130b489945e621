"""Test configuration. Fakes 8 CPU devices before JAX initialises (for sharding tests), and
shares compiled programs between tests, workers and the subprocesses they start through JAX's
persistent compilation cache (many tests compile the same small training steps), and compiles
without LLVM's optimisations (compilation, not execution, dominates these small programs)."""

import os
import tempfile

# `--xla_backend_optimization_level=0` skips LLVM's optimisation of the compiled CPU code: the
# tests' programs are small, so compiling dominates: a cold run of the default suite on 2 cores
# took 754 s instead of 907 s (the parity file 103 s instead of 152 s), with the same results.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fwjax-tests-jax-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
