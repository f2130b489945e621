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
# # Feature maps and capacity
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/FWJAX_ORG_PLACEHOLDER/fwjax/blob/main/notebooks/02_feature_maps_and_capacity.ipynb)
#
# A fast weight memory with keys $\phi(k) \in \mathbb{R}^{\dim\phi}$ holds about
# $\dim\phi$ associations (notebook 01). The feature map $\phi$ sets that
# dimension:
#
# | map | $\dim\phi$ for inputs of dimension $d$ |
# |---|---|
# | ELU+1 (Katharopoulos et al., 2020) | $d$ |
# | DPFP-$\nu$ (Schlag et al., 2021) | $2d\nu$ |
# | FAVOR+ with $m$ random features (Choromanski et al., 2021) | $2m$ |
#
# This notebook plots the features and the similarity (kernel) they induce, then
# runs a small version of the paper's capacity experiment.

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
D_KEY = 16  # key/query dimension d of the capacity experiment
CAPACITY_N = [8] if FAST else [8, 16, 32, 64]  # associations per sequence
CAPACITY_MAPS = ["dpfp1"] if FAST else ["linear", "dpfp1", "dpfp2"]
MAX_STEPS, EVAL_EVERY = (100, 50) if FAST else (1500, 100)
FAVOR_M = [64] if FAST else [16, 128, 1024]  # FAVOR+ random features

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from fwjax import explain
from fwjax.ops import FeatureMap, FeatureMapKind, Normalization, feature_maps

MAPS = {
    "linear": FeatureMap(FeatureMapKind.ELU_P1),
    "dpfp1": FeatureMap(FeatureMapKind.DPFP, nu=1),
    "dpfp2": FeatureMap(FeatureMapKind.DPFP, nu=2),
    "dpfp3": FeatureMap(FeatureMapKind.DPFP, nu=3),
    "favor8": FeatureMap(FeatureMapKind.FAVOR_PLUS, num_features=8),
    "favor64": FeatureMap(FeatureMapKind.FAVOR_PLUS, num_features=64),
}
for d in (2, 16, 64):
    dims = ", ".join(f"{name} {fm.output_dim(d)}" for name, fm in MAPS.items())
    print(f"d = {d:2d}: dim φ = {dims}")

# %% [markdown]
# ## 1. The features
#
# Inputs on the unit circle ($d = 2$), $x = (\cos\theta, \sin\theta)$; each row of
# an image is one feature $\phi(x)_i$ as $\theta$ goes round. ELU+1 keeps two
# smooth, overlapping features. DPFP multiplies rectified coordinates,
# $r = [\mathrm{relu}(x), \mathrm{relu}(-x)]$,
# $\phi(x) = [r \odot \mathrm{roll}(r, j)]_{j=1..\nu}$: non-negative features that
# are each non-zero on one part of the input space, so different inputs light up
# different features. FAVOR+ uses $2m$ positive random features whose dot products
# estimate $\exp(x\cdot y)$ (the softmax kernel). (With $d = 2$, DPFP-2's
# second roll pairs $\mathrm{relu}(x_i)$ with $\mathrm{relu}(-x_i)$, which is
# always 0, so the circle shows DPFP-1 only; in higher dimensions each roll adds
# $2d$ useful features.)

# %%
theta = jnp.linspace(0, 2 * jnp.pi, 241)
circle = jnp.stack([jnp.cos(theta), jnp.sin(theta)], axis=-1)  # [241, 2]
projection = feature_maps.draw_favor_projection(jax.random.key(0), 2, 8)
shown = ["linear", "dpfp1", "favor8"]
fig, axes = plt.subplots(1, len(shown), figsize=(13, 3))
for ax, name in zip(axes, shown, strict=True):
    fm = MAPS[name]
    feats = fm(circle, projection if fm.needs_projection else None)
    ax.imshow(feats.T, aspect="auto", cmap="magma", extent=[0, 360, feats.shape[1] - 0.5, -0.5])
    ax.set(title=f"{name}: dim φ = {feats.shape[1]}", xlabel="θ (degrees)", ylabel="feature")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. The kernel: how much two keys interfere
#
# A sum-rule memory returns $\sum_j \kappa(q, k_j) v_j$ with
# $\kappa(x, y) = \hat\phi(x)\cdot\hat\phi(y)$ (`fwjax.explain.feature_kernel`), so
# retrieval is clean when $\kappa$ is large for the same key and small between
# different keys. Left: $\kappa$ between points of the circle (sum-normalised
# features). Right: for $d = 16$, the cosine similarity of $\phi$ between pairs of
# *different* random inputs — the crosstalk per stored association; DPFP's larger
# $\dim\phi$ makes different inputs closer to orthogonal.

