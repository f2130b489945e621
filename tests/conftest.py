"""Test configuration. Fakes 8 CPU devices before JAX initialises (for sharding tests), and
shares compiled programs between tests, workers and the subprocesses they start through JAX's
persistent compilation cache (many tests compile the same small training steps), and compiles
without LLVM's optimisations (`tests/xla_flags.py`)."""

import os
import tempfile

from tests.xla_flags import FAST_COMPILE

os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fwjax-tests-jax-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
