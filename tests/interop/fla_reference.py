"""Runs flash-linear-attention's ``fla.layers.DeltaNet`` on CPU and saves its weights, inputs
and outputs: ``python tests/interop/fla_reference.py OUT.npz``.

fla's layer calls Triton kernels (the short convolution, the fused recurrent delta rule, the
RMSNorms); without a GPU they run in Triton's interpreter (``TRITON_INTERPRET=1``, set here
before fla is imported), which executes the kernels' code with NumPy in float32. The
autotuner times its candidate configurations on a GPU driver, which the interpreter lacks, so
each kernel runs its first configuration (tiling only; the results do not depend on it).
Inputs of at most 64 steps take fla's inference path, ``fused_recurrent_delta_rule`` (its
``chunk`` kernel accepts no float32); which path ran is counted and saved.

The saved file holds, per case: ``CASE/x`` ``[B, T, d]``, ``CASE/y`` (fla's output),
``CASE/sd/NAME`` (the layer's ``state_dict``), ``CASE/options`` (JSON of fla's
hyperparameters), and ``meta`` (JSON: fla, torch and triton versions, kernel calls).
"""

from __future__ import annotations

import collections
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

# name -> (DeltaNet keyword arguments, batch, steps)
CASES = {
    "default": (dict(hidden_size=64, num_heads=4, conv_size=4), 2, 48),
    "gated": (dict(hidden_size=32, num_heads=2, conv_size=3, use_gate=True, norm_eps=1e-4), 2, 33),
}


def _first_config_only() -> None:
    import triton.runtime.autotuner as autotuner

    prune = autotuner.Autotuner.prune_configs
    autotuner.Autotuner.prune_configs = lambda self, kwargs: prune(self, kwargs)[:1]


def _count_calls(module, names, counts) -> None:
    for name in names:
        fn = getattr(module, name)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            counts[_name] += 1
            return _fn(*args, **kwargs)

        setattr(module, name, counted)


def main(out: str) -> None:
    import numpy as np
    import torch

    _first_config_only()
    import fla
    import fla.layers.delta_net as delta_net
    import triton

    counts = collections.Counter()
    _count_calls(delta_net, ["fused_recurrent_delta_rule", "chunk_delta_rule"], counts)
    arrays = {}
    for seed, (case, (kwargs, batch, steps)) in enumerate(CASES.items()):
        torch.manual_seed(seed)
        layer = delta_net.DeltaNet(mode="chunk", **kwargs).float().eval()
        with torch.no_grad():  # random values for every weight, norm scales included
            for name, p in layer.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.3 * torch.randn_like(p))
                elif name.startswith("b_proj"):
                    p.copy_(torch.randn_like(p) * 2.0 / p.shape[1] ** 0.5)
                else:
                    p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
            x = torch.randn(batch, steps, kwargs["hidden_size"])
            y = layer(x)[0]
        arrays[f"{case}/x"], arrays[f"{case}/y"] = x.numpy(), y.numpy()
        for name, value in layer.state_dict().items():
            arrays[f"{case}/sd/{name}"] = value.numpy()
        options = dict(
            qk_activation=layer.qk_activation,
            qk_norm=layer.qk_norm,
            allow_neg_eigval=layer.allow_neg_eigval,
            norm_eps=float(layer.o_norm.eps),
        )
        arrays[f"{case}/options"] = np.array(json.dumps(options))
    meta = dict(
        fla=fla.__version__,
        torch=torch.__version__,
        triton=triton.__version__,
        interpreter=os.environ["TRITON_INTERPRET"],
        calls=dict(counts),
    )
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(out, **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
