"""Shared pieces of the CPU benchmark: configurations, inputs, FLOP model, memory probes.

Imports NumPy only, so both the JAX and the PyTorch workers can use it (each framework runs in
its own subprocess: JAX and torch in one process slow each other down and can deadlock).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

D = 64  # head dimension: K = V = D


@dataclasses.dataclass(frozen=True)
class Config:
    impl: str  # fwjax_recurrent | fwjax_chunked | fwjax_naive | torch_recurrent | torch_chunked
    b: int
    h: int
    t: int
    mode: str  # fwd | fwdbwd
    chunk: int = 0  # chunked forms only
    repeats: int = 3

    @property
    def key(self) -> str:
        return f"{self.impl}|B{self.b}H{self.h}T{self.t}|{self.mode}|C{self.chunk}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str) -> Config:
        return Config(**json.loads(text))


def make_inputs(b: int, t: int, h: int, seed: int = 0):
    """Deterministic float32 inputs ``q, k, v, beta, do`` (``[B, T, H, D]``, beta ``[B, T, H]``).

    q and k are L2-normalised (DeltaNet's choice, which keeps the recurrence stable at any T),
    β = σ(N(0, 1)), v and the output cotangent do are standard normal.
    """
    rng = np.random.default_rng(seed)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    q = unit(rng.standard_normal((b, t, h, D), np.float32))
    k = unit(rng.standard_normal((b, t, h, D), np.float32))
    v = rng.standard_normal((b, t, h, D), np.float32)
    beta = (1 / (1 + np.exp(-rng.standard_normal((b, t, h), np.float32)))).astype(np.float32)
    do = rng.standard_normal((b, t, h, D), np.float32)
    return q, k, v, beta, do


def model_flops(cfg: Config) -> float:
    """Model FLOPs: 6·K·V per head-token for the forward recurrence (two reads and one rank-1
    write of the K×V state), and 3× that for forward + backward."""
    fwd = 6.0 * D * D * cfg.b * cfg.h * cfg.t
    return fwd if cfg.mode == "fwd" else 3 * fwd


def algorithm_flops(cfg: Config) -> float:
    """FLOPs the chunked form actually executes (forward ``6KV + C(6K + 4V) + C²/3`` per
    head-token, counted from the WY form's matmuls; ×3 with the backward); equal to model FLOPs
    otherwise."""
    if not cfg.chunk:
        return model_flops(cfg)
    c = cfg.chunk
    per_token = 6 * D * D + c * (6 * D + 4 * D) + c * c / 3
    fwd = per_token * cfg.b * cfg.h * cfg.t
    return fwd if cfg.mode == "fwd" else 3 * fwd


def naive_state_bytes(cfg: Config) -> int:
    """Bytes that autodiff through a per-token scan keeps: every K×V state, float32."""
    return 4 * D * D * cfg.b * cfg.h * cfg.t


def io_bytes(cfg: Config) -> int:
    """Bytes of inputs + outputs (+ gradients for fwd+bwd), float32."""
    seq = cfg.b * cfg.t * cfg.h
    inputs = 4 * (3 * seq * D + seq)  # q, k, v, beta
    outputs = 4 * seq * D  # o (the final state is negligible)
    grads = inputs + 4 * seq * D if cfg.mode == "fwdbwd" else 0  # dq, dk, dv, dbeta + do
    return inputs + outputs + grads


def reset_peak_rss() -> int:
    """Resets the process' peak RSS (Linux clear_refs) and returns the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kb("VmHWM") * 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def max_rel_error(results: dict, reference: dict) -> float:
    """max over tensors of ``max|x − ref| / max|ref|``, on batch 0, head 0."""
    worst = 0.0
    for name, ref in reference.items():
        x = np.asarray(results[name], np.float64)
        worst = max(worst, float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30)))
    return worst


def reference_cache_path(cfg: Config) -> str:
    root = os.environ.get("FWJAX_BENCH_CACHE", "/tmp/fwjax_bench_cache")
    os.makedirs(root, exist_ok=True)
    return os.path.join(root, f"ref_B{cfg.b}T{cfg.t}H{cfg.h}.npz")
