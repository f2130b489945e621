"""Language modelling on Tiny Shakespeare (char level): the paper's attention variants compared
under a standard small-LM recipe, with seeds; resumable.

::

    python -m experiments.lm configs                  # (re)write the TOML configs
    python -m experiments.lm run --budget small --seeds 0,1,2 [--variants softmax,delta]
    python -m experiments.lm run --budget long --seeds 0 --variants softmax,delta,linear
    python -m experiments.lm report                   # redraw table and plot from the JSONs
    python -m experiments.lm time [--steps 6]         # seconds per training step, per variant

``configs`` writes, for every variant,

* ``shakespeare_char_{variant}.toml``: the reference recipe at the budget of nanoGPT's
  char-level "baby" Shakespeare model (4 layers, 4 heads, d 128, context 64, batch 12, 2000
  steps ≈ 1.5M tokens; AdamW 1e-3 → 1e-4 cosine after 100 warmup steps, weight decay 0.1 on
  matrices, β₂ 0.99, clip 1.0; no dropout; pre-LN, learned positions, embeddings N(0, 0.02²),
  GELU, residual projections scaled by 1/√(2L); random training windows);
* ``shakespeare_char_long_{variant}.toml``: the same model at context 256, batch 16, 1200 steps
  (≈ 4.9M tokens); ``shakespeare_char_long_rotary_{variant}.toml`` the same with rotary
  positions in softmax layers (and none in fast weight layers) instead of learned ones;
* ``tinyshakespeare_{variant}.toml``: the paper's Transformer-XL-style recipe at CPU scale
  (post-LN, dropout 0.1, N(0, 1)·√d embeddings, Adam, clip 0.25; fast weight variants carry
  their memory across segments with no positions) — kept as an explicit config;
* ``wt103_{small,medium}_{variant}.toml``: the paper's WikiText-103 settings (paper recipe).

``run`` trains every (variant, seed) of a budget with ``fwjax train`` in its own workdir
``RUNS/{budget}/{variant}_s{seed}`` (a subprocess each; seed 0 of every variant first), then
evaluates it over the whole validation split: independent segments of the training context
(``val_loss_nats`` / ``val_bpc``, the number compared), a sliding window (stride T/2) and, for
fast weight variants, the memory carried across the whole split as one stream
(``carried_val_bpc``). Each finished run is one JSON under
``experiments/results/lm/{budget}/``; after each, ``experiments/results/lm_tinyshakespeare.csv``
(one row per seed), ``.md`` (mean ± std per variant) and ``.png`` (learning curves) are
rewritten from all JSONs. Re-running skips finished runs and resumes an unfinished one from its
last checkpoint.

Variants:

* ``softmax``: softmax attention.
* ``linear``: ELU+1, sum rule, attention normalisation (Katharopoulos et al., 2020).
* ``performer``: FAVOR+ (m = 16, redrawn every training step), sum rule, attention normalisation.
* ``delta``: ELU+1, sum normalisation, delta rule, no attention normalisation.
* ``delta_dpfp2``: DPFP-2, sum normalisation, delta rule.
* ``delta_favor``: FAVOR+ (m = 16), sum normalisation, delta rule.
* ``delta_attention`` / ``delta_l2`` / ``delta_centered_l2``: the delta network with attention,
  L2 (DeltaNet, 2024) or centred L2 (fwjax's own) key/query normalisation.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from fwjax.train.config_io import to_toml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "fwjax" / "configs"
RESULTS = ROOT / "experiments" / "results"
CSV_PATH = RESULTS / "lm_tinyshakespeare.csv"
COLUMNS = [
    "budget",
    "model",
    "params",
    "steps",
    "tokens",
    "seed",
    "val_loss_nats",
    "val_bpc",
    "carried_val_bpc",
    "seconds",
]
TEXT_PATH = "../shared/data/tinyshakespeare/input.txt"


def _fast_weight(feature_map: dict, update_rule: str, normalization: str, **extra) -> dict:
    """An ``[lm.model.fast_weight]`` table (keys in the order the configs write them)."""
    return dict(
        feature_map=feature_map, update_rule=update_rule, normalization=normalization, **extra
    )


ELU = dict(kind="elu_p1")
FAVOR = dict(kind="favor_plus", num_features=16)  # redrawn every step (favor_redraw below)
# variant -> (description, [lm.model.fast_weight] table or None for softmax)
VARIANTS: dict[str, tuple[str, dict | None]] = {
    "softmax": ("Transformer (softmax attention)", None),
    "linear": (
        "Linear Transformer: ELU+1, sum rule, attention normalisation",
        _fast_weight(ELU, "sum", "attention"),
    ),
    "performer": (
        "Performer: FAVOR+ (m = 16, redrawn every step), sum rule, attention normalisation",
        _fast_weight(FAVOR, "sum", "attention", favor_redraw="per_step"),
    ),
    "delta": (
        "Delta Network: ELU+1, sum normalisation, delta rule",
        _fast_weight(ELU, "delta", "sum"),
    ),
    "delta_dpfp2": (
        "Delta Network with DPFP-2: sum normalisation, delta rule",
        _fast_weight(dict(kind="dpfp", nu=2), "delta", "sum"),
    ),
    "delta_favor": (
        "Delta Network with FAVOR+ (m = 16, redrawn every step): sum normalisation, delta rule",
        _fast_weight(FAVOR, "delta", "sum", favor_redraw="per_step"),
    ),
    # The normalisation study (experiments/normalisation.py; beyond the paper): the delta
    # network above with its key/query normalisation swapped.
    "delta_attention": (
        "Normalisation study: ELU+1, delta rule, attention normalisation",
        _fast_weight(ELU, "delta", "attention"),
    ),
    "delta_l2": (
        "Normalisation study: ELU+1, delta rule, L2 normalisation (DeltaNet, 2024)",
        _fast_weight(ELU, "delta", "l2"),
    ),
    "delta_centered_l2": (
        "Normalisation study: ELU+1, delta rule, centred L2 normalisation (fwjax's own)",
        _fast_weight(ELU, "delta", "centered_l2"),
    ),
}
# The paper's six variants (the reproduction); the rest are the normalisation study's.
PAPER_VARIANTS = ("softmax", "linear", "performer", "delta", "delta_dpfp2", "delta_favor")
# The variants compared under the reference recipe.
RECIPE_VARIANTS = (*PAPER_VARIANTS, "delta_l2", "delta_centered_l2")

# The paper's WikiText-103 settings (Sec. 6.2 / App. B.2).
WT103 = {
    "small": dict(d_model=128, segment_len=256, batch_size=96),
    "medium": dict(d_model=256, segment_len=384, batch_size=56),
}
# The paper's recipe at CPU scale (the earlier Tiny Shakespeare reproduction).
TS = dict(d_model=128, num_layers=4, num_heads=8, d_ff=512, segment_len=256, batch_size=8)
TS_STEPS = 1200

# The reference recipe's budgets: nanoGPT's baby Shakespeare model (small) and a longer context.
BUDGETS = {
    "small": dict(prefix="shakespeare_char", segment_len=64, batch_size=12, steps=2000),
    "long": dict(prefix="shakespeare_char_long", segment_len=256, batch_size=16, steps=1200),
    # The long budget with rotary positions in softmax layers (fast weight layers: none).
    "long_rotary": dict(
        prefix="shakespeare_char_long_rotary",
        segment_len=256,
        batch_size=16,
        steps=1200,
        positional="rotary",
    ),
}
RECIPE_MODEL = dict(d_model=128, num_layers=4, num_heads=4, d_ff=512)
# The paper's Transformer-XL-style model options, written out in its configs.
PAPER_MODEL = dict(
    norm_position="post",
    embed_init_std=1.0,
    embed_scale=True,
    activation="relu",
    scale_residual_init=False,
    dropout=0.1,
)


def _config_text(
    header: str,
    top: dict,
    lm: dict,
    model: dict,
    fw: dict | None,
    opt: dict,
    checkpoint: dict | None = None,
) -> str:
    """``header`` (comment lines), a blank line and the TOML of the config's tables."""
    if fw is not None:
        model = {**model, "fast_weight": fw}
    data = {**top, "lm": {**lm, "model": model}, "optimizer": opt}
    if checkpoint is not None:
        data["checkpoint"] = checkpoint
    return header + "\n" + to_toml(data, inline=("feature_map",))


