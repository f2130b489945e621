"""The ``fwjax`` command line: ``train``, ``eval`` and ``generate``.

::

    fwjax train --config NAME_OR_PATH --workdir DIR [--set key.path=value ...]
    fwjax eval --workdir DIR [--mode segments|sliding|carried] [--stride S] [--streams B]
    fwjax generate --workdir DIR --prompt TEXT [--tokens N] [--temperature T] [--top-k K]

``NAME`` is a file ``experiments/configs/NAME.toml`` (looked up in the current directory's
``experiments/configs`` and in the fwjax source checkout's); overrides use TOML literals, e.g.
``--set optimizer.learning_rate=1e-3 --set retrieval.fast_weight.update_rule=delta``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from fwjax.train.config import TaskKind, TrainConfig
from fwjax.train.config_io import apply_overrides, find_config, load_toml, structure

CONFIG_DIRS = [
    Path.cwd() / "experiments" / "configs",
    Path(__file__).resolve().parents[1] / "experiments" / "configs",
]


def load_train_config(name_or_path: str, overrides: list[str] | None = None) -> TrainConfig:
    """Reads a TOML config (a path or a name in ``experiments/configs``), applies
    ``key.path=value`` overrides and converts it to a validated :class:`TrainConfig`."""
    data = load_toml(find_config(name_or_path, CONFIG_DIRS))
    return structure(TrainConfig, apply_overrides(data, overrides or []))


def config_from_workdir(workdir: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found: is {str(workdir)!r} a training workdir?")
    return structure(TrainConfig, apply_overrides(json.loads(path.read_text()), overrides or []))


def _restored_run(workdir: str):
    from fwjax.train.loop import Run

    config = config_from_workdir(workdir, ["progress_bar=false"])
    run = Run(config, workdir)
    if run.restored_step is None:
        raise FileNotFoundError(f"no checkpoint found in {workdir}/checkpoints")
    return run


def cmd_train(args) -> int:
    from fwjax.train.loop import initialize_distributed, train

    config = load_train_config(args.config, args.set)
    initialize_distributed(config.distributed)
    train(config, args.workdir)
    return 0


def _save_tokenizer(run, workdir: str) -> None:
    """Writes ``workdir/tokenizer.json`` (the LM's vocabulary) if it is not there yet."""
    path = Path(workdir) / "tokenizer.json"
    if run.config.task is TaskKind.LM and not path.is_file():
        run.task.tokenizer.save(path)


def cmd_eval(args) -> int:
    run = _restored_run(args.workdir)
    run.checkpointer.close()
    _save_tokenizer(run, args.workdir)
    if args.mode is None:
        metrics = run.evaluate()
    else:
        from fwjax.train.tasks import evaluate_lm

        if run.config.task is not TaskKind.LM:
            raise SystemExit(f"--mode needs a language model; this run's task is {run.config.task}")
        metrics = evaluate_lm(
            run,
            args.mode,
            segment_len=args.segment_len,
            stride=args.stride,
            streams=args.streams,
        )
    print(json.dumps({"step": run.restored_step, **metrics}))
    return 0


def cmd_generate(args) -> int:
    import jax
    import numpy as np

    from fwjax.data.tokenizers import Tokenizer, TokenizerKind
    from fwjax.nn import generate

    run = _restored_run(args.workdir)
    run.checkpointer.close()
    if run.config.task is not TaskKind.LM:
        raise SystemExit(f"generate needs a language model; this run's task is {run.config.task}")
    _save_tokenizer(run, args.workdir)
    tokenizer = Tokenizer.load(Path(args.workdir) / "tokenizer.json")
    if tokenizer != run.task.tokenizer:
        raise SystemExit(
            f"{args.workdir}/tokenizer.json differs from the vocabulary of the run's data "
            f"({tokenizer.vocab_size} vs {run.task.tokenizer.vocab_size} symbols)"
        )
    prompt = tokenizer.encode(args.prompt)
    if tokenizer.kind is TokenizerKind.WORD and not args.prompt.endswith("\n"):
        prompt = prompt[:-1]  # the prompt's last line is unfinished: no <eos> yet
    if prompt.size == 0:
        raise SystemExit("--prompt must not be empty")
    tokens = generate(
        run.model(),
        jax.numpy.asarray(prompt[None]),
        args.tokens,
        key=jax.random.key(args.seed),
        temperature=args.temperature,
        top_k=args.top_k,
    )
    print(tokenizer.decode(np.asarray(tokens[0])))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fwjax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (or resume) a run")
    p.add_argument("--config", required=True, help="config name in experiments/configs, or path")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics and config go here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("eval", help="evaluate the latest checkpoint of a workdir")
    p.add_argument("--workdir", required=True)
    p.add_argument(
        "--mode",
        choices=["segments", "sliding", "carried"],
        default=None,
        help="LM: over the whole split; independent segments, a sliding window, or fast weights "
        "carried across all segments (default: the training loop's eval batches)",
    )
    p.add_argument("--segment-len", type=int, default=None, help="LM: T (default: training's)")
    p.add_argument("--stride", type=int, default=None, help="sliding: stride (lm.eval_stride)")
    p.add_argument("--streams", type=int, default=1, help="carried: parallel streams")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("generate", help="sample text from a trained language model")
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--tokens", type=int, default=200, help="new tokens to sample")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
