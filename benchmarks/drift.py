"""fp32 drift of the reverse state reconstruction, against the float64 reference gradient.

RECURRENT rebuilds ``S_{t-1} = S_t − k_t u_tᵀ`` backwards through the whole sequence; CHUNKED
keeps the state entering each chunk. REFERENCE (float32 autodiff through the scan, storing every
state) shows the error float32 arithmetic gives without any reconstruction. The split state
scan (``state_segments``) forms combine segment maps that are products of many chunk
transitions: ``chunked_split16`` (CHUNKED) and ``pallas_phased_split16`` (the phased PALLAS
kernels, interpret mode off GPU/TPU) beside ``pallas_phased`` (unsplit) show what that costs.

    python -m benchmarks.drift [--lengths 1024 8192 32768] [--forms reference recurrent ...]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.reference_np import delta_rule_head
from fwjax.ops import Impl, delta_rule
from fwjax.ops.pallas import PallasOptions, PallasSchedule

_PHASED = PallasOptions(schedule=PallasSchedule.PHASED)
# The forms compared: delta_rule's keyword arguments.
FORMS = {
    "reference": {"impl": Impl.REFERENCE},
    "recurrent": {"impl": Impl.RECURRENT},
    "chunked": {"impl": Impl.CHUNKED},
    "chunked_split16": {"impl": Impl.CHUNKED, "state_segments": 16},
    "pallas_phased": {"impl": Impl.PALLAS, "pallas": _PHASED},
    "pallas_phased_split16": {"impl": Impl.PALLAS, "pallas": _PHASED, "state_segments": 16},
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument(
        "--forms", nargs="+", choices=FORMS, default=["reference", "recurrent", "chunked"]
    )
    args = parser.parse_args(argv)
    names = ("o", "dq", "dk", "dv", "dbeta")
    width = max(len(f) for f in args.forms)
    print(f"| {'T':>6} | {'form':{width}} | " + " | ".join(f"{n:>8}" for n in names) + " |")
    print("|" + "---|" * (len(names) + 2))
    for t in args.lengths:
        q, k, v, beta, do = common.make_inputs(1, t, 1, seed=1)
        ref = delta_rule_head(q[0, :, 0], k[0, :, 0], v[0, :, 0], beta[0, :, 0], do[0, :, 0])
        for form in args.forms:

            @jax.jit
            def fwd_bwd(q, k, v, beta, do, kw=FORMS[form]):
                o, pullback = jax.vjp(lambda *a: delta_rule(*a, **kw)[0], q, k, v, beta)
                return (o, *pullback(do))

            out = fwd_bwd(*(jnp.asarray(x) for x in (q, k, v, beta, do)))
            errs = [
                float(
                    np.max(np.abs(np.asarray(x, np.float64)[0, :, 0] - ref[n]))
                    / np.max(np.abs(ref[n]))
                )
                for n, x in zip(names, out, strict=True)
            ]
            print(f"| {t:>6} | {form:{width}} | " + " | ".join(f"{e:8.1e}" for e in errs) + " |")


if __name__ == "__main__":
    main()
