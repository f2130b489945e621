"""The single-layer, single-head model of the paper's synthetic associative retrieval tasks."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from fwjax.nn.attention import FavorProjection
from fwjax.nn.config import _DEFAULT_FAST_WEIGHT, AttentionKind, FastWeightConfig
from fwjax.ops import UpdateRule, fast_weight_attention, fast_weight_read, feature_maps
from fwjax.validation import check_positive_ints


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    """Attributes:
    num_keys: N distinct key tokens.
    num_values: distinct value tokens (N in the paper); values are one-hot and frozen.
    d_key: dimension of the key/query projections (64 in the paper).
    d_embed: width of the key embedding; ``None`` means ``d_key`` (the official synthetic code
      uses ``int(2.2·N)``).
    use_bias: whether the key, query and β projections have biases (the official code's do).
    tie_queries: whether queries are embedded with the keys' table (the paper's and the official
      code's model); ``False`` gives them a table of their own.
    embed_factor: if set, every embedding table is a product ``E·P`` of a
      ``[num_keys, embed_factor]`` table and one shared ``[embed_factor, d_embed]`` matrix: an
      over-parametrisation with the same function class.
    attention: FAST_WEIGHT (any φ, rule, normalisation) or SOFTMAX.
    fast_weight: the memory's configuration (short_conv / output_norm are not used here).
    """

    num_keys: int
    num_values: int
    d_key: int = 64
    d_embed: int | None = None
    use_bias: bool = False
    tie_queries: bool = True
    embed_factor: int | None = None
    attention: AttentionKind = AttentionKind.FAST_WEIGHT
    fast_weight: FastWeightConfig = _DEFAULT_FAST_WEIGHT

    def __post_init__(self):
        check_positive_ints(num_keys=self.num_keys, num_values=self.num_values, d_key=self.d_key)
        check_positive_ints(d_embed=self.d_embed, embed_factor=self.embed_factor, allow_none=True)
        if self.d_embed is None:
            object.__setattr__(self, "d_embed", self.d_key)
        for name in ("use_bias", "tie_queries"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a bool")
        object.__setattr__(self, "attention", AttentionKind(self.attention))
        if self.fast_weight.update_rule is UpdateRule.GATED_DELTA:
            raise ValueError("RetrievalModel supports the sum and delta rules, not GATED_DELTA")


class RetrievalModel(nnx.Module):
    """Writes (key, value) pairs into one memory, then reads it at query keys.

    Step ``t`` sees ``x_t = [onehot(value_t); embed(key_t)]``; the memory key is ``W_k x_t``, the
    memory value is ``onehot(value_t)`` itself (frozen), the write strength ``σ(w_β·x_t)``. A
    query is ``W_q embed_q(query_key)`` (each projection plus a bias if ``use_bias``;
    ``embed_q = embed`` unless ``tie_queries`` is off), read from
    the memory after all writes: the prediction ``ŷ ∈ R^{num_values}``. The softmax variant
    attends from each query to all written keys.

    ``__call__(keys [B, L], values [B, L], queries [B, Q]) -> [B, Q, num_values]`` (float32).
    """

    def __init__(self, config: RetrievalConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, e, bias = config.d_key, config.d_embed, config.use_bias
        f = config.embed_factor
        width = e if f is None else f  # of the table(s) E
        self.embed = nnx.Embed(config.num_keys, width, rngs=rngs)
        self.query_embed = nnx.data(
            None if config.tie_queries else nnx.Embed(config.num_keys, width, rngs=rngs)
        )
        self.embed_factor = nnx.data(
            None if f is None else nnx.Linear(f, e, use_bias=False, rngs=rngs)
        )
        d_in = config.num_values + e
        self.key_proj = nnx.Linear(d_in, d, use_bias=bias, rngs=rngs)
        self.query_proj = nnx.Linear(e, d, use_bias=bias, rngs=rngs)
        self.beta_proj = nnx.Linear(d_in, 1, use_bias=bias, rngs=rngs)
        fm = config.fast_weight.feature_map
        favor = config.attention is AttentionKind.FAST_WEIGHT and fm.needs_projection
        self.projection = nnx.data(
            FavorProjection(feature_maps.draw_favor_projection(rngs.params(), d, fm.num_features))
            if favor
            else None
        )

    def redraw_projection(self, key):
        if self.projection is not None:
            d, m = self.projection[...].shape
            self.projection[...] = feature_maps.draw_favor_projection(key, d, m)

    def key_table(self) -> jax.Array:
        """The key embedding table ``[num_keys, d_embed]`` (``E·P`` if ``embed_factor``)."""
        table = self.embed.embedding[...]
        return table if self.embed_factor is None else self.embed_factor(table)

    def query_table(self) -> jax.Array:
        """The query embedding table ``[num_keys, d_embed]``: the key table unless
        ``tie_queries`` is off."""
        if self.query_embed is None:
            return self.key_table()
        table = self.query_embed.embedding[...]
        return table if self.embed_factor is None else self.embed_factor(table)

    def embed_queries(self, queries) -> jax.Array:
        """``[..., d_embed]`` rows of :meth:`query_table`; out-of-range ids give NaN rows (as
        ``nnx.Embed``), so a bad id shows up as a non-finite loss."""
        return jnp.take(self.query_table(), queries, axis=0)

    def __call__(self, keys, values, queries):
        cfg = self.config
        v = jax.nn.one_hot(values, cfg.num_values, dtype=jnp.float32)  # [B, L, V]
        x = jnp.concatenate([v, jnp.take(self.key_table(), keys, axis=0)], axis=-1)
        k = self.key_proj(x)[:, :, None]  # [B, L, 1, d]
        q = self.query_proj(self.embed_queries(queries))[:, :, None]  # [B, Q, 1, d]
        if cfg.attention is AttentionKind.SOFTMAX:
            logits = jnp.einsum("bqhd,blhd->bhql", q, k) / math.sqrt(cfg.d_key)
            return jnp.einsum("bhql,blv->bqv", jax.nn.softmax(logits, axis=-1), v)
        fw = cfg.fast_weight
        beta = None
        if fw.update_rule is UpdateRule.DELTA:
            beta = jax.nn.sigmoid(self.beta_proj(x))  # [B, L, 1]
        projection = None if self.projection is None else self.projection[...]
        kw = dict(feature_map=fw.feature_map, normalization=fw.normalization, projection=projection)
        # Only the final memory is needed: the per-step outputs of this write pass are discarded
        # (reads happen after all writes, with fast_weight_read below).
        _, memory = fast_weight_attention(
            k,
            k,
            v[:, :, None],
            beta,
            update_rule=fw.update_rule,
            impl=fw.impl,
            chunk_size=fw.chunk_size,
            **kw,
        )
        return fast_weight_read(q, memory, **kw)[:, :, 0]
