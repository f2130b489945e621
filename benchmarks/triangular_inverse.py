import time, jax, jax.numpy as jnp, numpy as np
from fwjax.ops import linalg
def fs_loop(a):
    n = a.shape[-1]; eye = jnp.eye(n, dtype=a.dtype)
    def body(i, x):
        row = eye[i] - jnp.einsum("...j,...jk->...k", a[..., i, :], x)
        return jax.lax.dynamic_update_index_in_dim(x, row, i, axis=-2)
    return jax.lax.fori_loop(1, n, body, jnp.broadcast_to(eye, a.shape))
variants = {
 'unrolled16': lambda a: linalg.unit_lower_triangular_inverse(a),
 'double_from1': lambda a: linalg.unit_lower_triangular_inverse(a, block_size=1),
 'double_from4': lambda a: linalg.unit_lower_triangular_inverse(a, block_size=4),
 'double_from8': lambda a: linalg.unit_lower_triangular_inverse(a, block_size=8),
}
orig = linalg._forward_substitution
for C in [16, 32, 64]:
  a = jnp.tril(jax.random.normal(jax.random.key(0), (256, C, C))*0.2, -1)
  for name, f in list(variants.items()) + [('loop16', 'loop')]:
    if f == 'loop':
        linalg._forward_substitution = fs_loop; f = lambda a: linalg.unit_lower_triangular_inverse(a)
    else:
        linalg._forward_substitution = orig
    g = jax.jit(jax.grad(lambda a: jnp.sum(jnp.sin(f(a)))))
    t0=time.perf_counter(); g(a).block_until_ready(); tc=time.perf_counter()-t0
    t0=time.perf_counter()
    for _ in range(20): g(a).block_until_ready()
    tr=(time.perf_counter()-t0)/20
    x = jax.jit(f)(a); err = float(jnp.abs(x @ (jnp.eye(C)+a) - jnp.eye(C)).max())
    print(f"C={C} {name:14s} compile+1 {tc:6.2f}s  run {tr*1e3:7.2f}ms err {err:.1e}")
  linalg._forward_substitution = orig
