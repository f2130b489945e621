"""The baseline beside the LM recipe: nanoGPT's char-level "baby" Shakespeare model, run from a
nanoGPT checkout and scored as fwjax scores its models; resumable.

::

    python -m experiments.nanogpt_baseline --nanogpt PATH/TO/nanoGPT --python PATH/TO/torch/python
        [--seeds 0,1,2] [--runs runs/nanogpt]

``--nanogpt`` is a checkout of https://github.com/karpathy/nanoGPT (its ``train.py``,
``model.py``, ``configurator.py``, ``config/train_shakespeare_char.py`` and
``data/shakespeare_char/prepare.py`` are copied into the run folder, never modified);
``--python`` an interpreter with ``torch``, ``numpy`` and ``requests`` (torch and JAX run in
separate processes). Each seed trains nanoGPT's documented CPU command for the baby model
(4 layers, 4 heads, d 128, context 64, batch 12, 2000 iterations, no dropout, lr 1e-3 with
cosine decay to 1e-4 over 2000 iterations, β₂ 0.99) with ``torch.manual_seed(1337 + seed)``,
then scores the final checkpoint over the whole validation split (the last 10 % of the
characters, as nanoGPT's ``prepare.py`` splits it: ``int(0.9 n)``, one character earlier than
fwjax's ``round(0.9 n)``) in independent 64-character segments, every target once — the
``segments`` evaluation of ``fwjax eval``. Each seed is a JSON under
``experiments/results/lm/nanogpt/``; ``python -m experiments.lm report`` lists them beside the
fwjax models.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "lm" / "nanogpt"
TEXT_PATH = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
FILES = (
    "train.py",
    "model.py",
    "configurator.py",
    "config/train_shakespeare_char.py",
    "data/shakespeare_char/prepare.py",
)
# nanoGPT's README command for the baby model on a CPU, saving a checkpoint at every evaluation
# whether or not it improved (so the scored one is iteration 2000's).
BABY = [
    "config/train_shakespeare_char.py",
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=50",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters=2000",
    "--lr_decay_iters=2000",
    "--dropout=0.0",
    "--always_save_checkpoint=True",
]
TOKENS = 2000 * 12 * 64

# Run inside the nanoGPT folder with the torch interpreter: train.py with a seed offset.
TRAIN_WRAPPER = """
import runpy, sys, torch
offset = int(sys.argv[1])
seed = torch.manual_seed
torch.manual_seed = lambda s: seed(s + offset)
torch.set_num_threads(2)
sys.argv = ["train.py", *sys.argv[2:]]
runpy.run_path("train.py", run_name="__main__")
"""


def _score_source() -> str:
    """The scoring program: the full-sequence logits of nanoGPT's ``GPT`` (its forward with
    targets returns logits at every position), summed cross entropy per segment."""
    return (
        "import json, sys, numpy as np, torch\n"
        "import torch.nn.functional as F\n"
        "from model import GPT, GPTConfig\n"
        "ckpt = torch.load(sys.argv[1], map_location='cpu')\n"
        "model = GPT(GPTConfig(**ckpt['model_args']))\n"
        "state = {k.removeprefix('_orig_mod.'): v for k, v in ckpt['model'].items()}\n"
        "model.load_state_dict(state)\n"
        "model.eval()\n"
        "val = np.fromfile('data/shakespeare_char/val.bin', dtype=np.uint16).astype(np.int64)\n"
        "t, n = 64, len(val) - 1\n"
        "total, count = 0.0, 0\n"
        "with torch.no_grad():\n"
        "    full = (n // t) * t\n"
        "    x = torch.from_numpy(val[:full]).view(-1, t)\n"
        "    y = torch.from_numpy(val[1 : full + 1]).view(-1, t)\n"
        "    for i in range(0, len(x), 256):\n"
        "        logits, _ = model(x[i : i + 256], y[i : i + 256])\n"
        "        total += float(F.cross_entropy(logits.flatten(0, 1), y[i : i + 256].flatten(),"
        " reduction='sum'))\n"
        "    if full < n:  # the last, shorter segment\n"
        "        xs = torch.from_numpy(val[full:n])[None]\n"
        "        ys = torch.from_numpy(val[full + 1 : n + 1])\n"
        "        logits, _ = model(xs, ys[None])\n"
        "        total += float(F.cross_entropy(logits[0], ys, reduction='sum'))\n"
        "    count = n\n"
        "params = sum(p.numel() for p in model.parameters())\n"
        "record = dict(loss=total / count, tokens=count, iter_num=int(ckpt['iter_num']),"
        " params=params)\n"
        "print(json.dumps(record))\n"
    )


def _copy_checkout(nanogpt: Path, folder: Path) -> str:
    for rel in FILES:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(nanogpt / rel, folder / rel)
    commit = subprocess.run(
        ["git", "-C", str(nanogpt), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return commit or "unknown"


def run_seed(seed: int, nanogpt: Path, python: str, runs: Path, text_path: Path) -> dict:
    folder = runs / f"s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    commit = _copy_checkout(nanogpt, folder)
    data = folder / "data" / "shakespeare_char"
    if not (data / "val.bin").is_file():
        shutil.copyfile(text_path, data / "input.txt")
        subprocess.run([python, "prepare.py"], cwd=data, check=True, capture_output=True)
    t0 = time.time()
    cmd = [python, "-c", TRAIN_WRAPPER, str(seed), *BABY, f"--out_dir=out_s{seed}"]
    print("+", " ".join(cmd[:2]), "TRAIN_WRAPPER", *cmd[3:], flush=True)
    done = subprocess.run(cmd, cwd=folder, check=True, capture_output=True, text=True)
    seconds = time.time() - t0
    (folder / "train.log").write_text(done.stdout)
    score = subprocess.run(
        [python, "-c", _score_source(), f"out_s{seed}/ckpt.pt"],
        cwd=folder,
        check=True,
        capture_output=True,
        text=True,
    )
    scored = json.loads(score.stdout.strip().splitlines()[-1])
    curve = [
        [int(line.split()[1].rstrip(":")), float(line.split("val loss ")[1].split(",")[0])]
        for line in done.stdout.splitlines()
        if line.startswith("step ") and "val loss" in line
    ]
    return dict(
        model="nanogpt_baby",
        nanogpt_commit=commit,
        seed=seed,
        params=scored["params"],
        steps=2000,
        tokens=TOKENS,
        val_loss_nats=scored["loss"],
        scored_tokens=scored["tokens"],
        checkpoint_iter=scored["iter_num"],
        wall_seconds=round(seconds, 1),
        eval_curve=curve,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nanogpt", required=True, help="a nanoGPT checkout")
    parser.add_argument("--python", required=True, help="an interpreter with torch")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--runs", default="runs/nanogpt")
    parser.add_argument("--text-path", default=str(TEXT_PATH))
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        path = OUT / f"s{seed}.json"
        if path.is_file():
            print(f"seed {seed}: finished, skipped")
            continue
        record = run_seed(
            seed, Path(args.nanogpt), args.python, Path(args.runs).absolute(), Path(args.text_path)
        )
        path.write_text(json.dumps(record, indent=2))
        print(json.dumps({k: v for k, v in record.items() if k != "eval_curve"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
