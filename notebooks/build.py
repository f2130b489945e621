"""Builds the Colab notebooks of fwjax from the cell sources below (reviewable as code).

    python notebooks/build.py          # (re)writes notebooks/*.ipynb, outputs stripped
    python notebooks/build.py --check  # exits 1 if a committed notebook differs from this file

Every notebook starts with a cell that installs fwjax only inside Colab, then a parameter cell:
``FWJAX_NOTEBOOK_FAST=1`` (CI) selects tiny sizes, otherwise the sizes are meaningful (measured
on 2 shared CPU cores: 01 in 33 s, 02 in 82 s, 03 in 10 min). The logic lives in the library
(``fwjax.explain``, ``fwjax.train``); the notebooks call it and plot.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

# PLACEHOLDER: fwjax has no public repository yet. Set this to it (here, and nowhere else),
# then run `python notebooks/build.py` to regenerate the notebooks and their Colab links.
FWJAX_REPO_URL = "https://github.com/FWJAX_ORG_PLACEHOLDER/fwjax"
COLAB_PREFIX = "https://colab.research.google.com/github/" + FWJAX_REPO_URL.split("github.com/")[1]
NOTEBOOK_DIR = Path(__file__).resolve().parent

METADATA = {
    "accelerator": "GPU",
    "colab": {"gpuType": "T4", "provenance": []},
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def colab_url(filename: str) -> str:
    """The "Open in Colab" address of ``notebooks/filename`` on the main branch."""
    return f"{COLAB_PREFIX}/blob/main/notebooks/{filename}"


def _src(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


def install_cell() -> str:
    return _src(
        f"""
        import sys

        if "google.colab" in sys.modules:  # Colab only; elsewhere use the environment you have
            %pip install -q "fwjax @ git+{FWJAX_REPO_URL}"
        """
    )


def fast_cell(sizes: str) -> str:
    """The parameter cell: ``FAST`` from ``FWJAX_NOTEBOOK_FAST``, then the notebook's sizes."""
    head = _src(
        """
        import os

        # Parameters. FWJAX_NOTEBOOK_FAST=1 (as in CI) runs tiny sizes in seconds.
        FAST = os.environ.get("FWJAX_NOTEBOOK_FAST") == "1"
        """
    )
    return head + "\n" + _src(sizes)


def title_cell(filename: str, title: str, body: str) -> str:
    badge = (
        f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        f"({colab_url(filename)})"
    )
    return f"# {title}\n\n{badge}\n\n" + _src(body)


# ----------------------------------------------------------------------------------------------
# 01: linear attention is a fast weight memory
# ----------------------------------------------------------------------------------------------

NB01 = "01_linear_attention_is_a_fast_weight_memory.ipynb"


