"""The paper's synthetic associative retrieval grids (Schlag et al., 2021, Sec. 6.1), resumable.

    python -m experiments.synthetic --setting 1|2 --grid quick|full [--workers 2]

Every grid point (setting, feature map, update rule, N, seed) is trained in the training loop
(:func:`fwjax.train.retrieval.run_retrieval`) and written, as soon as it finishes, to its own
JSON file under ``experiments/results/synthetic/setting{S}/`` (atomically); a point in flight
checkpoints into ``synthetic/runs/`` every ten evaluations, so a killed run resumes it. Points
whose file exists are skipped, so re-running the same command resumes; the quick grid is a
subset of the full one, so its points are reused. After every point the merged
``experiments/results/synthetic_setting{S}.csv``, ``.md`` (table) and ``.png`` (final
evaluation loss against N, one curve per feature map) are rewritten.

Grids (``d_key = 64``; "linear" is ELU+1):

* Setting 1 (capacity, L = N): N = 20, 40, …, 600; sum rule with linear, dpfp1-3,
  favor64/128/512 and softmax attention; extra (not in the paper): delta rule with linear and
  dpfp1-3.
* Setting 2 (update, L = 2N): N = 20, 40, …, 200; dpfp1 with the sum rule; linear, dpfp1,
  dpfp2 and favor64 with the delta rule.

Normalisation follows the official synthetic code: the sum rule divides by ``z·φ(q)``
(attention normalisation), the delta rule sum-normalises keys and queries.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import math
import shutil
import sys
import time
from pathlib import Path

import jax

from experiments import sweep
from experiments.records import write_json_atomic
from fwjax.data.retrieval import RetrievalSetting, RetrievalTask
from fwjax.nn.config import AttentionKind, FastWeightConfig, FavorRedraw
from fwjax.nn.retrieval import RetrievalConfig
from fwjax.ops import FeatureMap, FeatureMapKind, Normalization, UpdateRule
from fwjax.train.config import TrainConfig
from fwjax.train.retrieval import retrieval_train_config, run_retrieval
from fwjax.validation import check_ints

RESULTS = Path(__file__).resolve().parent / "results"
D_KEY = 64
# Cap on training steps per point (the official code's cap was 100k; its logged runs stopped by
# the stopping rule within a few thousand steps). Points that hit it are marked in the outputs.
MAX_STEPS = 10_000
PAPER_LR = 1e-3  # Adam's learning rate in the paper (and retrieval_paper.toml)

# name -> (attention, feature map); None for softmax.
FEATURE_MAPS: dict[str, FeatureMap | None] = {
    "linear": FeatureMap(FeatureMapKind.ELU_P1),
    "dpfp1": FeatureMap(FeatureMapKind.DPFP, nu=1),
    "dpfp2": FeatureMap(FeatureMapKind.DPFP, nu=2),
    "dpfp3": FeatureMap(FeatureMapKind.DPFP, nu=3),
    "favor64": FeatureMap(FeatureMapKind.FAVOR_PLUS, num_features=64),
    "favor128": FeatureMap(FeatureMapKind.FAVOR_PLUS, num_features=128),
    "favor512": FeatureMap(FeatureMapKind.FAVOR_PLUS, num_features=512),
    "softmax": None,
}


class KeyEmbedding(enum.Enum):
    """How keys enter the model.

    PAPER: the paper's model, a ``d_key``-wide key embedding and projections without biases.
    OFFICIAL: the official synthetic code's, an ``e = int(2.2·N)``-wide key embedding
      (``int((N_keys + N_values)·1.1)``) and projections with biases. With its init
      (embedding ``N(0, 1)``, ``W_k, W_q ~ U(±1/√d_key)``) the pre-φ keys have variance
      ``e / (3·d_key)`` per component, growing with N; PAPER's have ``1/3``.
    SCALED: PAPER's model, with the embedding's standard deviation ``√(e / d_key)`` so that
      the pre-φ keys start at OFFICIAL's scale (width and biases as PAPER).
    WIDE: OFFICIAL's model, with the embedding's standard deviation ``√(d_key / e)`` so that
      the pre-φ keys start at PAPER's scale.
    WIDE_NO_BIAS: WIDE without the biases.
    UNTIED: PAPER with a second ``d_key``-wide table for the queries (``tie_queries=False``).
    FACTORED: PAPER with its table factorised as ``E·P`` through OFFICIAL's width ``e``
      (``embed_factor=e``): over-parametrised like OFFICIAL, queries still tied to the keys.
    FACTORED_NARROW: FACTORED through ``d_key`` instead of ``e`` (a deeper table, not a wider).

    SCALED, WIDE and WIDE_NO_BIAS are ablations: with PAPER and OFFICIAL they cross the width
    with the initial key scale, and take out the biases. UNTIED and FACTORED split what a wide
    table changes: with ``e >= 2·d_key`` the key and query maps of a key id become independent
    (untied), and the table is over-parametrised.
    """

    PAPER = "paper"
    OFFICIAL = "official"
    SCALED = "scaled"
    WIDE = "wide"
    WIDE_NO_BIAS = "wide_no_bias"
    UNTIED = "untied"
    FACTORED = "factored"
    FACTORED_NARROW = "factored_narrow"

    @property
    def wide(self) -> bool:
        """Whether the embedding has the official width (else ``d_key``)."""
        return self in (KeyEmbedding.OFFICIAL, KeyEmbedding.WIDE, KeyEmbedding.WIDE_NO_BIAS)

    @property
    def bias(self) -> bool:
        """Whether the key, query and β projections have biases."""
        return self in (KeyEmbedding.OFFICIAL, KeyEmbedding.WIDE)

    @property
    def official_scale(self) -> bool:
        """Whether the pre-φ keys start at the official code's scale (else PAPER's)."""
        return self in (KeyEmbedding.OFFICIAL, KeyEmbedding.SCALED)


CSV_COLUMNS = (
    "setting",
    "feature_map",
    "update_rule",
    "key_embedding",
    "normalization",
    "n_keys",
    "d_dot",
    "final_eval_loss",
    "best_eval_loss",
    "steps",
    "stop_reason",
    "seconds",
    "seed",
    "max_steps",
    "learning_rate",
    "device",
)


@dataclasses.dataclass(frozen=True)
class GridPoint:
    """One run of the grid.

    Attributes:
      setting: 1 (capacity) or 2 (update).
      feature_map: a key of :data:`FEATURE_MAPS`.
      update_rule: "sum" or "delta" (softmax: "sum", i.e. no fast weight rule).
      n_keys: N.
      seed: the protocol's seed.
      embedding: the key embedding (:class:`KeyEmbedding`).
    """

    setting: int
    feature_map: str
    update_rule: str
    n_keys: int
    seed: int = 0
    embedding: KeyEmbedding = KeyEmbedding.PAPER

    def __post_init__(self):
        RetrievalSetting(self.setting)
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map={self.feature_map!r} not in {sorted(FEATURE_MAPS)}")
        UpdateRule(self.update_rule)
        if self.feature_map == "softmax" and self.update_rule != "sum":
            raise ValueError(f"softmax takes update_rule='sum', got {self.update_rule!r}")
        check_ints(minimum=2, n_keys=self.n_keys)
        object.__setattr__(self, "embedding", KeyEmbedding(self.embedding))

    @property
    def stem(self) -> str:
        """The point's name without seed and embedding, e.g. ``dpfp2_sum_n220``."""
        return f"{self.feature_map}_{self.update_rule}_n{self.n_keys}"

    @property
    def name(self) -> str:
        emb = "" if self.embedding is KeyEmbedding.PAPER else f"_{self.embedding.value}"
        return f"{self.stem}{emb}_seed{self.seed}"

    @property
    def normalization(self) -> Normalization | None:
        """The official code's: z-division for the sum rule, sum normalisation for the delta."""
        if self.feature_map == "softmax":
            return None
        if self.update_rule == "sum":
            return Normalization.ATTENTION
        return Normalization.SUM

    @property
    def d_dot(self) -> int | None:
        """Dimension of φ (the memory's key dimension); None for softmax."""
        fm = FEATURE_MAPS[self.feature_map]
        return None if fm is None else fm.output_dim(D_KEY)

    @property
    def official_embed_width(self) -> int:
        """The official code's key embedding width, ``int((N + N)·1.1)``."""
        return int((self.n_keys + self.n_keys) * 1.1)

    @property
    def embed_std(self) -> float:
        """The key embedding's initial standard deviation (see :class:`KeyEmbedding`).

        Under the official init the pre-φ key variance is ``width · embed_std² / (3·d_key)``;
        the official code has ``embed_std = 1`` at width ``e``, PAPER at width ``d_key``."""
        e = self.embedding
        width = self.official_embed_width if e.wide else D_KEY
        target = self.official_embed_width if e.official_scale else D_KEY
        return math.sqrt(target / width)

    def task(self) -> RetrievalTask:
        return RetrievalTask(RetrievalSetting(self.setting), self.n_keys)

    def model_config(self) -> RetrievalConfig:
        fm = FEATURE_MAPS[self.feature_map]
        n = self.n_keys
        e = self.embedding
        emb = dict(
            d_embed=self.official_embed_width if e.wide else None,
            use_bias=e.bias,
            tie_queries=e is not KeyEmbedding.UNTIED,
            embed_factor={
                KeyEmbedding.FACTORED: self.official_embed_width,
                KeyEmbedding.FACTORED_NARROW: D_KEY,
            }.get(e),
        )
        if fm is None:
            return RetrievalConfig(n, n, d_key=D_KEY, attention=AttentionKind.SOFTMAX, **emb)
        fw = FastWeightConfig(
            feature_map=fm,
            normalization=self.normalization,
            update_rule=self.update_rule,
            favor_redraw=FavorRedraw.PER_STEP,  # the official code redraws at every call
        )
        return RetrievalConfig(n, n, d_key=D_KEY, fast_weight=fw, **emb)

    def train_config(self, fields: dict | None = None) -> TrainConfig:
        """The point's run under the paper's protocol (``retrieval_paper``, capped at
        :data:`MAX_STEPS` without gradient clipping) with the point's seed and key embedding
        scale, then ``fields`` (e.g. ``{"steps": 20_000}``)."""
        base = {"steps": MAX_STEPS, "optimizer.clip_norm": None, "seed": self.seed}
        base["retrieval.embed_std"] = self.embed_std
        return retrieval_train_config(self.task(), self.model_config(), base | (fields or {}))