def _run_keys(
    steps: int, batch_size: int, eval_every: int, eval_batches: int, log_every: int, **extra
) -> dict:
    """The top-level keys of an LM config (seed 0), in the order the configs write them."""
    return dict(
        task="lm",
        steps=steps,
        batch_size=batch_size,
        seed=0,
        eval_every=eval_every,
        eval_batches=eval_batches,
        log_every=log_every,
        **extra,
    )


def _softmax_kinds(variant: str, model: dict) -> dict:
    if VARIANTS[variant][1] is None:
        model["layer_kinds"] = ["softmax"] * model["num_layers"]
    return model


def _paper_model(variant: str, *, d_model, num_layers, num_heads, d_ff, positional) -> dict:
    model = dict(
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        d_ff=d_ff,
        positional=positional,
        **PAPER_MODEL,
    )
    return _softmax_kinds(variant, model)


def recipe_config(variant: str, budget: str = "small") -> str:
    """The TOML text of the reference recipe's config of ``variant`` at ``budget``."""
    desc, fw = VARIANTS[variant]
    b = BUDGETS[budget]
    t = b["segment_len"]
    tokens = b["steps"] * b["batch_size"] * t
    header = (
        f"# Tiny Shakespeare (char level), reference small-LM recipe, {budget} budget: {desc}.\n"
        f"# {b['steps']} steps × {b['batch_size']} × {t} tokens ≈ {tokens / 1e6:.2f}M tokens; "
        f"nanoGPT's baby model recipe (pre-LN, {b.get('positional', 'learned')} positions,\n"
        "# N(0, 0.02²) embeddings, GELU, AdamW 1e-3 → 1e-4, weight decay 0.1, no dropout), "
        "random training windows.\n"
        "# Unlike nanoGPT: an untied output layer, feed-forward biases, LeCun-normal "
        "projections.\n"
        "# Written by `python -m experiments.lm configs`; results: `python -m experiments.lm run "
        f"--budget {budget}`.\n"
    )
    top = _run_keys(b["steps"], b["batch_size"], 250, 8, 50, progress_bar=False)
    lm = dict(
        dataset="text_file",
        tokenizer="char",
        text_path=TEXT_PATH,
        validation_fraction=0.1,
        segment_len=t,
        sampling="random_windows",
        carry_state=False,
        eval_stride=t // 2,
    )
    model = _softmax_kinds(
        variant,
        dict(
            **RECIPE_MODEL,
            max_len=t,
            positional=b.get("positional", "learned"),
            norm_position="pre",
            embed_init_std=0.02,
            embed_scale=False,
            activation="gelu",
            scale_residual_init=True,
            dropout=0.0,
        ),
    )
    opt = dict(
        kind="adamw",
        learning_rate=1e-3,
        warmup_steps=100,
        schedule="cosine",
        final_lr_fraction=0.1,
        b1=0.9,
        b2=0.99,
        weight_decay=0.1,
        clip_norm=1.0,
    )
    return _config_text(header, top, lm, model, fw, opt, dict(every_steps=500, keep=2))