# %%
fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
for ax, name in zip(axes[:3], shown, strict=True):
    fm = MAPS[name]
    proj = projection if fm.needs_projection else None
    kern = explain.feature_kernel(
        fm, circle, circle, projection=proj, normalization=Normalization.SUM
    )
    ax.imshow(kern / kern.max(), cmap="viridis", extent=[0, 360, 360, 0])
    ax.set(title=f"κ on the circle: {name}", xlabel="θ₁", ylabel="θ₂")

x = jax.random.normal(jax.random.key(1), (256, 16))
off = ~np.eye(len(x), dtype=bool)
proj64 = feature_maps.draw_favor_projection(jax.random.key(2), 16, 64)
for name in ["linear", "dpfp1", "dpfp2", "dpfp3", "favor64"]:
    fm = MAPS[name]
    cos = explain.feature_kernel(
        fm, x, x, normalization=Normalization.L2, projection=proj64 if fm.needs_projection else None
    )
    axes[3].hist(
        np.asarray(cos)[off],
        bins=50,
        histtype="step",
        density=True,
        label=f"{name} ({fm.output_dim(16)})",
    )
axes[3].set(title="d = 16: cos(φ(x), φ(y)), x ≠ y", xlabel="cosine")
axes[3].legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# FAVOR+ is an unbiased estimate of $\exp(x \cdot y)$: more random features, less
# variance (inputs of norm 1 in $d = 16$).

# %%
x = jax.random.normal(jax.random.key(3), (64, 16))
x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
exact = np.asarray(jnp.exp(x @ x.T)).ravel()
fig, axes = plt.subplots(1, len(FAVOR_M), figsize=(11, 3.2), squeeze=False)
axes = axes[0]
for ax, m in zip(axes, FAVOR_M, strict=True):
    fm = FeatureMap(FeatureMapKind.FAVOR_PLUS, num_features=m)
    r = feature_maps.draw_favor_projection(jax.random.key(m), 16, m)
    est = np.asarray(explain.feature_kernel(fm, x, x, projection=r)).ravel()
    ax.scatter(exact, est, s=2, alpha=0.4)
    ax.plot([exact.min(), exact.max()], [exact.min(), exact.max()], "k--", lw=1)
    ax.set(title=f"FAVOR+, m = {m} (dim φ = {2 * m})", xlabel="exp(x·y)")
axes[0].set_ylabel("φ(x)·φ(y)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Capacity, measured by training
#
# The paper's setting 1 (Sec. 6.1): a sequence writes $N$ (key, value) pairs, a
# permutation of all $N$ keys with a permutation of all $N$ values; a one-layer
# model (`fwjax.nn.RetrievalModel`) learns key embeddings and projections and must
# return the value of a queried key. Training follows the paper's protocol
# (`fwjax.train.retrieval.run_retrieval`: Adam 1e-3, batch 32, loss
# $\frac12\lVert \mathrm{onehot} - \hat y\rVert^2$, 0.5 for predicting zeros) with
# a step cap; `fwjax.explain.capacity_sweep` runs it over feature maps and $N$.
# The paper uses $d = 64$ and $N$ up to 600 (hours); here $d = 16$, so the limits
# show at small $N$ (12 runs, about a minute on 2 CPU cores). Expect each map's
# loss to rise once $N$ passes its $\dim\phi$ (dashed lines).

# %%
# Overrides of the paper's protocol (the `retrieval_paper` config).
protocol = {"steps": MAX_STEPS, "early_stopping.patience": 5}
protocol |= dict.fromkeys(("eval_every", "log_every", "steps_per_call"), EVAL_EVERY)
points = explain.capacity_sweep(
    {name: MAPS[name] for name in CAPACITY_MAPS},
    CAPACITY_N,
    protocol,
    d_key=D_KEY,
    log=lambda p: print(
        f"{p.name:7s} N={p.num_keys:3d} dim φ={p.d_dot:3d}: "
        f"loss {p.final_eval_loss:.4f} after {p.steps} steps ({p.seconds:.1f} s)"
    ),
)

# %%
for name in CAPACITY_MAPS:
    mine = [p for p in points if p.name == name]
    (line,) = plt.plot(
        [p.num_keys for p in mine],
        [p.final_eval_loss for p in mine],
        "o-",
        label=f"{name} (dim φ = {mine[0].d_dot})",
    )
    plt.axvline(mine[0].d_dot, color=line.get_color(), ls="--", alpha=0.6)
plt.xscale("log", base=2)
plt.xlabel("N associations per sequence")
plt.ylabel("final evaluation loss")
plt.title(f"Sum-rule memory capacity, d = {D_KEY}")
plt.legend()
plt.show()

# %% [markdown]
# The full-size experiment (all of the paper's maps, $d = 64$, $N$ up to 600, and
# the update setting with the delta rule) is `python -m experiments.synthetic` in
# the repository; its results are in `experiments/results/`.
