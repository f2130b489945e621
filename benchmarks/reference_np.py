"""Float64 NumPy reference of the delta rule for ONE head: forward and hand-derived backward.

Used by the benchmark to measure every implementation's error at long T (batch 0, head 0).
Independent of JAX and torch; checked against JAX autodiff of the REFERENCE form in
tests/test_benchmarks.py.
"""

from __future__ import annotations

import numpy as np

from benchmarks import common


def delta_rule_head(q, k, v, beta, do):
    """``q, k: [T, K]``, ``v, do: [T, V]``, ``beta: [T]`` -> dict of o, dq, dk, dv, dbeta."""
    q, k, v, beta, do = (np.asarray(x, np.float64) for x in (q, k, v, beta, do))
    t_len, kdim = k.shape
    vdim = v.shape[1]
    s = np.zeros((kdim, vdim))
    o = np.zeros((t_len, vdim))
    u = np.zeros((t_len, vdim))
    for t in range(t_len):
        u[t] = beta[t] * (v[t] - s.T @ k[t])
        s += np.outer(k[t], u[t])
        o[t] = s.T @ q[t]
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    dbeta = np.zeros_like(beta)
    g = np.zeros((kdim, vdim))
    for t in reversed(range(t_len)):
        g += np.outer(q[t], do[t])
        dq[t] = s @ do[t]
        s -= np.outer(k[t], u[t])  # S_{t-1}
        du = g.T @ k[t]
        v_bar = s.T @ k[t]
        dbeta[t] = du @ (v[t] - v_bar)
        dv[t] = beta[t] * du
        dk[t] = g @ u[t] - s @ dv[t]
        g -= np.outer(k[t], dv[t])
    return {"o": o, "dq": dq, "dk": dk, "dv": dv, "dbeta": dbeta}


def reference_for(cfg: common.Config):
    """The float64 reference on batch 0, head 0 of the benchmark inputs (cached on disk)."""
    path = common.reference_cache_path(cfg)
    try:
        with np.load(path) as f:
            return dict(f)
    except (FileNotFoundError, OSError, ValueError):
        pass
    q, k, v, beta, do = common.make_inputs(cfg.b, cfg.t, cfg.h)
    ref = delta_rule_head(q[0, :, 0], k[0, :, 0], v[0, :, 0], beta[0, :, 0], do[0, :, 0])
    np.savez(path, **ref)
    return ref