def grid(setting: int, which: str, seed: int = 0) -> list[GridPoint]:
    """The points of a grid: the paper's runs first, then the extra ones; each by increasing N
    (cheapest first).

    Args:
      setting: 1 or 2.
      which: "full" (the paper's N range) or "quick" (two small N values of the same runs).
      seed: the seed of every point.
    """
    if which not in ("quick", "full"):
        raise ValueError(f"grid={which!r} must be 'quick' or 'full'")
    if setting == 1:
        ns = [20, 100] if which == "quick" else list(range(20, 601, 20))
        configs = [(fm, "sum") for fm in FEATURE_MAPS]
        extra = [(fm, "delta") for fm in ("linear", "dpfp1", "dpfp2", "dpfp3")]  # not in paper
        return [
            GridPoint(1, fm, rule, n, seed)
            for group in (configs, extra)
            for n in ns
            for fm, rule in group
        ]
    elif setting == 2:
        ns = [20, 60] if which == "quick" else list(range(20, 201, 20))
        configs = [("dpfp1", "sum")]
        configs += [(fm, "delta") for fm in ("dpfp1", "dpfp2", "linear", "favor64")]
    else:
        raise ValueError(f"setting={setting!r} must be 1 or 2")
    return [GridPoint(setting, fm, rule, n, seed) for n in ns for fm, rule in configs]