def tinyshakespeare_config(variant: str, steps: int = TS_STEPS) -> str:
    """The TOML text of the paper-recipe Tiny Shakespeare config of ``variant``."""
    desc, fw = VARIANTS[variant]
    fast = fw is not None
    header = (
        f"# Tiny Shakespeare (char level), the paper's Transformer-XL-style recipe: {desc}.\n"
        "# Written by `python -m experiments.lm configs`. Fast weight variants carry their "
        "memory across\n# segments and use no positions. The reference recipe is "
        "shakespeare_char_*.\n"
    )
    top = _run_keys(steps, TS["batch_size"], 250, 4, 25, progress_bar=False)
    lm = dict(
        dataset="local_text",
        tokenizer="char",
        text_path=TEXT_PATH,
        data_dir="runs/tfds",
        validation_fraction=0.1,
        segment_len=TS["segment_len"],
        carry_state=fast,
        eval_stride=TS["segment_len"] // 2,
    )
    model = _paper_model(
        variant,
        d_model=TS["d_model"],
        num_layers=TS["num_layers"],
        num_heads=TS["num_heads"],
        d_ff=TS["d_ff"],
        positional="none" if fast else "sinusoidal",
    )
    opt = dict(
        kind="adam",
        learning_rate=1e-3,
        warmup_steps=100,
        schedule="cosine",
        clip_norm=0.25,
    )
    return _config_text(header, top, lm, model, fw, opt)


