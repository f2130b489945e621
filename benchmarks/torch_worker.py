"""Benchmark worker for the PyTorch CPU baselines: runs ONE configuration, prints one JSON line.

    python -m benchmarks.torch_worker '<Config JSON>'

Baselines (autograd for the backward, float32, ``torch.set_num_threads(2)``):
  torch_recurrent: a per-token Python loop over time, like the paper's pure-PyTorch fast weight
    function (autograd keeps every state).
  torch_chunked: the chunkwise WY form (forward substitution for ``(I + A)⁻¹`` over the rows of
    each chunk, then a loop over chunks), the structure of flash-linear-attention's naive
    chunkwise reference.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time

import torch

from benchmarks import common


def recurrent(q, k, v, beta):
    """``[B, H, T, D]`` inputs -> ``o [B, H, T, D]``."""
    b, h, t_len, d = q.shape
    s = q.new_zeros(b, h, d, v.shape[-1])
    outs = []
    for t in range(t_len):
        k_t = k[:, :, t]
        v_bar = torch.einsum("bhk,bhkv->bhv", k_t, s)
        u = beta[:, :, t, None] * (v[:, :, t] - v_bar)
        s = s + k_t[..., :, None] * u[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], s))
    return torch.stack(outs, dim=2)


def chunked(q, k, v, beta, chunk):
    """``[B, H, T, D]`` inputs -> ``o [B, H, T, D]``; T is padded with zero keys and β = 0."""
    b, h, t_len, d = q.shape
    pad = (-t_len) % chunk
    if pad:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        beta = torch.nn.functional.pad(beta, (0, pad))
    n = q.shape[2] // chunk
    q, k, v = (x.reshape(b, h, n, chunk, d) for x in (q, k, v))
    beta = beta.reshape(b, h, n, chunk)
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    a = torch.tril(k_beta @ k.transpose(-1, -2), diagonal=-1)  # A = tril(diag(β) K Kᵀ, −1)
    eye = torch.eye(chunk, dtype=q.dtype)
    rows = [eye[0].expand(b, h, n, chunk)]
    for i in range(1, chunk):  # forward substitution: X_i = e_i − A[i, :i] X[:i]
        prev = torch.stack(rows, dim=-2)  # [b, h, n, i, chunk]
        rows.append(eye[i] - (a[..., i, None, :i] @ prev).squeeze(-2))
    t_mat = torch.stack(rows, dim=-2)  # (I + A)⁻¹
    w, u = t_mat @ k_beta, t_mat @ v_beta
    mask = torch.tril(torch.ones(chunk, chunk, dtype=torch.bool))
    s = q.new_zeros(b, h, d, v.shape[-1])
    outs = []
    for i in range(n):
        q_i, k_i = q[:, :, i], k[:, :, i]
        u_tilde = u[:, :, i] - w[:, :, i] @ s
        scores = (q_i @ k_i.transpose(-1, -2)).masked_fill(~mask, 0)
        outs.append(q_i @ s + scores @ u_tilde)
        s = s + k_i.transpose(-1, -2) @ u_tilde
    return torch.stack(outs, dim=2).reshape(b, h, n * chunk, d)[:, :, :t_len]


def run(cfg: common.Config) -> dict:
    torch.set_num_threads(2)
    q, k, v, beta, do = (torch.from_numpy(x) for x in common.make_inputs(cfg.b, cfg.t, cfg.h))
    # [B, T, H, D] -> [B, H, T, D]
    q, k, v, do = (x.permute(0, 2, 1, 3).contiguous() for x in (q, k, v, do))
    beta = beta.permute(0, 2, 1).contiguous()
    leaves = [x.requires_grad_(cfg.mode == "fwdbwd") for x in (q, k, v, beta)]
    if cfg.impl == "torch_recurrent":
        op = recurrent
    else:
        op = lambda q, k, v, beta: chunked(q, k, v, beta, cfg.chunk)

    def call():
        if cfg.mode == "fwd":
            with torch.no_grad():
                return (op(*leaves),)
        o = op(*leaves)
        grads = torch.autograd.grad(o, leaves, do)
        return (o.detach(), *grads)

    gc.collect()
    base = common.reset_peak_rss()
    start = time.perf_counter()
    out = call()
    first_s = time.perf_counter() - start
    peak = common.peak_rss() - base + 4 * sum(x.numel() for x in (q, k, v, beta, do))
    names = ("o",) if cfg.mode == "fwd" else ("o", "dq", "dk", "dv", "dbeta")
    head0 = {n: x[0, 0].detach().numpy() for n, x in zip(names, out, strict=True)}
    del out
    times = []
    for _ in range(cfg.repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)

    from benchmarks.reference_np import reference_for

    ref = reference_for(cfg)
    err = common.max_rel_error(head0, {n: ref[n] for n in names})
    return {"seconds": seconds, "compile_s": first_s, "peak_bytes": peak, "max_rel_err": err}


def main():
    result = run(common.Config.from_json(sys.argv[1]))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