def notebook_01() -> list[tuple[str, str]]:
    md, code = "markdown", "code"
    return [
        (
            md,
            title_cell(
                NB01,
                "Linear attention is a fast weight memory",
                r"""
                Schlag, Irie & Schmidhuber, *Linear Transformers Are Secretly Fast Weight
                Programmers* (ICML 2021, [arXiv:2102.11174](https://arxiv.org/abs/2102.11174)).

                Causal linear attention with a feature map $\phi$ computes
                $o_t = \sum_{j \le t} (\phi(q_t) \cdot \phi(k_j))\, v_j$. Regrouping the sum gives
                $o_t = S_t^\top \phi(q_t)$ with $S_t = \sum_{j \le t} \phi(k_j) v_j^\top$: a
                **fast weight matrix** of fixed size $K \times V$, *written* with one outer product
                per token and *read* with the query (the **sum rule**). This notebook

                1. computes linear attention both ways and shows they are equal,
                2. watches the fast weight matrix as it is written,
                3. compares the sum rule with the **delta rule**, which replaces the value stored
                   under a key instead of adding to it, when keys repeat,
                4. shows what happens past capacity: more associations than dimensions.
                """,
            ),
        ),
        (code, install_cell()),
        (
            code,
            fast_cell(
                """
                T, D, V = (6, 4, 3) if FAST else (12, 8, 6)  # sequence, key and value sizes
                MEMORY_DIM = 8 if FAST else 32  # key dimension of the recall experiments
                SEEDS = 1 if FAST else 5  # random sequences averaged per point
                WRITES_PER_KEY = [1, 3] if FAST else [1, 2, 3, 4, 5, 6, 7, 8]  # section 3
                KEYS_PER_DIM = [1, 2] if FAST else [i / 4 for i in range(1, 13)]  # 4
                """
            ),
        ),
        (
            code,
            _src(
                """
                import jax
                import jax.numpy as jnp
                import matplotlib.pyplot as plt
                import numpy as np

                from fwjax import explain
                from fwjax.ops import UpdateRule, delta_rule, feature_maps, sum_rule
                """
            ),
        ),
        (
            md,
            _src(
                r"""
                ## 1. Two ways to compute linear attention

                The attention form builds the $T \times T$ matrix
                $A = \mathrm{tril}(\phi(Q)\phi(K)^\top)$ and returns $AV$
                (`fwjax.explain.linear_attention_matrix`). The fast weight form is
                `fwjax.ops.sum_rule`: a scan over $t$ that keeps only $S_t$ ($K \times V$).
                The ops take `[batch, time, heads, dim]` arrays; here one sequence, one head.
                """
            ),
        ),
        (
            code,
            _src(
                """
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
                """
            ),
        ),
        (
            md,
            _src(
                r"""
                ## 2. The fast weight matrix as it is written

                Four writes with one-hot keys; the fourth reuses the first key. The **sum rule**
                adds $k_t v_t^\top$, so the first key's row ends up holding $v_1 + v_4$. The
                **delta rule** first reads what the memory returns for the key,
                $\bar v_t = S_{t-1}^\top k_t$, and writes the difference:
                $S_t = S_{t-1} + \beta_t k_t (v_t - \bar v_t)^\top$. With $\beta_t = 1$ the row
                is *replaced* by $v_4$ (`fwjax.explain.fast_weight_snapshots`).
                """
            ),
        ),
        (
            code,
            _src(
                """
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
                        ax.set(xticks=[], yticks=[], title=f"{name}\\nafter write {t + 1}")
                plt.tight_layout()
                plt.show()

                for name, states in snapshots.items():
                    read = keys[0] @ states[-1]  # query with the repeated key
                    print(f"{name:17s} read at key 0: |read - v_4| = "
                          f"{float(jnp.linalg.norm(read - values[3])):.3f}, |read - (v_1 + v_4)| = "
                          f"{float(jnp.linalg.norm(read - values[0] - values[3])):.3f}")
                """
            ),
        ),
        (
            md,
            _src(
                r"""
                The delta rule is still a kind of attention: its outputs are $A_\Delta V$ with
                $A_\Delta = \mathrm{tril}(QK^\top)\,(I + \mathrm{tril}(\mathrm{diag}(\beta)KK^\top,
                -1))^{-1}\mathrm{diag}(\beta)$ (`fwjax.explain.delta_rule_attention_matrix`).
                Unlike linear attention's, its weights can be **negative**: later writes
                subtract what earlier ones stored under similar keys. Below with L2-normalised
                DPFP-1 features (unit keys, so a write with $\beta_t$ near 1 nearly replaces
                what the key held; the paper's sum normalisation gives shorter keys and smaller
                corrections) and random $\beta_t \in (0, 1)$, checked against
                `fwjax.ops.delta_rule`.
                """
            ),
        ),
        (
            code,
            _src(
                """
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
                """
            ),
        ),
        (
            md,
            _src(
                r"""
                ## 3. Retrieval when keys repeat

                A pool of `MEMORY_DIM // 2` orthonormal keys is written `L` times with random
                unit values, keys drawn with replacement; each key is then queried, and the
                target is the value of its **last** write (`fwjax.explain.associative_sequence`,
                `recall_error`: $\lVert \hat y - v \rVert^2 / \lVert v \rVert^2$, 1 = as bad as
                returning zeros). The sum rule returns the sum of every value ever written
                under the key; the delta rule with $\beta = 1$ returns the last one exactly.
                """
            ),
        ),
        (
            code,
            _src(
                """
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
                """
            ),
        ),
        (
            md,
            _src(
                r"""
                ## 4. Past capacity

                Now `N` distinct keys, each written once. A $d \times V$ matrix holds at most
                $d$ associations without interference: up to $N = d$ the keys can be orthogonal
                (here they are: orthonormal keys, the best case) and both rules recall exactly;
                beyond it keys must overlap (here: random unit keys) and every read picks up
                crosstalk from the others. This is why the feature map's dimension
                $\dim\phi$ matters (notebook 02): it is the memory's capacity. The delta rule
                degrades more gracefully, because each write first removes what the memory
                already returns for the key.
                """
            ),
        ),
        (
            code,
            _src(
                """
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
                """
            ),
        ),
        (
            md,
            _src(
                """
                **Next:** notebook 02 learns the keys, with feature maps that raise $\\dim\\phi$
                above the key dimension, and measures capacity by training; notebook 03 trains
                a delta-rule language model.
                """
            ),
        ),
    ]


