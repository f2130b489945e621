"""The ``fwjax`` command line: ``train``, ``configs``, ``eval``, ``generate`` and ``export``.

::

    fwjax train --config NAME_OR_PATH --workdir DIR [--set key.path=value ...] [--overwrite]
    fwjax configs
    fwjax eval --workdir DIR [--mode segments|sliding|carried] [--stride S] [--streams B]
    fwjax generate --workdir DIR --prompt TEXT [--tokens N] [--temperature T] [--top-k K]
    fwjax export --workdir DIR OUT.safetensors

``NAME`` is one of the configs shipped in the package (``fwjax/configs/NAME.toml``; ``fwjax
configs`` lists them with their descriptions) or a path to a TOML file; overrides use TOML
literals, e.g.
``--set optimizer.learning_rate=1e-3 --set retrieval.fast_weight.update_rule=delta``.

User errors (a bad config or value, a missing file, malformed TOML, a workdir holding another
run) print one line to stderr and exit with status 2; ``--debug`` (or ``FWJAX_DEBUG=1``) shows
the traceback. Unexpected errors keep their traceback. SIGINT / SIGTERM during ``train`` save a
checkpoint after the current step and exit with 130 / 143.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from fwjax import configs as shipped_configs
from fwjax.train.config import TaskKind, TrainConfig
from fwjax.train.config_io import CONFIG_DIRS, load_train_config  # noqa: F401 (public names)

_PACKAGE_DIR = Path(__file__).resolve().parent
EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in the command's input, reported in one line (exit status 2)."""


