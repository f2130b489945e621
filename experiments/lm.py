"""Language modelling: the paper's six attention variants (Schlag et al., 2021), resumable.

::

    python -m experiments.lm configs                  # (re)write the TOML configs
    python -m experiments.lm time [--steps 6]         # seconds per training step, per variant
    python -m experiments.lm run --steps N [--variants delta,linear] [--runs runs/lm_ts]

``configs`` writes ``experiments/configs/tinyshakespeare_{variant}.toml`` (the CPU-scale
reproduction) and ``wt103_{small,medium}_{variant}.toml`` (the paper's WikiText-103 settings).

``run`` trains every variant of the Tiny Shakespeare reproduction with ``fwjax train`` in its own
workdir ``RUNS/{variant}`` (a subprocess each; Orbax checkpoints every ``--ckpt-every`` steps),
then evaluates it over the whole validation split: independent segments (``val_bpc``), fast
weights carried across the whole split as one stream (``carry_eval_bpc``, fast weight variants)
and a sliding window (stride T/2). A finished variant's row is appended to
``experiments/results/lm_tinyshakespeare.csv`` (and its JSON to
``experiments/results/lm/{variant}.json``); then the table (``.md``) and the learning curves
(``.png``) are redrawn (and, with ``--commit``, those files alone are committed). Re-running
the same command skips finished variants and resumes an unfinished one from its last checkpoint
(``fwjax train`` resumes by itself).

Variants (all: post-LN Transformer blocks, ReLU feed-forward, dropout 0.1):

* ``softmax``: softmax attention, sinusoidal positions.
* ``linear``: ELU+1, sum rule, attention normalisation (Katharopoulos et al., 2020).
* ``performer``: FAVOR+ (m = 16, redrawn every training step), sum rule, attention normalisation.
* ``delta``: ELU+1, sum normalisation, delta rule, no attention normalisation.
* ``delta_dpfp2``: DPFP-2, sum normalisation, delta rule.
* ``delta_favor``: FAVOR+ (m = 16), sum normalisation, delta rule.

and, for the normalisation study (``experiments/normalisation.py``), the ``delta`` variant with
attention (``delta_attention``), L2 (``delta_l2``) or centred L2 (``delta_centered_l2``)
normalisation; ``run`` trains the paper's six unless ``--variants`` names others.

In the Tiny Shakespeare reproduction the fast weight variants are trained with their memory
carried across the segments of each stream (``carry_state``) and no positional encoding; the
WikiText-103 configs follow the paper (independent segments, positions everywhere).
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

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs"
RESULTS = ROOT / "experiments" / "results"
CSV_PATH = RESULTS / "lm_tinyshakespeare.csv"
COLUMNS = [
    "model",
    "params",
    "steps",
    "tokens",
    "val_loss_nats",
    "val_bpc",
    "carry_eval_bpc",
    "seconds",
]
TEXT_PATH = "../shared/data/tinyshakespeare/input.txt"

# variant -> (description, [lm.model.fast_weight] table or None for softmax)
VARIANTS: dict[str, tuple[str, dict | None]] = {
    "softmax": ("Transformer (softmax attention)", None),
    "linear": (
        "Linear Transformer: ELU+1, sum rule, attention normalisation",
        dict(feature_map='{ kind = "elu_p1" }', update_rule="sum", normalization="attention"),
    ),
    "performer": (
        "Performer: FAVOR+ (m = 16, redrawn every step), sum rule, attention normalisation",
        dict(
            feature_map='{ kind = "favor_plus", num_features = 16 }',
            update_rule="sum",
            normalization="attention",
            favor_redraw="per_step",
        ),
    ),
    "delta": (
        "Delta Network: ELU+1, sum normalisation, delta rule",
        dict(feature_map='{ kind = "elu_p1" }', update_rule="delta", normalization="sum"),
    ),
    "delta_dpfp2": (
        "Delta Network with DPFP-2: sum normalisation, delta rule",
        dict(feature_map='{ kind = "dpfp", nu = 2 }', update_rule="delta", normalization="sum"),
    ),
    "delta_favor": (
        "Delta Network with FAVOR+ (m = 16, redrawn every step): sum normalisation, delta rule",
        dict(
            feature_map='{ kind = "favor_plus", num_features = 16 }',
            update_rule="delta",
            normalization="sum",
            favor_redraw="per_step",
        ),
    ),
    # The normalisation study (experiments/normalisation.py; beyond the paper): the delta
    # network above with its key/query normalisation swapped.
    "delta_attention": (
        "Normalisation study: ELU+1, delta rule, attention normalisation",
        dict(feature_map='{ kind = "elu_p1" }', update_rule="delta", normalization="attention"),
    ),
    "delta_l2": (
        "Normalisation study: ELU+1, delta rule, L2 normalisation (DeltaNet, 2024)",
        dict(feature_map='{ kind = "elu_p1" }', update_rule="delta", normalization="l2"),
    ),
    "delta_centered_l2": (
        "Normalisation study: ELU+1, delta rule, centred L2 normalisation (fwjax's own)",
        dict(feature_map='{ kind = "elu_p1" }', update_rule="delta", normalization="centered_l2"),
    ),
}
# The paper's six variants (the reproduction; the others are the normalisation study's).
PAPER_VARIANTS = ("softmax", "linear", "performer", "delta", "delta_dpfp2", "delta_favor")

# The paper's WikiText-103 settings (Sec. 6.2 / App. B.2).
WT103 = {
    "small": dict(d_model=128, segment_len=256, batch_size=96),
    "medium": dict(d_model=256, segment_len=384, batch_size=56),
}
# The CPU-scale Tiny Shakespeare reproduction: every variant the same size and steps.
# Measured on one loaded core: 0.8-0.9 s per step at batch 8 × 256 (all variants), so 1200 steps
# take 16-18 minutes per variant.
TS = dict(d_model=128, num_layers=4, num_heads=8, d_ff=512, segment_len=256, batch_size=8)
TS_STEPS = 1200


def _quote(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and not value.startswith(("{", "[")):
        return f'"{value}"'
    return str(value)


def _table(name: str, values: dict) -> str:
    lines = [f"[{name}]"] + [f"{k} = {_quote(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def _config_text(header: str, top: dict, lm: dict, model: dict, fw: dict | None, opt: dict) -> str:
    parts = [header, "\n".join(f"{k} = {_quote(v)}" for k, v in top.items()) + "\n"]
    parts.append(_table("lm", lm))
    parts.append(_table("lm.model", model))
    if fw is not None:
        parts.append(_table("lm.model.fast_weight", fw))
    parts.append(_table("optimizer", opt))
    return "\n".join(parts)


def _model_table(variant: str, *, d_model, num_layers, num_heads, d_ff, positional) -> dict:
    model = dict(
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        d_ff=d_ff,
        dropout=0.1,
        positional=positional,
        norm_position="post",
    )
    if VARIANTS[variant][1] is None:
        model["layer_kinds"] = "[" + ", ".join(['"softmax"'] * num_layers) + "]"
    return model


def tinyshakespeare_config(variant: str, steps: int = TS_STEPS) -> str:
    """The TOML text of the Tiny Shakespeare reproduction config of ``variant``."""
    desc, fw = VARIANTS[variant]
    fast = fw is not None
    header = (
        f"# Tiny Shakespeare (char level), CPU-scale reproduction: {desc}.\n"
        "# Written by `python -m experiments.lm configs`; run all variants with `python -m "
        "experiments.lm run`.\n"
        "# Fast weight variants carry their memory across segments and use no positions.\n"
    )
    top = dict(
        task="lm",
        steps=steps,
        batch_size=TS["batch_size"],
        seed=0,
        eval_every=250,
        eval_batches=4,
        log_every=25,
        progress_bar=False,
    )
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
    model = _model_table(
        variant,
        d_model=TS["d_model"],
        num_layers=TS["num_layers"],
        num_heads=TS["num_heads"],
        d_ff=TS["d_ff"],
        positional=not fast,
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
    top = dict(
        task="lm",
        steps=120_000 if size == "small" else 400_000,
        batch_size=s["batch_size"],
        seed=0,
        eval_every=4000,
        eval_batches=16,
        log_every=200,
    )
    lm = dict(
        dataset="wikitext103",
        tokenizer="word",
        segment_len=s["segment_len"],
        carry_state=False,
        eval_stride=s["segment_len"] // 2,
    )
    model = _model_table(
        variant, d_model=s["d_model"], num_layers=16, num_heads=8, d_ff=2048, positional=True
    )
    opt = dict(
        kind="adam", learning_rate=2.5e-4, warmup_steps=2000, schedule="cosine", clip_norm=0.25
    )
    text = _config_text(header, top, lm, model, fw, opt)
    return text + "\n" + _table("checkpoint", dict(every_steps=4000, keep=2))


def write_configs() -> list[Path]:
    """Writes every Tiny Shakespeare config and the paper variants' WikiText-103 configs;
    returns their paths."""
    paths = []
    for variant in VARIANTS:
        path = CONFIGS / f"tinyshakespeare_{variant}.toml"
        path.write_text(tinyshakespeare_config(variant))
        paths.append(path)
        for size in WT103 if variant in PAPER_VARIANTS else ():
            path = CONFIGS / f"wt103_{size}_{variant}.toml"
            path.write_text(wt103_config(size, variant))
            paths.append(path)
    return paths


# -- timing -----------------------------------------------------------------------------------


def time_steps(variant: str, steps: int, overrides: list[str]) -> float:
    """Median seconds per training step of ``variant`` (after two compile/warm-up steps)."""
    import tempfile

    import jax

    from fwjax.cli import load_train_config
    from fwjax.train.loop import Run

    config = load_train_config(f"tinyshakespeare_{variant}", overrides)
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


# -- the reproduction ----------------------------------------------------------------------------


def _fwjax(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fwjax.cli", *args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)


def _finished() -> set[str]:
    if not CSV_PATH.is_file():
        return set()
    with open(CSV_PATH) as f:
        return {row["model"] for row in csv.DictReader(f)}


def _count_params(workdir: Path) -> int:
    import jax

    from fwjax.cli import _restored_run

    run = _restored_run(str(workdir))
    run.checkpointer.close()
    return int(sum(x.size for x in jax.tree.leaves(run.state.params)))


def _eval(workdir: Path, mode: str, *extra: str) -> dict:
    out = _fwjax("eval", "--workdir", str(workdir), "--mode", mode, *extra)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_variant(variant: str, runs: Path, steps: int, ckpt_every: int) -> dict:
    """Trains (or resumes) and evaluates one variant; returns its results row."""
    workdir = runs / variant
    overrides = [f"steps={steps}", f"checkpoint.every_steps={ckpt_every}", "checkpoint.keep=2"]
    sets = [a for o in overrides for a in ("--set", o)]
    t0 = time.time()
    _fwjax("train", "--config", f"tinyshakespeare_{variant}", "--workdir", str(workdir), *sets)
    config = json.loads((workdir / "config.json").read_text())
    tokens_per_step = config["batch_size"] * config["lm"]["segment_len"]
    train_seconds = _train_seconds(workdir, tokens_per_step)
    print(f"{variant}: trained ({train_seconds:.0f} s in training steps)", flush=True)
    segments = _eval(workdir, "segments")
    sliding = _eval(workdir, "sliding")
    carried = None
    if VARIANTS[variant][1] is not None:
        carried = _eval(workdir, "carried", "--streams", "1")
    tokens = steps * tokens_per_step
    result = dict(
        model=variant,
        description=VARIANTS[variant][0],
        params=_count_params(workdir),
        steps=steps,
        tokens=tokens,
        val_loss_nats=segments["loss"],
        val_bpc=segments["bpc"],
        carry_eval_bpc=None if carried is None else carried["bpc"],
        seconds=round(train_seconds, 1),
        eval=dict(segments=segments, sliding=sliding, carried=carried),
        curve=_curve(workdir),
        wall_seconds_this_invocation=round(time.time() - t0, 1),
    )
    (RESULTS / "lm").mkdir(parents=True, exist_ok=True)
    (RESULTS / "lm" / f"{variant}.json").write_text(json.dumps(result, indent=2))
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


def _commit(variant: str) -> None:
    """Commits only this experiment's result files (``git commit --only``: whatever else is
    staged in the shared checkout stays out of the commit); failures are reported, not fatal."""
    paths = [CSV_PATH, CSV_PATH.with_suffix(".md"), CSV_PATH.with_suffix(".png")]
    paths += sorted((RESULTS / "lm").glob("*.json"))
    rel = [str(p.relative_to(ROOT)) for p in paths if p.is_file()]
    for cmd in (
        ["git", "add", *rel],
        ["git", "commit", "-q", "--only", "-m", f"LM Tiny Shakespeare results: {variant}", *rel],
    ):
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            print(f"{' '.join(cmd[:3])} failed: {done.stderr.strip()}", flush=True)
            return


def _set_results(folder: Path) -> None:
    global RESULTS, CSV_PATH
    RESULTS, CSV_PATH = folder, folder / "lm_tinyshakespeare.csv"
    folder.mkdir(parents=True, exist_ok=True)


def append_row(result: dict) -> None:
    new = not CSV_PATH.is_file()
    with open(CSV_PATH, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        row = {k: result[k] for k in COLUMNS}
        for k in ("val_loss_nats", "val_bpc", "carry_eval_bpc"):
            row[k] = "" if row[k] is None else f"{row[k]:.4f}"
        writer.writerow(row)


def write_report() -> None:
    """Redraws ``lm_tinyshakespeare.md`` (table) and ``.png`` (learning curves) from the JSONs."""
    results = []
    for variant in VARIANTS:
        path = RESULTS / "lm" / f"{variant}.json"
        if path.is_file():
            results.append(json.loads(path.read_text()))
    if not results:
        return
    lines = [
        "| model | params | steps | tokens | val loss (nats) | val bpc (segments) | "
        "sliding bpc | carried bpc | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(results, key=lambda r: r["val_bpc"]):
        carried = "—" if r["carry_eval_bpc"] is None else f"{r['carry_eval_bpc']:.4f}"
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['steps']} | {r['tokens']:,} | "
            f"{r['val_loss_nats']:.4f} | {r['val_bpc']:.4f} | "
            f"{r['eval']['sliding']['bpc']:.4f} | {carried} | {r['seconds']:.0f} |"
        )
    (RESULTS / "lm_tinyshakespeare.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in results:
        for ax, split in zip(axes, ("train", "eval"), strict=True):
            pts = r["curve"][split]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, [y / math.log(2) for y in ys], label=r["model"])
    axes[0].set_title("training loss (bits/char, running mean over log interval)")
    axes[1].set_title("validation (first segments, bits/char)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("bits per character")
    axes[1].legend()
    axes[0].set_ylim(top=4.0)
    fig.tight_layout()
    fig.savefig(RESULTS / "lm_tinyshakespeare.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("configs", help="write the TOML configs")
    p = sub.add_parser("time", help="seconds per training step of each variant")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--variants", default=",".join(PAPER_VARIANTS))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p = sub.add_parser("run", help="train and evaluate the variants (resumable)")
    p.add_argument("--steps", type=int, default=TS_STEPS)
    p.add_argument("--variants", default=",".join(PAPER_VARIANTS))
    p.add_argument("--runs", default="runs/lm_ts")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--results", default=str(RESULTS), help="results folder (tests: a tmp dir)")
    p.add_argument(
        "--commit",
        action="store_true",
        help="git-commit the results files (only those) after each finished variant",
    )
    sub.add_parser("report", help="redraw the table and plot from the per-variant JSONs")
    args = parser.parse_args(argv)
    if args.command == "configs":
        for path in write_configs():
            print(path.relative_to(ROOT))
        return 0
    if args.command == "report":
        write_report()
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; valid: {list(VARIANTS)}")
    if args.command == "time":
        for v in variants:
            print(f"{v}: {time_steps(v, args.steps, args.set):.3f} s/step", flush=True)
        return 0
    os.chdir(ROOT)
    _set_results(Path(args.results).absolute())
    runs = Path(args.runs)
    for variant in variants:
        if variant in _finished():
            print(f"{variant}: finished, skipped", flush=True)
            continue
        try:
            result = run_variant(variant, runs, args.steps, args.ckpt_every)
        except subprocess.CalledProcessError as e:
            print(f"{variant}: FAILED\n{e.stdout[-2000:]}\n{e.stderr[-4000:]}", flush=True)
            continue
        append_row(result)
        write_report()
        print(f"{variant}: {json.dumps({k: result[k] for k in COLUMNS})}", flush=True)
        if args.commit:
            _commit(variant)
    return 0


if __name__ == "__main__":
    sys.exit(main())
