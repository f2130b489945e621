"""Shared fixtures of the parity suite: the ops under test, their oracles, and input cases."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fwjax.ops import Impl, delta_rule, gated_delta_rule, sum_rule
from fwjax.ops.pallas import PallasOptions, PallasSchedule
from tests.oracle import delta_rule_np, gated_delta_rule_np, sum_rule_np

# Every implementation the shared suite covers. On CPU, PALLAS runs its kernels (the GPU
# family by default) in interpret mode; under a GPU/TPU backend the same suite runs compiled.
IMPLS = (Impl.REFERENCE, Impl.RECURRENT, Impl.CHUNKED, Impl.PALLAS)


def state_tolerance(impl, input_dtype, state_dtype):
    """Tolerance dtype of float32 results (final state, dS0) for ``input_dtype`` inputs.

    PALLAS's default ``PallasPrecision.INPUT`` rounds matmul operands, the state tile
    included, to the inputs' dtype (the tensor-core policy of flash-linear-attention), so its
    state is as accurate as its inputs; every other Impl computes in the state dtype.
    ``PallasPrecision.STATE`` is held to the state dtype in tests/ops/test_pallas.py.
    """
    return input_dtype if impl is Impl.PALLAS else state_dtype


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    has_beta: bool
    has_alpha: bool = False
    beta_offset: float = 0.0  # 1.0: β ∈ (1, 2), transitions with a negative eigenvalue
    state_segments: int | None = None  # the split state scan (CHUNKED, PALLAS phased)
    pallas: PallasOptions | None = None  # PALLAS's options when the caller passes none

    @property
    def impls(self):
        """The Impls this rule has (all of them)."""
        return IMPLS

    def __call__(self, inputs, impl, chunk_size=None, pallas=None, **overrides):
        """Runs the rule; ``pallas``: :class:`fwjax.ops.pallas.PallasOptions` of PALLAS;
        ``inputs["segment_ids"]`` (optional): packed rows."""
        kw = {**inputs, **overrides}
        pallas = pallas or self.pallas
        if self.beta_offset:
            kw["beta"] = kw["beta"] + self.beta_offset
        if self.has_alpha:
            return gated_delta_rule(
                kw["q"],
                kw["k"],
                kw["v"],
                kw["beta"],
                kw["alpha"],
                kw["s0"],
                kw["scale"],
                impl=impl,
                chunk_size=chunk_size,
                pallas=pallas,
                segment_ids=kw.get("segment_ids"),
                state_segments=self.state_segments,
            )
        if self.has_beta:
            return delta_rule(
                kw["q"],
                kw["k"],
                kw["v"],
                kw["beta"],
                kw["s0"],
                kw["scale"],
                impl=impl,
                chunk_size=chunk_size,
                pallas=pallas,
                segment_ids=kw.get("segment_ids"),
                state_segments=self.state_segments,
            )
        return sum_rule(
            kw["q"],
            kw["k"],
            kw["v"],
            kw["s0"],
            kw["scale"],
            impl=impl,
            chunk_size=chunk_size,
            pallas=pallas,
            segment_ids=kw.get("segment_ids"),
        )

    def oracle(self, inputs):
        f64 = {
            n: np.asarray(x).astype(np.float64) if hasattr(x, "dtype") else x
            for n, x in inputs.items()
        }
        f64["beta"] = f64["beta"] + self.beta_offset
        if self.has_alpha:
            args = (f64[n] for n in ("q", "k", "v", "beta", "alpha", "s0"))
            return gated_delta_rule_np(*args, f64["scale"])
        if self.has_beta:
            return delta_rule_np(f64["q"], f64["k"], f64["v"], f64["beta"], f64["s0"], f64["scale"])
        return sum_rule_np(f64["q"], f64["k"], f64["v"], f64["s0"], f64["scale"])

    @property
    def diff_args(self):
        """Inputs the VJP is taken with respect to."""
        if self.has_alpha:
            return ("q", "k", "v", "beta", "alpha", "s0")
        return ("q", "k", "v", "beta", "s0") if self.has_beta else ("q", "k", "v", "s0")


DELTA = Rule("delta", has_beta=True)
SUM = Rule("sum", has_beta=False)
GATED = Rule("gated", has_beta=True, has_alpha=True)
RULES = (DELTA, SUM)  # the rules every property test covers
PARITY_RULES = (*RULES, GATED)  # the parity suite also covers the gated delta rule
# β ∈ (1, 2) (``FastWeightConfig.beta_range = 2``): I − β k kᵀ reflects. The chunked inverse
# and the custom VJPs must stay exact; the forward and VJP suites run these too.
DELTA_NEG = Rule("delta_neg", has_beta=True, beta_offset=1.0)
GATED_NEG = Rule("gated_neg", has_beta=True, has_alpha=True, beta_offset=1.0)
# The CHUNKED (gated) delta rule's forward and backward chunk scans as 2 parallel segments
# (fwjax.ops.state_split); 3 chunks are padded to 4, 4 chunks split evenly.
DELTA_SPLIT = Rule("delta_split", has_beta=True, state_segments=2)
GATED_SPLIT = Rule("gated_split", has_beta=True, has_alpha=True, state_segments=2)
SPLIT_RULES = (DELTA_SPLIT, GATED_SPLIT)
# PALLAS with the phased schedule (chain kernels + kernels parallel over chunks); the gated
# rule's chains split into 2 segments (T 37: 3 chunks padded to 4; T 1: one chunk, no split).
# The unsplit gated and the split delta chains run in tests/ops/test_pallas.py.
_PHASED = PallasOptions(schedule=PallasSchedule.PHASED)
DELTA_PHASED = Rule("delta_phased", has_beta=True, pallas=_PHASED)
GATED_PHASED = Rule("gated_phased", has_beta=True, has_alpha=True, state_segments=2, pallas=_PHASED)
PHASED_RULES = (DELTA_PHASED, GATED_PHASED)


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    t: int
    h: int
    k: int
    v: int
    chunk: int

    def __str__(self):
        return f"B{self.b}T{self.t}H{self.h}K{self.k}V{self.v}C{self.chunk}"


CASES = (
    Case(b=1, t=1, h=1, k=4, v=3, chunk=4),  # a single step
    Case(b=2, t=37, h=3, k=8, v=5, chunk=16),  # T not divisible by the chunk; B, H > 1
    Case(b=2, t=32, h=2, k=6, v=7, chunk=8),  # T divisible by the chunk
    Case(b=1, t=20, h=2, k=5, v=4, chunk=64),  # chunk longer than T
)


def make_inputs(case: Case, dtype, seed=0):
    """Random inputs: L2-normalised keys and queries, β in (0, 1), a nonzero initial state."""
    rng = np.random.default_rng(seed)
    shape_k = (case.b, case.t, case.h, case.k)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    q = unit(rng.normal(size=shape_k))
    k = unit(rng.normal(size=shape_k))
    v = rng.normal(size=(case.b, case.t, case.h, case.v))
    beta = rng.uniform(0.05, 0.95, size=(case.b, case.t, case.h))
    alpha = rng.uniform(0.5, 1.0, size=(case.b, case.t, case.h))
    s0 = 0.5 * rng.normal(size=(case.b, case.h, case.k, case.v))
    cast = lambda x: jnp.asarray(x, jnp.float32).astype(dtype)
    state_dtype = jnp.promote_types(dtype, jnp.float32)
    return {
        "q": cast(q),
        "k": cast(k),
        "v": cast(v),
        "beta": cast(beta),
        "alpha": cast(alpha),
        "s0": jnp.asarray(s0, state_dtype),
        "scale": 0.7,
    }


def upcast(inputs, dtype=jnp.float64):
    """The floating-point inputs in ``dtype`` (integer segment ids stay integer)."""

    def cast(x):
        floating = isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)
        return x.astype(dtype) if floating else x

    return {n: cast(x) for n, x in inputs.items()}