def config_from_workdir(workdir: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """The config stored in ``workdir/config.json``, with ``key.path=value`` overrides.

    Raises:
      FileNotFoundError: ``workdir`` holds no config (it is not a training workdir).
    """
    from fwjax.train.workdir import read_config

    return read_config(workdir, overrides or [])


def _restored_run(workdir: str):
    """Deprecated: :meth:`fwjax.train.Run.restore` (the same run)."""
    import warnings

    from fwjax.train.loop import Run

    warnings.warn(
        "fwjax.cli._restored_run is deprecated; use fwjax.train.Run.restore",
        DeprecationWarning,
        stacklevel=2,
    )
    return Run.restore(workdir)


def cmd_train(args) -> int:
    from fwjax.train.loop import initialize_distributed, train

    try:
        config = load_train_config(args.config, args.set)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from e
    initialize_distributed(config.distributed)
    train(config, args.workdir, overwrite=args.overwrite)
    return 0


def cmd_configs(args) -> int:
    """Prints each shipped config's name and one-line description."""
    names = shipped_configs.names()
    width = max(map(len, names))
    try:
        for name in names:
            print(f"{name:<{width}}  {shipped_configs.describe(name)}")
        sys.stdout.flush()
    except BrokenPipeError:  # `fwjax configs | head`: the reader has gone, which is fine
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (lives until exit)
    return 0


def _save_tokenizer(run, workdir: str) -> None:
    """Writes ``workdir/tokenizer.json`` (the LM's vocabulary) if it is not there yet (runs
    trained before ``train`` wrote it)."""
    path = Path(workdir) / "tokenizer.json"
    if run.config.task is TaskKind.LM and not path.is_file():
        run.task.tokenizer.save(path)


def cmd_eval(args) -> int:
    from fwjax.train.loop import Run

    run = Run.restore(args.workdir)
    run.checkpointer.close()
    if args.mode is None:
        metrics = run.evaluate()
    else:
        from fwjax.train.tasks import evaluate_lm

        if run.config.task is not TaskKind.LM:
            raise UsageError(f"--mode needs a language model; this run's task is {run.config.task}")
        metrics = evaluate_lm(
            run,
            args.mode,
            segment_len=args.segment_len,
            stride=args.stride,
            streams=args.streams,
        )
    print(json.dumps({"step": run.restored_step, **metrics}))
    return 0


def unknown_symbols(tokenizer, text: str) -> list[str]:
    """The symbols of ``text`` outside ``tokenizer``'s vocabulary, each once, in order.

    Args:
      tokenizer: a :class:`~fwjax.data.tokenizers.Tokenizer`.
      text: the text to encode.

    Returns:
      Characters (char tokenizer) or words (word tokenizer); always empty for bytes.
    """
    from fwjax.data.tokenizers import TokenizerKind

    if tokenizer.kind is TokenizerKind.BYTE:
        return []
    vocab = set(tokenizer.vocab)
    symbols = text if tokenizer.kind is TokenizerKind.CHAR else text.split()
    if tokenizer.kind is TokenizerKind.CHAR:
        symbols = [c for c in symbols if c != "\n" or "\n" not in vocab]
    return list(dict.fromkeys(s for s in symbols if s not in vocab))


def cmd_generate(args) -> int:
    import jax
    import numpy as np

    from fwjax.data.tokenizers import Tokenizer, TokenizerKind
    from fwjax.nn import generate
    from fwjax.train.loop import Run

    if args.prompt == "":
        raise UsageError("--prompt must not be empty")
    run = Run.restore(args.workdir)
    run.checkpointer.close()
    if run.config.task is not TaskKind.LM:
        raise UsageError(f"generate needs a language model; this run's task is {run.config.task}")
    _save_tokenizer(run, args.workdir)
    tokenizer = Tokenizer.load(Path(args.workdir) / "tokenizer.json")
    if tokenizer != run.task.tokenizer:
        raise UsageError(
            f"{args.workdir}/tokenizer.json differs from the vocabulary of the run's data "
            f"({tokenizer.vocab_size} vs {run.task.tokenizer.vocab_size} symbols)"
        )
    if args.top_k is not None and args.top_k > tokenizer.vocab_size:
        raise UsageError(
            f"--top-k {args.top_k} must be <= the vocabulary size {tokenizer.vocab_size}"
        )
    unknown = unknown_symbols(tokenizer, args.prompt)
    if unknown and args.unknown == "error":
        raise UsageError(
            f"the prompt has {len(unknown)} symbol(s) outside the {tokenizer.unit} vocabulary: "
            f"{unknown[:20]!r}; change the prompt, or pass --unknown replace"
        )
    if unknown:
        print(
            f"fwjax generate: warning: replaced {len(unknown)} unknown symbol(s) "
            f"{unknown[:20]!r} with the unknown token",
            file=sys.stderr,
        )
    prompt = tokenizer.encode(args.prompt)
    if tokenizer.kind is TokenizerKind.WORD and not args.prompt.endswith("\n"):
        prompt = prompt[:-1]  # the prompt's last line is unfinished: no <eos> yet
    if prompt.size == 0:
        raise UsageError(f"--prompt {args.prompt!r} has no {tokenizer.unit} tokens")
    greedy = args.temperature == 0
    tokens = generate(
        run.model(),
        jax.numpy.asarray(prompt[None]),
        args.tokens,
        key=jax.random.key(args.seed),
        temperature=0.0 if greedy else args.temperature,
        top_k=None if greedy else args.top_k,
    )
    print(tokenizer.decode(np.asarray(tokens[0])))
    return 0


def cmd_export(args) -> int:
    """Writes the latest checkpoint's model variables to a safetensors file
    (:func:`fwjax.io.export_workdir`) and prints the file's name and tensor count."""
    from fwjax.io import export_workdir, read_params

    out = export_workdir(args.workdir, args.out)
    tensors, metadata = read_params(out)
    print(json.dumps({"out": str(out), "step": int(metadata["step"]), "tensors": len(tensors)}))
    return 0


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value

    return parse


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be a finite number >= 0")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the whole usage before them)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``fwjax`` argument parser (subcommands ``train``, ``configs``, ``eval``, ``generate``,
    ``export``)."""
    parser = _Parser(prog="fwjax", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of every error (also FWJAX_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("train", help="train (or resume) a run")
    p.add_argument(
        "--config", required=True, help="a shipped config's name (see `fwjax configs`), or a path"
    )
    p.add_argument("--workdir", required=True, help="checkpoints, metrics and config go here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the workdir's previous run (checkpoints, metrics, summary, config) first",
    )
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("configs", help="list the shipped configs with their descriptions")
    p.set_defaults(fn=cmd_configs)
    p = sub.add_parser("eval", help="evaluate the latest checkpoint of a workdir")
    p.add_argument("--workdir", required=True)
    p.add_argument(
        "--mode",
        choices=["segments", "sliding", "carried"],
        default=None,
        help="LM: over the whole split; independent segments, a sliding window, or fast weights "
        "carried across all segments (default: the training loop's eval batches)",
    )
    p.add_argument(
        "--segment-len", type=_int_at_least(1), default=None, help="LM: T (default: training's)"
    )
    p.add_argument(
        "--stride", type=_int_at_least(1), default=None, help="sliding: stride (lm.eval_stride)"
    )
    p.add_argument("--streams", type=_int_at_least(1), default=1, help="carried: parallel streams")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("generate", help="sample text from a trained language model")
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--tokens", type=_int_at_least(1), default=200, help="new tokens to sample")
    p.add_argument(
        "--temperature",
        type=_nonnegative_float,
        default=0.8,
        help="sampling temperature; 0 is greedy decoding (always the most likely token)",
    )
    p.add_argument("--top-k", type=_int_at_least(1), default=None, help="sample the k best")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--unknown",
        choices=["error", "replace"],
        default="error",
        help="prompt symbols outside the vocabulary: an error (default), or replace them with "
        "the unknown token and warn",
    )
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser(
        "export", help="write the latest checkpoint's model weights to a safetensors file"
    )
    p.add_argument("--workdir", required=True)
    p.add_argument("out", help="the .safetensors file to write")
    p.set_defaults(fn=cmd_export)
    return parser


def _is_user_error(error: BaseException) -> bool:
    """Errors that describe a mistake in the input: usage errors, files that are missing or
    unreadable, and ValueErrors raised by fwjax's own validation (not by a library)."""
    from fwjax.train.workdir import WorkdirError

    if isinstance(error, UsageError | WorkdirError | OSError):
        return True
    if isinstance(error, ValueError) and error.__traceback__ is not None:
        origin = Path(traceback.extract_tb(error.__traceback__)[-1].filename).resolve()
        return origin.is_relative_to(_PACKAGE_DIR)
    return False


def _one_line(error: BaseException) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Runs the ``fwjax`` command; returns the exit status."""
    # Libraries log at WARNING and above; fwjax's own notes (resumed from step N, a config
    # change, a checkpoint set aside) at INFO. force: an import may have configured logging.
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True
    )
    logging.getLogger("fwjax").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("FWJAX_DEBUG", "") not in ("", "0")
    prog = f"fwjax {args.command}"
    from fwjax.train.loop import Interrupted, NonFiniteLossError

    try:
        return args.fn(args)
    except Interrupted as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except NonFiniteLossError as e:
        if debug:
            raise
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:
        if debug or not _is_user_error(e):
            raise
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
