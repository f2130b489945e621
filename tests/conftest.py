"""Test configuration. Fakes 8 CPU devices before JAX initialises (for sharding tests)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
