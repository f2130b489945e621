"""The named training configs shipped with fwjax: ``fwjax/configs/NAME.toml``.

Each file starts with a comment whose first line describes it. They are package data, read with
:mod:`importlib.resources`, so ``fwjax train --config NAME`` works from any directory after
``pip install fwjax``; ``fwjax configs`` lists them.

Families (see ``experiments/README.md`` for the results each one gives):

- ``retrieval_delta``: the paper's synthetic update task (the quickstart's main job).
- ``retrieval_paper``: the paper's synthetic retrieval protocol (``experiments.synthetic``).
- ``recall_mqar_delta``: a point of ``experiments.recall_zoology`` (MQAR under Zoology's
  protocol, the delta rule; the recall task).
- ``lm_tiny``: a small byte-level LM on generated text (no download).
- ``shakespeare_char_{variant}``: char-level Tiny Shakespeare at nanoGPT's baby-model budget;
  ``shakespeare_char_long_*`` and ``shakespeare_char_long_rotary_*`` at context 256.
- ``tinyshakespeare_{variant}``, ``wt103_{small,medium}_{variant}``: the paper's Transformer-XL
  style recipe.
- ``wt103_bytes_{125m,350m}_delta``: GPT-2 small / medium shapes on WikiText-103 bytes at T 2048
  for one 8-accelerator host (scanned, rematerialised layers, bfloat16 compute).
"""

from __future__ import annotations

from importlib import resources
from importlib.abc import Traversable

__all__ = ["config_dir", "describe", "names"]


def config_dir() -> Traversable:
    """The directory of the shipped ``*.toml`` configs (inside the installed package)."""
    return resources.files(__name__)


def names() -> list[str]:
    """The names of the shipped configs, sorted."""
    return sorted(
        p.name.removesuffix(".toml") for p in config_dir().iterdir() if p.name.endswith(".toml")
    )


def describe(name: str) -> str:
    """The first line of the leading comment of config ``name`` ('' if it has none)."""
    text = (config_dir() / f"{name}.toml").read_text(encoding="utf-8")
    first = text.splitlines()[0] if text else ""
    return first.removeprefix("#").strip() if first.startswith("#") else ""