def point_path(out_dir: Path, point: GridPoint) -> Path:
    return out_dir / f"setting{point.setting}" / f"{point.name}.json"


def run_dir(out_dir: Path, point: GridPoint) -> Path:
    """The training loop's work directory of a point while it runs (checkpoints every ten
    evaluations: a killed point resumes there); deleted once the point's record is written."""
    return out_dir / "runs" / f"setting{point.setting}" / point.name


def run_point(point: GridPoint, fields: dict | None, out_dir: Path) -> dict:
    """Trains one point (:meth:`GridPoint.train_config` with ``fields``) in the training loop
    and writes its JSON record (atomically); returns the record."""
    workdir = run_dir(out_dir, point)
    config = point.train_config(fields)
    result = run_retrieval(config, workdir)
    norm = point.normalization
    record = dict(
        setting=point.setting,
        feature_map=point.feature_map,
        update_rule=point.update_rule,
        key_embedding=point.embedding.value,
        embed_std=point.embed_std,
        normalization="" if norm is None else norm.value,
        n_keys=point.n_keys,
        d_dot="" if point.d_dot is None else point.d_dot,
        final_eval_loss=result.final_eval_loss,
        best_eval_loss=result.best_eval_loss,
        steps=result.steps,
        stop_reason=result.stop_reason.value,
        seconds=round(result.seconds, 1),
        seed=point.seed,
        max_steps=config.steps,
        learning_rate=config.optimizer.learning_rate,
        device=jax.default_backend(),
        history=[list(h) for h in result.history],
    )
    write_json_atomic(point_path(out_dir, point), record)
    shutil.rmtree(workdir)
    return record


