"""Float64 NumPy oracles: the equations written as plain loops, independent of fwjax."""

import numpy as np


def delta_rule_np(q, k, v, beta, s0, scale):
    q, k, v, beta, s0 = (np.asarray(x, np.float64) for x in (q, k, v, beta, s0))
    b_, t_, h_, _ = q.shape
    out = np.zeros((b_, t_, h_, v.shape[-1]))
    s = s0.copy()
    for b in range(b_):
        for h in range(h_):
            w = s[b, h]
            for t in range(t_):
                v_bar = w.T @ k[b, t, h]
                w = w + beta[b, t, h] * np.outer(k[b, t, h], v[b, t, h] - v_bar)
                out[b, t, h] = scale * (w.T @ q[b, t, h])
            s[b, h] = w
    return out, s


def gated_delta_rule_np(q, k, v, beta, alpha, s0, scale):
    """S_t = α_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ, o_t = scale · S_tᵀ q_t."""
    q, k, v, beta, alpha, s0 = (np.asarray(x, np.float64) for x in (q, k, v, beta, alpha, s0))
    b_, t_, h_, d = q.shape
    out = np.zeros((b_, t_, h_, v.shape[-1]))
    s = s0.copy()
    for b in range(b_):
        for h in range(h_):
            w = s[b, h]
            for t in range(t_):
                kt = k[b, t, h]
                erase = np.eye(d) - beta[b, t, h] * np.outer(kt, kt)
                w = alpha[b, t, h] * (erase @ w) + beta[b, t, h] * np.outer(kt, v[b, t, h])
                out[b, t, h] = scale * (w.T @ q[b, t, h])
            s[b, h] = w
    return out, s


def sum_rule_np(q, k, v, s0, scale):
    q, k, v, s0 = (np.asarray(x, np.float64) for x in (q, k, v, s0))
    b_, t_, h_, _ = q.shape
    out = np.zeros((b_, t_, h_, v.shape[-1]))
    s = s0.copy()
    for t in range(t_):
        s = s + np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        out[:, t] = scale * np.einsum("bhk,bhkv->bhv", q[:, t], s)
    return out, s


def attention_normalized_np(fq, fk, v, beta, s0, z0, scale, eps, delta):
    """The paper's attention-normalised sum / delta rule, literally (already feature-mapped)."""
    fq, fk, v, s0, z0 = (np.asarray(x, np.float64) for x in (fq, fk, v, s0, z0))
    b_, t_, h_, _ = fq.shape
    out = np.zeros((b_, t_, h_, v.shape[-1]))
    s, z = s0.copy(), z0.copy()
    for b in range(b_):
        for h in range(h_):
            w, zz = s[b, h], z[b, h]
            for t in range(t_):
                kt, qt = fk[b, t, h], fq[b, t, h]
                if delta:
                    d = zz @ kt
                    v_bar = w.T @ kt / (d if d != 0 else 1.0)
                    w = w + beta[b, t, h] * np.outer(kt, v[b, t, h] - v_bar)
                else:
                    w = w + np.outer(kt, v[b, t, h])
                zz = zz + kt
                out[b, t, h] = scale * (w.T @ qt) / (zz @ qt + eps)
            s[b, h], z[b, h] = w, zz
    return out, s, z


def softmax_attention_np(q, k, v, causal, scale):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    t, s = q.shape[1], k.shape[1]
    logits = scale * np.einsum("bthd,bshd->bhts", q, k)
    if causal:
        mask = np.arange(s)[None, :] <= np.arange(t)[:, None] + (s - t)
        logits = np.where(mask, logits, -np.inf)
    logits = logits - logits.max(-1, keepdims=True)
    w = np.exp(logits)
    w = w / w.sum(-1, keepdims=True)
    return np.einsum("bhts,bshv->bthv", w, v)
