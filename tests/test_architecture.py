"""The import direction of ARCHITECTURE.md, read from the source with ``ast`` (every import,
also those inside functions): each layer imports only the layers below it, ``fwjax/ops`` uses
neither Flax nor a config library, and the library never imports ``experiments`` or
``benchmarks``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The library's units by layer; a unit may import only units of a lower layer (and itself);
# the last layer's (the package's entry points) may also import each other.
LAYERS = (
    ("fwjax.shapes", "fwjax.validation", "fwjax.configs"),
    ("fwjax.ops",),
    ("fwjax.diagnostics",),
    ("fwjax.nn", "fwjax.data"),
    ("fwjax.train",),
    ("fwjax.io", "fwjax.explain", "fwjax.interop", "fwjax.cli", "fwjax"),
)
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
TOP = len(LAYERS) - 1
# Third-party packages a unit must not use: no Flax or training stack below the layers, no
# config library in the ops.
CONFIG_LIBRARIES = {"tomllib", "tomli", "tomli_w", "toml", "yaml", "ml_collections", "omegaconf"}
FORBIDDEN = {
    "fwjax.ops": {"flax", "optax", "orbax", *CONFIG_LIBRARIES},
    "fwjax.diagnostics": {"flax", "optax", "orbax", *CONFIG_LIBRARIES},
    "fwjax.data": {"flax", "optax", "orbax"},
    "fwjax.nn": {"optax", "orbax", *CONFIG_LIBRARIES},
}
OUTSIDE = {"experiments", "benchmarks", "tests", "notebooks", "scripts"}


def _unit(module: str) -> str:
    """``fwjax.ops.delta_rule.chunked`` -> ``fwjax.ops``; ``experiments.lm`` -> ``experiments``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "fwjax" and len(parts) > 1 else parts[0]


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from a import b`` gives ``a.b``, which
    may name an object in ``a``: only its package matters here)."""
    package = _module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_every_library_unit_has_a_layer():
    units = {_unit(_module_name(p)) for p in _sources("fwjax")}
    assert units <= set(RANK), f"give {sorted(units - set(RANK))} a layer in LAYERS"


def violations(path: Path, root: Path = ROOT) -> list[str]:
    """The imports of library file ``path`` that break the layering, with the reason."""
    unit = _unit(_module_name(path, root))
    wrong = []
    for module in sorted(imports(path, root)):
        top, target = module.split(".")[0], _unit(module)
        if top in OUTSIDE:
            wrong.append(f"{module} (outside the library)")
        elif top in FORBIDDEN.get(unit, ()):
            wrong.append(f"{module} (not in {unit})")
        elif top == "fwjax" and target != unit and RANK.get(target, -1) >= RANK[unit] < TOP:
            wrong.append(f"{module} (layer {RANK[target]} from layer {RANK[unit]})")
    return wrong


@pytest.mark.parametrize("path", _sources("fwjax"), ids=lambda p: str(p.relative_to(ROOT)))
def test_library_imports_point_down(path):
    assert not violations(path)


@pytest.mark.parametrize("path", _sources("benchmarks"), ids=lambda p: str(p.relative_to(ROOT)))
def test_benchmarks_use_the_library_not_the_experiments(path):
    assert not {m for m in imports(path) if m.split(".")[0] == "experiments"}


def test_the_checker_sees_every_kind_of_wrong_import(tmp_path):
    def check(relative: str, source: str) -> list[str]:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
        return violations(path, tmp_path)

    # Inside a function, relative, from-imports of a package's names: all seen.
    lazy = "def f():\n    from flax import nnx\n    from ..train import loop\n"
    assert check("fwjax/ops/x.py", lazy) == [
        "flax.nnx (not in fwjax.ops)",
        "fwjax.train.loop (layer 4 from layer 1)",
    ]
    sibling = ["fwjax.data (layer 3 from layer 3)"]
    assert check("fwjax/nn/x.py", "from fwjax import data\n") == sibling
    assert check("fwjax/train/x.py", "import experiments.lm\n") == [
        "experiments.lm (outside the library)"
    ]
    fine = "from fwjax.validation import check_positive_ints\nfrom . import common\nimport jax\n"
    assert check("fwjax/ops/y.py", fine) == []
    assert check("fwjax/cli.py", "from fwjax import io\nimport fwjax\n") == []
