"""The TOML writer (fwjax.train.config_io.to_toml): what it writes reads back as it was."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fwjax import configs as shipped_configs
from fwjax.train.config import TrainConfig
from fwjax.train.config_io import load_toml, structure, to_toml, unstructure

_KEYS = st.text(min_size=1, max_size=6) | st.sampled_from(["a", "lm", "b-c", "x_1", "1"])
_SCALARS = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_KEYS, _VALUES, max_size=5), st.sampled_from([(), ("a",), ("lm", "1")]))
def test_generated_dicts_round_trip(data, inline):
    assert tomllib.loads(to_toml(data, inline=inline)) == data


def test_config_shapes_and_layout():
    data = {
        "task": "lm",
        "steps": 2000,
        "lr": 1e-3,
        "flag": False,
        "lm": {
            "segment_len": 64,
            "model": {
                "layer_kinds": ["softmax", "softmax"],
                "fast_weight": {"feature_map": {"kind": "favor_plus", "num_features": 16}},
            },
        },
        "outer": {"inner": {"x": 1}},
        "checkpoint": {"every_steps": 500, "keep": 2},
    }
    text = to_toml(data, inline=("feature_map",))
    assert text == (
        'task = "lm"\nsteps = 2000\nlr = 0.001\nflag = false\n\n'
        "[lm]\nsegment_len = 64\n\n"
        '[lm.model]\nlayer_kinds = ["softmax", "softmax"]\n\n'
        '[lm.model.fast_weight]\nfeature_map = { kind = "favor_plus", num_features = 16 }\n\n'
        "[outer.inner]\nx = 1\n\n"  # a table of tables only: no [outer] header
        "[checkpoint]\nevery_steps = 500\nkeep = 2\n"
    )
    assert tomllib.loads(text) == data
    # Without ``inline`` the feature map is a table of its own; the data is the same.
    assert "[lm.model.fast_weight.feature_map]" in to_toml(data)
    assert tomllib.loads(to_toml(data)) == data


def test_strings_and_special_floats():
    data = {'we"ird key': 'quote " backslash \\ newline \n tab \t del \x7f é', "f": -math.inf}
    assert tomllib.loads(to_toml(data)) == data
    assert math.isnan(tomllib.loads(to_toml({"n": math.nan}))["n"])
    assert to_toml({}) == ""


@pytest.mark.parametrize(
    ("data", "match"),
    [({"a": {"b": None}}, r"a\.b=None"), ({"a": [1, object()]}, r"a\[1\]="), ({1: 2}, "keys")],
)
def test_values_without_a_toml_form_are_named(data, match):
    with pytest.raises(TypeError, match=match):
        to_toml(data)


@pytest.mark.parametrize("name", ["retrieval_delta", "lm_tiny", "shakespeare_char_delta_favor"])
def test_shipped_configs_round_trip_through_the_dataclasses(name):
    """A shipped config, structured and written back without its None fields, is the same
    config."""
    path = Path(str(shipped_configs.config_dir())) / f"{name}.toml"
    config = structure(TrainConfig, load_toml(path))

    def without_none(tree):
        if isinstance(tree, dict):
            return {k: without_none(v) for k, v in tree.items() if v is not None}
        return tree

    text = to_toml(without_none(unstructure(config)), inline=("feature_map",))
    assert structure(TrainConfig, tomllib.loads(text)) == config