def load_records(out_dir: Path, setting: int) -> list[dict]:
    """Every finished point of a setting, sorted by (feature map, rule, N)."""
    order = {name: i for i, name in enumerate(FEATURE_MAPS)}
    defaults = dict(  # what records from before each column was added ran with
        device="cpu",
        key_embedding=KeyEmbedding.PAPER.value,
        learning_rate=PAPER_LR,
    )
    return sweep.load_records(
        out_dir / f"setting{setting}",
        lambda r: (
            r["update_rule"],
            r["key_embedding"],
            order[r["feature_map"]],
            r["n_keys"],
            r["seed"],
        ),
        defaults,
    )


def _curve(record: dict) -> tuple[str, str, str, int]:
    """A record's curve: (feature map, rule, key embedding, seed)."""
    return record["feature_map"], record["update_rule"], record["key_embedding"], record["seed"]


def _curve_name(feature_map: str, rule: str, embedding: str, seed: int) -> str:
    emb = "" if embedding == KeyEmbedding.PAPER.value else f" {embedding} emb."
    return f"{feature_map} {rule}{emb}" + (f" seed {seed}" if seed else "")


def _curve_label(feature_map: str, rule: str, embedding: str, seed: int) -> str:
    d = GridPoint(1, feature_map, rule, 2).d_dot
    name = _curve_name(feature_map, rule, embedding, seed)
    return name + ("" if d is None else f" (d_dot={d})")


