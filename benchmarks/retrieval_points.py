"""Grid points of the synthetic retrieval experiments (``experiments/synthetic.py``), built from
the library alone, for the benchmarks that time their training gradient.

A point is (setting, feature map name, update rule, N) with that grid's model: ``d_key = 64``,
the paper's key embedding (``d_key`` wide, no biases, queries tied to keys) and the official
synthetic code's normalisation (attention normalisation for the sum rule, sum normalisation for
the delta rule). Feature map names: ``linear`` (ELU+1), ``dpfpN`` (DPFP-ν, ν = N), ``favorM``
(FAVOR+ with M features) and ``softmax`` (softmax attention, no fast weights).
"""

from __future__ import annotations

import re

from flax import nnx

from fwjax.data.retrieval import RetrievalSetting, RetrievalTask, retrieval_loss
from fwjax.nn.config import AttentionKind, FastWeightConfig, FavorRedraw
from fwjax.nn.retrieval import RetrievalConfig, RetrievalModel
from fwjax.ops import FeatureMap, FeatureMapKind, Normalization, UpdateRule
from fwjax.train import retrieval

D_KEY = 64
_NAME = re.compile(r"(?P<kind>dpfp|favor)(?P<size>[1-9][0-9]*)")


def feature_map(name: str) -> FeatureMap | None:
    """The feature map of a grid name (``linear``, ``dpfpN``, ``favorM``); None for ``softmax``.

    Raises:
      ValueError: naming an unknown ``name``.
    """
    if name == "softmax":
        return None
    if name == "linear":
        return FeatureMap(FeatureMapKind.ELU_P1)
    match = _NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"feature map {name=} must be softmax, linear, dpfpN or favorM")
    size = int(match["size"])
    if match["kind"] == "dpfp":
        return FeatureMap(FeatureMapKind.DPFP, nu=size)
    return FeatureMap(FeatureMapKind.FAVOR_PLUS, num_features=size)


def point(
    setting: int, feature_map_name: str, update_rule: str, n_keys: int
) -> tuple[str, RetrievalConfig, RetrievalTask]:
    """One grid point: its name (as ``experiments/synthetic.py`` writes it, seed 0), model
    config and task.

    Args:
      setting: 1 (capacity) or 2 (update).
      feature_map_name: see :func:`feature_map`.
      update_rule: ``"sum"`` or ``"delta"`` (softmax: ``"sum"``).
      n_keys: N (keys and values).
    """
    fm = feature_map(feature_map_name)
    rule = UpdateRule(update_rule)
    name = f"{feature_map_name}_{rule.value}_n{n_keys}_seed0"
    task = RetrievalTask(RetrievalSetting(setting), n_keys)
    if fm is None:
        if rule is not UpdateRule.SUM:
            raise ValueError(f"softmax takes update_rule='sum', got {update_rule!r}")
        config = RetrievalConfig(n_keys, n_keys, d_key=D_KEY, attention=AttentionKind.SOFTMAX)
        return name, config, task
    norm = Normalization.ATTENTION if rule is UpdateRule.SUM else Normalization.SUM
    fw = FastWeightConfig(
        feature_map=fm, normalization=norm, update_rule=rule, favor_redraw=FavorRedraw.PER_STEP
    )  # the paper's protocol redraws FAVOR+'s projection at every step
    return name, RetrievalConfig(n_keys, n_keys, d_key=D_KEY, fast_weight=fw), task


def gradient_problem(config: RetrievalConfig, task: RetrievalTask, batch_size: int = 32):
    """The training loss of a fresh model (parameter seed 0) on the task's first batch, as a
    function of the parameters, with the closed-form readout (``Readout.DIRECT``).

    Returns:
      ``(loss, params)``: ``jax.grad(loss)(params)`` is the gradient the benchmarks time.
    """
    model = RetrievalModel(config, rngs=nnx.Rngs(params=0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = task.batch(0, 0, batch_size)

    def loss(params):
        m = nnx.merge(graphdef, params, rest)
        pred = retrieval.predictions(m, batch, retrieval.Readout.DIRECT)
        return retrieval_loss(pred, batch["targets"], batch["mask"])

    return loss, params
