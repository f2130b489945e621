# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     gpuType: T4
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator,colab,kernelspec,-jupytext.text_representation
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Linear attention is a fast weight memory
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/FWJAX_ORG_PLACEHOLDER/fwjax/blob/main/notebooks/01_linear_attention_is_a_fast_weight_memory.ipynb)
#
# Schlag, Irie & Schmidhuber, *Linear Transformers Are Secretly Fast Weight
# Programmers* (ICML 2021, [arXiv:2102.11174](https://arxiv.org/abs/2102.11174)).
#
# Causal linear attention with a feature map $\phi$ computes
# $o_t = \sum_{j \le t} (\phi(q_t) \cdot \phi(k_j))\, v_j$. Regrouping the sum gives
# $o_t = S_t^\top \phi(q_t)$ with $S_t = \sum_{j \le t} \phi(k_j) v_j^\top$: a
# **fast weight matrix** of fixed size $K \times V$, *written* with one outer product
# per token and *read* with the query (the **sum rule**). This notebook
#
# 1. computes linear attention both ways and shows they are equal,
# 2. watches the fast weight matrix as it is written,
# 3. compares the sum rule with the **delta rule**, which replaces the value stored
#    under a key instead of adding to it, when keys repeat,
# 4. shows what happens past capacity: more associations than dimensions.

# %%
import subprocess
import sys

FWJAX = "fwjax @ git+https://github.com/FWJAX_ORG_PLACEHOLDER/fwjax"
if "google.colab" in sys.modules:  # Colab only; elsewhere use the environment you have
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", FWJAX], check=True)

# %%
import os

# Parameters. FWJAX_NOTEBOOK_FAST=1 (as in CI) runs tiny sizes in seconds.
FAST = os.environ.get("FWJAX_NOTEBOOK_FAST") == "1"
T, D, V = (6, 4, 3) if FAST else (12, 8, 6)  # sequence, key and value sizes
MEMORY_DIM = 8 if FAST else 32  # key dimension of the recall experiments
SEEDS = 1 if FAST else 5  # random sequences averaged per point
WRITES_PER_KEY = [1, 3] if FAST else [1, 2, 3, 4, 5, 6, 7, 8]  # section 3
KEYS_PER_DIM = [1, 2] if FAST else [i / 4 for i in range(1, 13)]  # 4

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from fwjax import explain
from fwjax.ops import UpdateRule, delta_rule, feature_maps, sum_rule

# %% [markdown]
# ## 1. Two ways to compute linear attention
#
# The attention form builds the $T \times T$ matrix
# $A = \mathrm{tril}(\phi(Q)\phi(K)^\top)$ and returns $AV$
# (`fwjax.explain.linear_attention_matrix`). The fast weight form is
# `fwjax.ops.sum_rule`: a scan over $t$ that keeps only $S_t$ ($K \times V$).
# The ops take `[batch, time, heads, dim]` arrays; here one sequence, one head.

# %%
kq, kk, kv = jax.random.split(jax.random.key(0), 3)
phi_q = feature_maps.elu_p1(jax.random.normal(kq, (T, D)))  # φ = ELU + 1
phi_k = feature_maps.elu_p1(jax.random.normal(kk, (T, D)))
v = jax.random.normal(kv, (T, V))

A = explain.linear_attention_matrix(phi_q, phi_k)  # [T, T]
out_attention = A @ v

def one_head(x):  # [T, ...] -> [batch 1, T, head 1, ...]
    return x[None, :, None]

out_fast, S = sum_rule(one_head(phi_q), one_head(phi_k), one_head(v))
out_fast, S = out_fast[0, :, 0], S[0, 0]  # [T, V], [K, V]
err = float(jnp.max(jnp.abs(out_attention - out_fast)))
print(f"max |attention form - fast weight form| = {err:.2e}")
assert err < 1e-4

fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
axes[0].imshow(A, cmap="viridis")
axes[0].set(title=f"attention matrix A: {T}×{T}, grows with T", xlabel="key j",
            ylabel="query t")
axes[1].imshow(S, cmap="viridis")
axes[1].set(title=f"fast weight matrix S_T: {D}×{V}, fixed", xlabel="value dim",
            ylabel="key feature")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. The fast weight matrix as it is written
#
# Four writes with one-hot keys; the fourth reuses the first key. The **sum rule**
# adds $k_t v_t^\top$, so the first key's row ends up holding $v_1 + v_4$. The
# **delta rule** first reads what the memory returns for the key,
# $\bar v_t = S_{t-1}^\top k_t$, and writes the difference:
# $S_t = S_{t-1} + \beta_t k_t (v_t - \bar v_t)^\top$. With $\beta_t = 1$ the row
# is *replaced* by $v_4$ (`fwjax.explain.fast_weight_snapshots`).