def wt103_config(size: str, variant: str) -> str:
    """The TOML text of the paper's WikiText-103 ``size`` (small/medium) config of ``variant``."""
    desc, fw = VARIANTS[variant]
    s = WT103[size]
    header = (
        f"# WikiText-103 (word level), the paper's {size} setting: {desc}.\n"
        "# 16 layers, 8 heads, d_ff 2048, Adam 2.5e-4 (2k warmup, cosine), clip 0.25, dropout "
        "0.1.\n# Full softmax output (no adaptive softmax/input; see experiments/README.md).\n"
        "# Written by `python -m experiments.lm configs`. Needs the data extra; set "
        "lm.manual_dir to a folder\n# holding wiki.*.tokens (or the zip) when offline.\n"
    )
    top = _run_keys(120_000 if size == "small" else 400_000, s["batch_size"], 4000, 16, 200)
    lm = dict(
        dataset="wikitext103",
        tokenizer="word",
        segment_len=s["segment_len"],
        carry_state=False,
        eval_stride=s["segment_len"] // 2,
    )
    model = _paper_model(
        variant,
        d_model=s["d_model"],
        num_layers=16,
        num_heads=8,
        d_ff=2048,
        positional="sinusoidal",
    )
    opt = dict(
        kind="adam", learning_rate=2.5e-4, warmup_steps=2000, schedule="cosine", clip_norm=0.25
    )
    return _config_text(header, top, lm, model, fw, opt, dict(every_steps=4000, keep=2))


def write_configs() -> list[Path]:
    """Writes every config of every variant; returns their paths."""
    paths = []
    for variant in VARIANTS:
        texts = {f"tinyshakespeare_{variant}": tinyshakespeare_config(variant)}
        for budget, b in BUDGETS.items():
            texts[f"{b['prefix']}_{variant}"] = recipe_config(variant, budget)
        for size in WT103 if variant in PAPER_VARIANTS else ():
            texts[f"wt103_{size}_{variant}"] = wt103_config(size, variant)
        for name, text in texts.items():
            path = CONFIGS / f"{name}.toml"
            path.write_text(text)
            paths.append(path)
    return paths


# -- timing -----------------------------------------------------------------------------------