# ----------------------------------------------------------------------------------------------
# 02: feature maps and capacity
# ----------------------------------------------------------------------------------------------

NB02 = "02_feature_maps_and_capacity.ipynb"


def notebook_02() -> list[tuple[str, str]]:
    md, code = "markdown", "code"
    return [
        (
            md,
            title_cell(
                NB02,
                "Feature maps and capacity",
                r"""
                A fast weight memory with keys $\phi(k) \in \mathbb{R}^{\dim\phi}$ holds about
                $\dim\phi$ associations (notebook 01). The feature map $\phi$ sets that
                dimension:

                | map | $\dim\phi$ for inputs of dimension $d$ |
                |---|---|
                | ELU+1 (Katharopoulos et al., 2020) | $d$ |
                | DPFP-$\nu$ (Schlag et al., 2021) | $2d\nu$ |
                | FAVOR+ with $m$ random features (Choromanski et al., 2021) | $2m$ |

                This notebook plots the features and the similarity (kernel) they induce, then
                runs a small version of the paper's capacity experiment.
                """,
            ),
        ),
        (code, install_cell()),
        (
            code,
            fast_cell(
                """
                D_KEY = 16  # key/query dimension d of the capacity experiment
                CAPACITY_N = [8] if FAST else [8, 16, 32, 64]  # associations per sequence
                CAPACITY_MAPS = ["dpfp1"] if FAST else ["linear", "dpfp1", "dpfp2"]
                MAX_STEPS, EVAL_EVERY = (100, 50) if FAST else (1500, 100)
                FAVOR_M = [64] if FAST else [16, 128, 1024]  # FAVOR+ random features
                """
            ),
        ),
        (
            code,
            _src(
                """
                import jax
                import jax.numpy as jnp
                import matplotlib.pyplot as plt
                import numpy as np

                from fwjax import explain
                from fwjax.ops import FeatureMap, FeatureMapKind, Normalization, feature_maps
                from fwjax.train.retrieval import RetrievalProtocol

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
                """
            ),
        ),
        (
            md,
            _src(
                r"""
                ## 1. The features

                Inputs on the unit circle ($d = 2$), $x = (\cos\theta, \sin\theta)$; each row of
                an image is one feature $\phi(x)_i$ as $\theta$ goes round. ELU+1 keeps two
                smooth, overlapping features. DPFP multiplies rectified coordinates,
                $r = [\mathrm{relu}(x), \mathrm{relu}(-x)]$,
                $\phi(x) = [r \odot \mathrm{roll}(r, j)]_{j=1..\nu}$: non-negative features that
                are each non-zero on one part of the input space, so different inputs light up
                different features. FAVOR+ uses $2m$ positive random features whose dot products
                estimate $\exp(x\cdot y)$ (the softmax kernel). (With $d = 2$, DPFP-2's
                second roll pairs $\mathrm{relu}(x_i)$ with $\mathrm{relu}(-x_i)$, which is
                always 0, so the circle shows DPFP-1 only; in higher dimensions each roll adds
                $2d$ useful features.)
                """
            ),
        ),
        (
            code,
            _src(
                """
                theta = jnp.linspace(0, 2 * jnp.pi, 241)
                circle = jnp.stack([jnp.cos(theta), jnp.sin(theta)], axis=-1)  # [241, 2]
                projection = feature_maps.draw_favor_projection(jax.random.key(0), 2, 8)
                shown = ["linear", "dpfp1", "favor8"]
                fig, axes = plt.subplots(1, len(shown), figsize=(13, 3))
                for ax, name in zip(axes, shown, strict=True):
                    fm = MAPS[name]
                    feats = fm(circle, projection if fm.needs_projection else None)
                    ax.imshow(feats.T, aspect="auto", cmap="magma",
                              extent=[0, 360, feats.shape[1] - 0.5, -0.5])
                    ax.set(title=f"{name}: dim φ = {feats.shape[1]}", xlabel="θ (degrees)",
                           ylabel="feature")
                plt.tight_layout()
                plt.show()
                """
            ),
        ),
        (
            md,
            _src(
                r"""
                ## 2. The kernel: how much two keys interfere

                A sum-rule memory returns $\sum_j \kappa(q, k_j) v_j$ with
                $\kappa(x, y) = \hat\phi(x)\cdot\hat\phi(y)$ (`fwjax.explain.feature_kernel`), so
                retrieval is clean when $\kappa$ is large for the same key and small between
                different keys. Left: $\kappa$ between points of the circle (sum-normalised
                features). Right: for $d = 16$, the cosine similarity of $\phi$ between pairs of
                *different* random inputs — the crosstalk per stored association; DPFP's larger
                $\dim\phi$ makes different inputs closer to orthogonal.
                """
            ),
        ),
        (
            code,
            _src(
                """
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
                    cos = explain.feature_kernel(fm, x, x, normalization=Normalization.L2,
                                                 projection=proj64 if fm.needs_projection else None)
                    axes[3].hist(np.asarray(cos)[off], bins=50, histtype="step", density=True,
                                 label=f"{name} ({fm.output_dim(16)})")
                axes[3].set(title="d = 16: cos(φ(x), φ(y)), x ≠ y", xlabel="cosine")
                axes[3].legend(fontsize=7)
                plt.tight_layout()
                plt.show()
                """
            ),
        ),
        (
            md,
            _src(
                r"""
                FAVOR+ is an unbiased estimate of $\exp(x \cdot y)$: more random features, less
                variance (inputs of norm 1 in $d = 16$).
                """
            ),
        ),
        (
            code,
            _src(
                """
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
                """
            ),
        ),
        (
            md,
            _src(
                r"""
                ## 3. Capacity, measured by training

                The paper's setting 1 (Sec. 6.1): a sequence writes $N$ (key, value) pairs, a
                permutation of all $N$ keys with a permutation of all $N$ values; a one-layer
                model (`fwjax.nn.RetrievalModel`) learns key embeddings and projections and must
                return the value of a queried key. Training follows the paper's protocol
                (`fwjax.train.retrieval.train_retrieval`: Adam 1e-3, batch 32, loss
                $\frac12\lVert \mathrm{onehot} - \hat y\rVert^2$, 0.5 for predicting zeros) with
                a step cap; `fwjax.explain.capacity_sweep` runs it over feature maps and $N$.
                The paper uses $d = 64$ and $N$ up to 600 (hours); here $d = 16$, so the limits
                show at small $N$ (12 runs, about a minute on 2 CPU cores). Expect each map's
                loss to rise once $N$ passes its $\dim\phi$ (dashed lines).
                """
            ),
        ),
        (
            code,
            _src(
                """
                protocol = RetrievalProtocol(max_steps=MAX_STEPS, eval_every=EVAL_EVERY, patience=5)
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
                """
            ),
        ),
        (
            code,
            _src(
                """
                for name in CAPACITY_MAPS:
                    mine = [p for p in points if p.name == name]
                    line, = plt.plot([p.num_keys for p in mine],
                                     [p.final_eval_loss for p in mine], "o-",
                                     label=f"{name} (dim φ = {mine[0].d_dot})")
                    plt.axvline(mine[0].d_dot, color=line.get_color(), ls="--", alpha=0.6)
                plt.xscale("log", base=2)
                plt.xlabel("N associations per sequence")
                plt.ylabel("final evaluation loss")
                plt.title(f"Sum-rule memory capacity, d = {D_KEY}")
                plt.legend()
                plt.show()
                """
            ),
        ),
        (
            md,
            _src(
                """
                The full-size experiment (all of the paper's maps, $d = 64$, $N$ up to 600, and
                the update setting with the delta rule) is `python -m experiments.synthetic` in
                the repository; its results are in `experiments/results/`.
                """
            ),
        ),
    ]