# %%
keys = jnp.eye(4)[jnp.array([0, 1, 2, 0])]  # key 0 is written twice
values = jax.random.normal(jax.random.key(2), (4, 4))
snapshots = {
    "sum rule": explain.fast_weight_snapshots(keys, values),
    "delta rule (β=1)": explain.fast_weight_snapshots(keys, values, jnp.ones(4)),
}
lim = float(max(jnp.abs(s).max() for s in snapshots.values()))
fig, axes = plt.subplots(2, 4, figsize=(10, 5))
for row, (name, states) in enumerate(snapshots.items()):
    for t in range(4):
        ax = axes[row, t]
        ax.imshow(states[t], cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set(xticks=[], yticks=[], title=f"{name}\nafter write {t + 1}")
plt.tight_layout()
plt.show()

for name, states in snapshots.items():
    read = keys[0] @ states[-1]  # query with the repeated key
    print(f"{name:17s} read at key 0: |read - v_4| = "
          f"{float(jnp.linalg.norm(read - values[3])):.3f}, |read - (v_1 + v_4)| = "
          f"{float(jnp.linalg.norm(read - values[0] - values[3])):.3f}")

# %% [markdown]
# The delta rule is still a kind of attention: its outputs are $A_\Delta V$ with
# $A_\Delta = \mathrm{tril}(QK^\top)\,(I + \mathrm{tril}(\mathrm{diag}(\beta)KK^\top,
# -1))^{-1}\mathrm{diag}(\beta)$ (`fwjax.explain.delta_rule_attention_matrix`).
# Unlike linear attention's, its weights can be **negative**: later writes
# subtract what earlier ones stored under similar keys. Below with L2-normalised
# DPFP-1 features (unit keys, so a write with $\beta_t$ near 1 nearly replaces
# what the key held; the paper's sum normalisation gives shorter keys and smaller
# corrections) and random $\beta_t \in (0, 1)$, checked against
# `fwjax.ops.delta_rule`.

# %%
kb = jax.random.key(2)
q_hat = feature_maps.l2_norm(feature_maps.dpfp(jax.random.normal(kq, (T, D))))
k_hat = feature_maps.l2_norm(feature_maps.dpfp(jax.random.normal(kk, (T, D))))
beta = jax.nn.sigmoid(2.0 + jax.random.normal(kb, (T,)))  # mostly strong writes

A_delta = explain.delta_rule_attention_matrix(q_hat, k_hat, beta)
out_delta, _ = delta_rule(one_head(q_hat), one_head(k_hat), one_head(v),
                          beta[None, :, None])
err = float(jnp.max(jnp.abs(A_delta @ v - out_delta[0, :, 0])))
print(f"max |A_delta V - delta_rule| = {err:.2e}")
assert err < 1e-4

A_sum = explain.linear_attention_matrix(q_hat, k_hat)
lim = float(jnp.abs(A_delta).max())
fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
matrices = {"sum rule": A_sum, "delta rule": A_delta}
for ax, (name, a) in zip(axes, matrices.items(), strict=True):
    im = ax.imshow(a, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set(title=f"{name}: attention weights", xlabel="key j", ylabel="query t")
fig.colorbar(im, ax=axes)
plt.show()

# %% [markdown]
# ## 3. Retrieval when keys repeat
#
# A pool of `MEMORY_DIM // 2` orthonormal keys is written `L` times with random
# unit values, keys drawn with replacement; each key is then queried, and the
# target is the value of its **last** write (`fwjax.explain.associative_sequence`,
# `recall_error`: $\lVert \hat y - v \rVert^2 / \lVert v \rVert^2$, 1 = as bad as
# returning zeros). The sum rule returns the sum of every value ever written
# under the key; the delta rule with $\beta = 1$ returns the last one exactly.

# %%
pool = MEMORY_DIM // 2
writes = [m * pool for m in WRITES_PER_KEY]
rules = {"sum rule": UpdateRule.SUM, "delta rule (β=1)": UpdateRule.DELTA}
errors = {name: [] for name in rules}
for n_writes in writes:
    seqs = [
        explain.associative_sequence(
            seed, num_writes=n_writes, num_keys=pool, key_dim=MEMORY_DIM,
            value_dim=MEMORY_DIM,
        )
        for seed in range(SEEDS)
    ]
    for name, rule in rules.items():
        errors[name].append(np.mean([explain.recall_error(s, rule) for s in seqs]))

for name, errs in errors.items():
    plt.plot(writes, errs, "o-", label=name)
plt.xlabel(f"writes L (pool of {pool} keys, d = {MEMORY_DIM})")
plt.ylabel("recall error of the last value")
plt.title("Repeated keys: the sum rule accumulates, the delta rule replaces")
plt.legend()
plt.show()

# %% [markdown]
# ## 4. Past capacity
#
# Now `N` distinct keys, each written once. A $d \times V$ matrix holds at most
# $d$ associations without interference: up to $N = d$ the keys can be orthogonal
# (here they are: orthonormal keys, the best case) and both rules recall exactly;
# beyond it keys must overlap (here: random unit keys) and every read picks up
# crosstalk from the others. This is why the feature map's dimension
# $\dim\phi$ matters (notebook 02): it is the memory's capacity. The delta rule
# degrades more gracefully, because each write first removes what the memory
# already returns for the key.

# %%
d = MEMORY_DIM
n_keys = [round(f * d) for f in KEYS_PER_DIM]
capacity = {name: [] for name in rules}
for n in n_keys:
    seqs = [
        explain.associative_sequence(
            seed, num_writes=n, num_keys=n, key_dim=d, value_dim=d
        )
        for seed in range(SEEDS)
    ]
    for name, rule in rules.items():
        errs = [explain.recall_error(s, rule) for s in seqs]
        capacity[name].append(np.mean(errs))

for name, errs in capacity.items():
    plt.plot(n_keys, errs, "o-", label=name)
plt.axvline(d, color="gray", ls="--", label=f"N = d = {d}")
plt.xlabel("distinct keys N (each written once)")
plt.ylabel("recall error")
plt.title("Beyond d associations, keys interfere")
plt.legend()
plt.show()

# %% [markdown]
# **Next:** notebook 02 learns the keys, with feature maps that raise $\dim\phi$
# above the key dimension, and measures capacity by training; notebook 03 trains
# a delta-rule language model.