def time_steps(config_name: str, steps: int, overrides: list[str]) -> float:
    """Median seconds per training step of a config (after two compile/warm-up steps)."""
    import tempfile

    import jax

    from fwjax.cli import load_train_config
    from fwjax.train.loop import Run

    config = load_train_config(config_name, overrides)
    with tempfile.TemporaryDirectory() as workdir:
        run = Run(config, workdir)
        times = []
        for step in range(steps + 2):
            t0 = time.perf_counter()
            run.state, metrics = run.train_step(run.state, run.batch(step))
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        run.checkpointer.close()
    return sorted(times[2:])[len(times[2:]) // 2]


# -- the comparison -------------------------------------------------------------------------------


def _fwjax(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fwjax.cli", *args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)


def _count_params(workdir: Path) -> int:
    import jax

    from fwjax.train import Run

    run = Run.restore(workdir)
    run.checkpointer.close()
    return int(sum(x.size for x in jax.tree.leaves(run.state.params)))


def _eval(workdir: Path, mode: str, *extra: str) -> dict:
    out = _fwjax("eval", "--workdir", str(workdir), "--mode", mode, *extra)
    return json.loads(out.stdout.strip().splitlines()[-1])


def result_path(budget: str, variant: str, seed: int) -> Path:
    return RESULTS / "lm" / budget / f"{variant}_s{seed}.json"


def run_one(budget: str, variant: str, seed: int, runs: Path, overrides: list[str]) -> dict:
    """Trains (or resumes) and evaluates one (budget, variant, seed); returns its record."""
    name = f"{BUDGETS[budget]['prefix']}_{variant}"
    workdir = runs / budget / f"{variant}_s{seed}"
    sets = [a for o in [f"seed={seed}", *overrides] for a in ("--set", o)]
    t0 = time.time()
    _fwjax("train", "--config", name, "--workdir", str(workdir), *sets)
    config = json.loads((workdir / "config.json").read_text())
    steps = config["steps"]
    tokens_per_step = config["batch_size"] * config["lm"]["segment_len"]
    train_seconds = _train_seconds(workdir, tokens_per_step)
    print(f"{name} seed {seed}: trained ({train_seconds:.0f} s in training steps)", flush=True)
    segments = _eval(workdir, "segments")
    sliding = _eval(workdir, "sliding")
    carried = None
    if VARIANTS[variant][1] is not None and config["lm"]["model"]["positional"] != "learned":
        carried = _eval(workdir, "carried", "--streams", "1")
    result = dict(
        budget=budget,
        config=name,
        model=variant,
        description=VARIANTS[variant][0],
        params=_count_params(workdir),
        steps=steps,
        tokens=steps * tokens_per_step,
        seed=seed,
        val_loss_nats=segments["loss"],
        val_bpc=segments["bpc"],
        carried_val_bpc=None if carried is None else carried["bpc"],
        seconds=round(train_seconds, 1),
        eval=dict(segments=segments, sliding=sliding, carried=carried),
        curve=_curve(workdir),
        wall_seconds_this_invocation=round(time.time() - t0, 1),
    )
    path = result_path(budget, variant, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def _train_seconds(workdir: Path, tokens_per_step: int) -> float:
    """Seconds spent in training steps, from the logged throughput of every logged interval
    (each step counted once even if a resumed run repeated it; compilation, evaluation and
    checkpointing excluded)."""
    intervals: dict[int, float] = {}
    last_step = 0
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("split") != "train":
            continue
        steps = rec["step"] - last_step if rec["step"] > last_step else None
        if steps and rec.get("tokens_per_s"):
            intervals[rec["step"]] = steps * tokens_per_step / rec["tokens_per_s"]
        last_step = rec["step"]
    return sum(intervals.values())


def _curve(workdir: Path) -> dict:
    """``{"train": [[step, loss], ...], "eval": [[step, loss], ...]}`` from ``metrics.jsonl``."""
    curve: dict[str, list] = {"train": [], "eval": []}
    seen: dict[str, set] = {"train": set(), "eval": set()}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        split = rec.get("split") or rec.get("kind")
        if split in curve and "loss" in rec and rec["step"] not in seen[split]:
            seen[split].add(rec["step"])
            curve[split].append([rec["step"], rec["loss"]])
    return curve


def _set_results(folder: Path) -> None:
    global RESULTS, CSV_PATH
    RESULTS, CSV_PATH = folder, folder / "lm_tinyshakespeare.csv"
    folder.mkdir(parents=True, exist_ok=True)


def load_results() -> list[dict]:
    """Every finished run's record, budgets in order, then variants, then seeds."""
    order = {v: i for i, v in enumerate(VARIANTS)}
    out = []
    for budget in BUDGETS:
        for path in (RESULTS / "lm" / budget).glob("*.json"):
            out.append(json.loads(path.read_text()))
    return sorted(
        out, key=lambda r: (list(BUDGETS).index(r["budget"]), order[r["model"]], r["seed"])
    )


def _fmt(x, digits=4):
    return "" if x is None else f"{x:.{digits}f}"


def _mean_std(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.3f} ± {std:.3f}"


def write_report() -> None:
    """Rewrites the CSV (one row per run), the table (mean ± sample std over seeds per budget and
    variant) and the learning-curve plot from the per-run JSONs."""
    results = load_results()
    if not results:
        return
    with open(CSV_PATH, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in results:
            row = {k: r[k] for k in COLUMNS}
            for k in ("val_loss_nats", "val_bpc", "carried_val_bpc"):
                row[k] = _fmt(row[k])
            writer.writerow(row)
    lines = [
        "Validation loss over the whole 10 % split in independent segments of the training "
        "context (nats/char; mean ± sample std over seeds). Sliding: windows of the context "
        "every T/2 chars. Carried: the fast weights carried across the whole split as one stream "
        "(bits/char).",
        "",
        "| budget | model | params | tokens | seeds | val loss (nats) | val bpc | sliding bpc | "
        "carried bpc | train s / run |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["budget"], r["model"]), []).append(r)
    ranked = sorted(
        groups.items(),
        key=lambda kv: (
            list(BUDGETS).index(kv[0][0]),
            sum(r["val_loss_nats"] for r in kv[1]) / len(kv[1]),
        ),
    )
    for (budget, model), rs in ranked:
        carried = [r["carried_val_bpc"] for r in rs if r["carried_val_bpc"] is not None]
        lines.append(
            f"| {budget} | {model} | {rs[0]['params']:,} | {rs[0]['tokens']:,} | {len(rs)} | "
            f"{_mean_std([r['val_loss_nats'] for r in rs])} | "
            f"{_mean_std([r['val_bpc'] for r in rs])} | "
            f"{_mean_std([r['eval']['sliding']['bpc'] for r in rs])} | "
            f"{_mean_std(carried) if carried else '—'} | "
            f"{sum(r['seconds'] for r in rs) / len(rs):.0f} |"
        )
    baselines = sorted((RESULTS / "lm" / "nanogpt").glob("s*.json"))
    if baselines:
        rs = [json.loads(p.read_text()) for p in baselines]
        lines += [
            "",
            f"Baseline beside it: nanoGPT (commit {rs[0]['nanogpt_commit']}, PyTorch) baby "
            "model, its own recipe and data order, scored the same way "
            "(`python -m experiments.nanogpt_baseline`):",
            "",
            "| model | params | tokens | seeds | val loss (nats) |",
            "|---|---:|---:|---:|---:|",
            f"| nanogpt_baby | {rs[0]['params']:,} | {rs[0]['tokens']:,} | {len(rs)} | "
            f"{_mean_std([r['val_loss_nats'] for r in rs])} |",
        ]
    CSV_PATH.with_suffix(".md").write_text("\n".join(lines) + "\n")

    plot_curves(results, CSV_PATH.with_suffix(".png"))


def plot_curves(results: list[dict], path: Path) -> None:
    """Validation loss during training against training tokens, one panel per budget (records
    without one: ``"paper recipe"``), one colour per variant in every panel; the line is the
    mean over seeds, the band their range. One legend under the panels."""
    import numpy as np

    from experiments.plotting import MAX_WIDTH_IN, legend_below, style

    order = list(VARIANTS)
    panels: dict[str, dict[str, list[dict]]] = {}
    for r in sorted(results, key=lambda r: order.index(r["model"])):
        if r["curve"]["eval"]:
            budget = r.get("budget", "the paper's recipe: T = 256")
            panels.setdefault(budget, {}).setdefault(r["model"], []).append(r)
    if not panels:
        return
    with style() as plt:
        colors = dict(zip(VARIANTS, plt.get_cmap("tab10").colors, strict=False))
        width = min(MAX_WIDTH_IN, max(7.5, 4.5 * len(panels)))
        fig, axes = plt.subplots(
            1, len(panels), figsize=(width, 4.6), sharey=True, squeeze=False, layout="constrained"
        )
        for ax, (budget, models) in zip(axes[0], panels.items(), strict=True):
            for model, rs in models.items():
                steps = sorted(set.intersection(*({s for s, _ in r["curve"]["eval"]} for r in rs)))
                ys = np.asarray([[dict(r["curve"]["eval"])[s] for s in steps] for r in rs])
                tokens = np.asarray(steps) * rs[0]["tokens"] / rs[0]["steps"] / 1e6
                ax.plot(tokens, ys.mean(0), color=colors[model], label=model)
                if len(rs) > 1:
                    ax.fill_between(tokens, ys.min(0), ys.max(0), color=colors[model], alpha=0.2)
            seeds = max(len(rs) for rs in models.values())
            title = budget
            if budget in BUDGETS:
                title = f"{budget}: T = {BUDGETS[budget]['segment_len']}"
            ax.set_title(title + (f", {seeds} seeds" if seeds > 1 else ""))
            ax.set_xlabel("training tokens (millions)")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("validation loss (nats/char)")
        axes[0][0].set_ylim(1.3, 2.8)
        legend_below(fig, axes[0], ncol=5 if len(panels) > 1 else 3)
        fig.savefig(path)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("configs", help="write the TOML configs")
    p = sub.add_parser("time", help="seconds per training step of each variant")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--budget", choices=list(BUDGETS), default="small")
    p.add_argument("--variants", default=",".join(RECIPE_VARIANTS))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p = sub.add_parser("run", help="train and evaluate (budget, variant, seed) runs; resumable")
    p.add_argument("--budget", choices=list(BUDGETS), default="small")
    p.add_argument("--variants", default=",".join(RECIPE_VARIANTS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--runs", default="runs/lm_recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--results", default=str(RESULTS), help="results folder (tests: a tmp dir)")
    p = sub.add_parser("report", help="redraw the CSV, table and plot from the per-run JSONs")
    p.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.command == "configs":
        for path in write_configs():
            print(path.relative_to(ROOT))
        return 0
    if args.command == "report":
        _set_results(Path(args.results).absolute())
        write_report()
        # The paper-recipe reproduction's records (one run per variant, no budget) sit directly
        # in lm/ (results/lm_paper_recipe): only their plot is redrawn.
        earlier = [json.loads(p.read_text()) for p in sorted((RESULTS / "lm").glob("*.json"))]
        if earlier:
            plot_curves(earlier, CSV_PATH.with_suffix(".png"))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; valid: {list(VARIANTS)}")
    prefix = BUDGETS[args.budget]["prefix"]
    if args.command == "time":
        for v in variants:
            seconds = time_steps(f"{prefix}_{v}", args.steps, args.set)
            print(f"{prefix}_{v}: {seconds:.3f} s/step", flush=True)
        return 0
    os.chdir(ROOT)
    _set_results(Path(args.results).absolute())
    runs = Path(args.runs)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    for seed in seeds:  # every variant's first seed before any second seed
        for variant in variants:
            if result_path(args.budget, variant, seed).is_file():
                print(f"{prefix}_{variant} seed {seed}: finished, skipped", flush=True)
                continue
            try:
                result = run_one(args.budget, variant, seed, runs, args.set)
            except subprocess.CalledProcessError as e:
                print(f"{variant} seed {seed}: FAILED\n{e.stdout[-2000:]}\n{e.stderr[-4000:]}")
                continue
            write_report()
            print(f"{variant} seed {seed}: {json.dumps({k: result[k] for k in COLUMNS})}")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