def write_table(records: list[dict], path: Path, setting: int) -> None:
    """Markdown table: one row per N, one column per curve (feature map, rule, embedding,
    seed); cells ``final loss (steps)``, ``†`` when the step cap was hit."""
    curves = list(dict.fromkeys(_curve(r) for r in records))
    cells = {(*_curve(r), r["n_keys"]): r for r in records}
    ns = sorted({r["n_keys"] for r in records})
    lines = [
        f"Setting {setting}: final evaluation loss (training steps) per N; "
        "† = stopped at the step cap.",
        "",
        "| N | " + " | ".join(_curve_name(*c) for c in curves) + " |",
        "|---:|" + "---:|" * len(curves),
    ]
    for n in ns:
        row = []
        for curve in curves:
            r = cells.get((*curve, n))
            if r is None:
                row.append("")
                continue
            cap = " †" if r["stop_reason"] == "max_steps" else ""
            row.append(f"{r['final_eval_loss']:.4f} ({r['steps']}){cap}")
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(records: list[dict], path: Path, setting: int) -> None:
    """Final evaluation loss against N, one curve per feature map (one panel per update rule in
    setting 1; log y in setting 2); dotted verticals at each deterministic map's d_dot; one
    legend under the panels."""
    from experiments.plotting import MAX_WIDTH_IN, legend_below, style

    if setting == 1:  # a panel per update rule that has points (the sum rule at least)
        rules = ["sum"] + (["delta"] if any(r["update_rule"] == "delta" for r in records) else [])
    else:
        rules = ["all"]
    markers = dict(zip((e.value for e in KeyEmbedding), "osv^xDPh", strict=True))
    labels = list(dict.fromkeys(_curve_label(*_curve(r)) for r in records))
    # Legend columns as wide as the longest label (10-pt characters are about 0.075 in wide).
    width = MAX_WIDTH_IN if len(rules) > 1 or len(labels) > 8 else 7.5
    longest = max((len(label) for label in labels), default=1)
    ncol = max(1, min(4, int(width // (0.075 * longest + 0.8))))
    height = 4.5 + 0.25 * math.ceil(len(labels) / ncol)
    with style() as plt:
        from matplotlib.ticker import MaxNLocator

        fig, axes = plt.subplots(
            1, len(rules), figsize=(width, height), squeeze=False, layout="constrained"
        )
        colors = dict(zip(FEATURE_MAPS, plt.get_cmap("tab10").colors, strict=False))
        for ax, rule in zip(axes[0], rules, strict=True):
            subset = [r for r in records if rule == "all" or r["update_rule"] == rule]
            curves = dict.fromkeys(_curve(r) for r in subset)
            for curve in curves:
                fm, rl, emb, _ = curve
                pts = sorted(
                    (r["n_keys"], r["final_eval_loss"]) for r in subset if _curve(r) == curve
                )
                style_ = "--" if (setting == 2 and rl == "sum") else "-"
                if emb != KeyEmbedding.PAPER.value:
                    style_ = "-."
                ax.plot(
                    *zip(*pts, strict=True),
                    style_,
                    marker=markers[emb],
                    ms=4,
                    color=colors[fm],
                    label=_curve_label(*curve),
                )
                d = GridPoint(1, fm, rl, 2).d_dot
                if setting == 1 and d is not None and not fm.startswith("favor"):
                    ax.axvline(d, color=colors[fm], ls=":", lw=1)
            ax.set_xlabel("number of unique keys N")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("final evaluation loss")
            if setting == 2:
                ax.set_yscale("log")
                ax.set_title("Setting 2 (update, L = 2N)")
            else:
                title = "sum rule (paper)" if rule == "sum" else "delta rule (not in the paper)"
                ax.set_title(f"Setting 1 (capacity, L = N): {title}")
            ax.grid(alpha=0.3)
        legend_below(fig, axes[0], ncol=ncol)
        fig.savefig(path)
        plt.close(fig)


def write_outputs(out_dir: Path, results_dir: Path, setting: int) -> list[dict]:
    """Merges the point files of a setting into its CSV, table and plot."""
    records = load_records(out_dir, setting)
    stem = results_dir / f"synthetic_setting{setting}"
    sweep.write_csv(records, stem.with_suffix(".csv"), CSV_COLUMNS)
    write_table(records, stem.with_suffix(".md"), setting)
    write_plot(records, stem.with_suffix(".png"), setting)
    return records


def run_grid(
    points: list[GridPoint],
    fields: dict | None = None,
    *,
    out_dir: Path,
    results_dir: Path,
    workers: int = 1,
    first_core: int = 0,
    log=print,
) -> list[dict]:
    """Runs the points without a finished record; rewrites the outputs after each one.

    Args:
      points: grid points (all of one setting).
      fields: overrides of every point's protocol (:meth:`GridPoint.train_config`).
      out_dir: where the per-point JSON records live.
      results_dir: where the merged CSV / table / plot go.
      workers: 1 runs in this process; more runs a pool of spawned processes, worker i pinned
        to core ``(first_core + i) % cpu_count`` (so concurrent grids can use disjoint cores).
      first_core: see ``workers``.
      log: progress printer.

    Returns:
      The records of this setting (finished before or now).
    """
    settings = {p.setting for p in points}
    if len(settings) != 1:
        raise ValueError(f"points must share one setting; got {sorted(settings)}")
    (setting,) = settings
    results_dir.mkdir(parents=True, exist_ok=True)
    return sweep.run_points(
        points,
        functools.partial(run_point, fields=fields, out_dir=out_dir),
        path=functools.partial(point_path, out_dir),
        write_outputs=functools.partial(write_outputs, out_dir, results_dir, setting),
        describe=lambda p, r: (
            f"  {p.name}: loss {r['final_eval_loss']:.4f} after {r['steps']} steps "
            f"({r['stop_reason']}, {r['seconds']:.0f} s)"
        ),
        workers=workers,
        first_core=first_core,
        log=log,
        label=f"setting {setting}: ",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", type=int, choices=(1, 2), required=True)
    parser.add_argument("--grid", choices=("quick", "full"), default="quick")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--first-core", type=int, default=0, help="pin workers from this core")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=MAX_STEPS)
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=PAPER_LR,
        help="Adam's learning rate (the paper's 1e-3; other values only as probes, each in its "
        "own --results folder: point files do not name it)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--only", default="", help="comma-separated feature maps to run")
    parser.add_argument(
        "--points", default="", help="comma-separated points to run, e.g. dpfp2_sum_n220"
    )
    parser.add_argument(
        "--embedding",
        choices=[e.value for e in KeyEmbedding],
        default=KeyEmbedding.PAPER.value,
        help="key embedding: the paper's d_key-wide one, or the official code's 2.2·N-wide one "
        "with biased projections",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="only rewrite the setting's CSV, table and plot from the stored points (no training)",
    )
    args = parser.parse_args(argv)
    if args.report:
        write_outputs(args.results / "synthetic", args.results, args.setting)
        return
    if args.workers < 1:
        parser.error(f"--workers={args.workers} must be >= 1")
    if args.learning_rate != PAPER_LR and args.results == RESULTS:
        parser.error(f"--learning-rate={args.learning_rate} needs a --results folder of its own")
    if args.workers == 1:
        sweep.limit_threads()  # one XLA thread: the other cores stay free
    embedding = KeyEmbedding(args.embedding)
    points = [
        dataclasses.replace(p, embedding=embedding)
        for p in grid(args.setting, args.grid, args.seed)
    ]
    if args.only:
        keep = set(args.only.split(","))
        unknown = keep - set(FEATURE_MAPS)
        if unknown:
            parser.error(f"--only has unknown feature maps {sorted(unknown)}")
        points = [p for p in points if p.feature_map in keep]
    if args.points:
        stems = set(args.points.split(","))
        unknown = stems - {p.stem for p in points}
        if unknown:
            parser.error(f"--points not in this grid: {sorted(unknown)}")
        points = [p for p in points if p.stem in stems]
    start = time.perf_counter()
    run_grid(
        points,
        {"steps": args.max_steps, "optimizer.learning_rate": args.learning_rate},
        out_dir=args.results / "synthetic",
        results_dir=args.results,
        workers=args.workers,
        first_core=args.first_core,
    )
    print(f"done in {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