# ----------------------------------------------------------------------------------------------
# 03: train a delta net
# ----------------------------------------------------------------------------------------------

NB03 = "03_train_a_delta_net.ipynb"


def notebook_03() -> list[tuple[str, str]]:
    md, code = "markdown", "code"
    return [
        (
            md,
            title_cell(
                NB03,
                "Train a delta-rule language model",
                r"""
                A character-level language model whose attention layers are delta-rule fast
                weight memories (`fwjax.nn.TransformerLM`), trained with the library's training
                loop (`fwjax.train.train`: checkpoints, `metrics.jsonl`) on Tiny Shakespeare when
                the file is available, on generated text otherwise, with the reference small-LM
                recipe of `experiments/configs/shakespeare_char_delta.toml` (the budget of
                nanoGPT's "baby" Shakespeare model). Then: the learning curve, samples
                (`fwjax.nn.generate`), and how the loss falls with the context a character has.
                """,
            ),
        ),
        (code, install_cell()),
        (
            code,
            fast_cell(
                """
                # The reference recipe (full) or a toy model (fast).
                STEPS = 30 if FAST else 2000
                BATCH, SEGMENT = (4, 32) if FAST else (12, 64)
                D_MODEL, LAYERS, HEADS, D_FF = (32, 1, 2, 64) if FAST else (128, 4, 4, 512)
                SAMPLE_TOKENS = 64 if FAST else 400
                # Tiny Shakespeare: $FWJAX_TEXT_PATH, the repository's ../shared/data, or (Colab)
                # a download; None trains on fwjax.data.text.generated_text().
                TEXT_PATH = os.environ.get("FWJAX_TEXT_PATH")
                """
            ),
        ),
        (
            code,
            _src(
                """
                import sys
                import tempfile
                import urllib.request
                from pathlib import Path

                import jax
                import matplotlib.pyplot as plt
                import numpy as np

                from fwjax import explain
                from fwjax.nn import FastWeightConfig, ModelConfig, generate
                from fwjax.ops import FeatureMap, Normalization, UpdateRule
                from fwjax.train import (
                    CheckpointConfig,
                    LMTaskConfig,
                    OptimizerConfig,
                    Run,
                    TrainConfig,
                    train,
                )
                from fwjax.train.metrics import read_metrics

                SHAKESPEARE_URL = (
                    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                    "tinyshakespeare/input.txt"
                )
                if TEXT_PATH is None:
                    for candidate in ["../../shared/data/tinyshakespeare/input.txt",
                                      "../shared/data/tinyshakespeare/input.txt"]:
                        if Path(candidate).is_file():
                            TEXT_PATH = candidate
                            break
                if TEXT_PATH is None and "google.colab" in sys.modules:
                    try:
                        TEXT_PATH, _ = urllib.request.urlretrieve(SHAKESPEARE_URL, "input.txt")
                    except OSError as e:
                        print("download failed, using generated text:", e)
                print("text:", TEXT_PATH or "fwjax.data.text.generated_text()")
                print("devices:", jax.devices())
                """
            ),
        ),
        (
            md,
            _src(
                r"""
                ## 1. Train

                4 layers, $d_\text{model} = 128$, 4 heads, ELU+1 features with sum
                normalisation and the delta rule, in pre-LN blocks with learned positions,
                $\mathcal N(0, 0.02^2)$ embeddings, GELU and residual projections scaled by
                $1/\sqrt{2L}$ (the `ModelConfig` defaults); AdamW $10^{-3}$ with 100 warmup steps
                and cosine decay to $10^{-4}$, weight decay 0.1 on matrices, $\beta_2 = 0.99$,
                clipping at 1, no dropout; batches of `BATCH` windows of `SEGMENT` characters at
                random offsets. On 2 CPU cores the full run takes about 5 minutes and reaches
                about 1.7 nats/char on the validation split (see `experiments/README.md`:
                softmax attention and the other variants under the same recipe, with seeds).
                """
            ),
        ),
        (
            code,
            _src(
                """
                config = TrainConfig(
                    task="lm",
                    lm=LMTaskConfig(
                        model=ModelConfig(
                            d_model=D_MODEL, num_layers=LAYERS, num_heads=HEADS, d_ff=D_FF,
                            max_len=SEGMENT,
                            fast_weight=FastWeightConfig(
                                feature_map=FeatureMap("elu_p1"),
                                normalization=Normalization.SUM,
                                update_rule=UpdateRule.DELTA,
                            ),
                        ),
                        dataset="text_file",
                        tokenizer="char",
                        text_path=TEXT_PATH,
                        segment_len=SEGMENT,
                        sampling="random_windows",
                    ),
                    steps=STEPS,
                    batch_size=BATCH,
                    eval_every=max(STEPS // 8, 1),
                    eval_batches=8,
                    log_every=max(STEPS // 40, 1),
                    progress_bar=False,
                    optimizer=OptimizerConfig(
                        kind="adamw", learning_rate=1e-3, warmup_steps=min(100, STEPS // 5),
                        final_lr_fraction=0.1, b2=0.99, weight_decay=0.1, clip_norm=1.0,
                    ),
                    checkpoint=CheckpointConfig(every_steps=STEPS, keep=1),
                )
                workdir = Path(tempfile.mkdtemp(prefix="fwjax_delta_lm_"))
                summary = train(config, workdir)
                """
            ),
        ),
        (
            code,
            _src(
                """
                records = read_metrics(workdir)
                train_rec = [r for r in records if r["split"] == "train"]
                eval_rec = [r for r in records if r["split"] == "eval"]
                plt.plot([r["step"] for r in train_rec], [r["loss"] for r in train_rec],
                         label="train")
                plt.plot([r["step"] for r in eval_rec], [r["loss"] for r in eval_rec], "o-",
                         label="validation")
                plt.xlabel("step")
                plt.ylabel("nats per character")
                plt.title("Learning curve")
                plt.legend()
                plt.show()
                print("final validation:", summary["eval"])
                """
            ),
        ),
        (
            md,
            _src(
                """
                ## 2. Sample

                `fwjax.train.loop.Run` restores the last checkpoint and holds the character
                vocabulary (`run.task.tokenizer`). When a prompt and its continuation fit the
                model's `SEGMENT` learned positions, `generate` processes the prompt in parallel
                and decodes one token per step from the carried fast weights; here they do not,
                so it predicts each character from the last `SEGMENT` characters at most,
                recomputed, as nanoGPT does.
                """
            ),
        ),
        (
            code,
            _src(
                """
                run = Run(config, workdir)
                run.checkpointer.close()
                model = run.model()
                tokenizer = run.task.tokenizer
                prompt = "ROMEO:\\n" if TEXT_PATH else "the old king "
                tokens = generate(model, jax.numpy.asarray(tokenizer.encode(prompt))[None],
                                  SAMPLE_TOKENS, key=jax.random.key(0), temperature=0.8)
                print(tokenizer.decode(np.asarray(tokens[0])))
                """
            ),
        ),
        (
            md,
            _src(
                r"""
                ## 3. How much context the model uses

                The loss of every position of validation windows of `SEGMENT` characters
                (`fwjax.explain.per_position_loss`): the first character of a window is
                predicted from nothing, the last from `SEGMENT − 1` characters of context. How
                fast the curve falls and where it flattens shows how much of its context the
                fast weight memory has learned to use.
                """
            ),
        ),
        (
            code,
            _src(
                """
                valid = np.asarray(run.task.valid_tokens)
                rows = min(64, (len(valid) - 1) // SEGMENT)
                starts = np.arange(rows) * SEGMENT
                x = valid[starts[:, None] + np.arange(SEGMENT)]
                y = valid[starts[:, None] + np.arange(SEGMENT) + 1]
                curve = explain.per_position_loss(model, x, y, segment_len=SEGMENT, carry=False)
                plt.plot(np.arange(SEGMENT), curve)
                plt.xlabel("position in the window (characters of context)")
                plt.ylabel("nats per character")
                plt.title(f"Validation loss by position ({rows} windows)")
                plt.show()
                print(f"position 0: {curve[0]:.3f} nats; last 8 positions: {curve[-8:].mean():.3f}")
                """
            ),
        ),
    ]


NOTEBOOKS = {NB01: notebook_01, NB02: notebook_02, NB03: notebook_03}


def build(filename: str) -> nbformat.NotebookNode:
    """The notebook ``filename`` (a key of :data:`NOTEBOOKS`), without outputs, with stable
    cell ids (``<number>-<index>``)."""
    prefix = filename.split("_")[0]
    cells = []
    for i, (kind, source) in enumerate(NOTEBOOKS[filename]()):
        make = new_markdown_cell if kind == "markdown" else new_code_cell
        cells.append(make(source, id=f"c{prefix}-{i:02d}"))
    nb = new_notebook(cells=cells, metadata=METADATA)
    nbformat.validate(nb)
    return nb


def render(filename: str) -> str:
    """The file contents of the built notebook."""
    return nbformat.writes(build(filename)) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args(argv)
    stale = []
    for filename in NOTEBOOKS:
        path = NOTEBOOK_DIR / filename
        text = render(filename)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(filename)
        else:
            path.write_text(text, encoding="utf-8")
            print("wrote", path)
    if stale:
        print("stale (run python notebooks/build.py):", ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
