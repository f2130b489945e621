"""Why do long training segments learn slower early on? A controlled probe, resumable.

::

    python -m experiments.lm_context [--steps 500] [--runs runs/lm_context]

The softmax model of ``shakespeare_char_softmax`` trained for ``--steps`` steps at an equal
768 tokens per step, as 12 windows of 64 characters or 3 windows of 256, with learned,
rotary or no positions; every run is then scored the same way (``fwjax eval --mode segments
--segment-len 64``: the whole validation split in independent 64-character segments), so the
numbers differ only by what training did. A learned position row receives gradient from one
token per window, so at 3 × 256 each row sees 4× fewer examples per step than at 12 × 64;
rotary and no positions have no per-position parameters. Each finished run is a JSON under
``experiments/results/lm_context/``; the table is ``experiments/results/lm_context.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "lm_context"
SHAPES = {"12x64": (12, 64), "3x256": (3, 256)}
POSITIONS = ("learned", "rotary", "none")


def _fwjax(*args: str) -> str:
    cmd = [sys.executable, "-m", "fwjax.cli", *args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout


def run_probe(shape: str, positional: str, steps: int, runs: Path) -> dict:
    batch, t = SHAPES[shape]
    workdir = runs / f"{shape}_{positional}_{steps}"
    sets = [
        f"steps={steps}",
        f"batch_size={batch}",
        f"lm.segment_len={t}",
        f"lm.eval_stride={t // 2}",
        f"lm.model.max_len={t}",
        f'lm.model.positional="{positional}"',
        f"eval_every={steps}",
    ]
    _fwjax(
        "train",
        "--config",
        "shakespeare_char_softmax",
        "--workdir",
        str(workdir),
        *[a for s in sets for a in ("--set", s)],
    )
    out = _fwjax("eval", "--workdir", str(workdir), "--mode", "segments", "--segment-len", "64")
    scored = json.loads(out.strip().splitlines()[-1])
    return dict(
        shape=shape,
        positional=positional,
        steps=steps,
        tokens=steps * batch * t,
        val_loss_nats_seg64=scored["loss"],
    )


def write_table() -> None:
    records = [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]
    if not records:
        return
    lines = [
        "Softmax model of `shakespeare_char_softmax`, equal 768 tokens per step; validation loss "
        "(nats/char) over the whole split in independent 64-character segments "
        "(`python -m experiments.lm_context`).",
        "",
        "| positions | steps | 12 × 64 | 3 × 256 | difference |",
        "|---|---:|---:|---:|---:|",
    ]
    by = {(r["shape"], r["positional"], r["steps"]): r for r in records}
    for _, positional, steps in sorted({(None, r["positional"], r["steps"]) for r in records}):
        a = by.get(("12x64", positional, steps))
        b = by.get(("3x256", positional, steps))
        fa = f"{a['val_loss_nats_seg64']:.3f}" if a else "—"
        fb = f"{b['val_loss_nats_seg64']:.3f}" if b else "—"
        diff = f"{b['val_loss_nats_seg64'] - a['val_loss_nats_seg64']:+.3f}" if a and b else "—"
        lines.append(f"| {positional} | {steps} | {fa} | {fb} | {diff} |")
    (OUT.parent / "lm_context.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--runs", default="runs/lm_context")
    parser.add_argument("--positions", default=",".join(POSITIONS))
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    for positional in args.positions.split(","):
        for shape in SHAPES:
            path = OUT / f"{shape}_{positional}_{args.steps}.json"
            if path.is_file():
                continue
            record = run_probe(shape, positional, args.steps, Path(args.runs))
            path.write_text(json.dumps(record, indent=2))
            write_table()
            print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
