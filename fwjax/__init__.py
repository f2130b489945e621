"""fwjax: fast weight programmers (linear transformers with the delta rule) in JAX.

Layers build one way: ``fwjax.ops`` (pure functions) <- ``fwjax.nn`` <- ``fwjax.train``.
"""

__version__ = "0.1.0"
