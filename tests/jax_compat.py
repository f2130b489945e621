"""JAX names that differ between the version floor (jax 0.7.1) and current jax."""

import jax

try:  # the context manager is `jax.enable_x64` in current jax ...
    enable_x64 = jax.enable_x64
except AttributeError:  # ... and `jax.experimental.enable_x64` at the floor
    from jax.experimental import enable_x64  # type: ignore[no-redef]

__all__ = ["enable_x64"]
