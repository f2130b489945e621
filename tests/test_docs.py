"""The documentation site (docs/, mkdocs.yml): every page is reachable, the commands it shows
name real configs, and the quickstart's code runs as written.

The strict build itself (docstrings, links, includes, figures) is ``bash scripts/docs.sh``, a
step of ``scripts/test.sh``.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CONFIGS = ROOT / "fwjax" / "configs"


def nav_pages() -> list[str]:
    yaml = pytest.importorskip("yaml")
    # mkdocs.yml uses no custom tags, so the safe loader reads it.
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]

    def walk(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from walk(value)

    return list(walk(nav))


def test_every_page_is_in_the_navigation_and_exists():
    pages = nav_pages()
    on_disk = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(pages) == on_disk
    for required in ("quickstart.md", "ops.md", "layers.md", "training.md", "experiments.md"):
        assert required in pages


def test_commands_name_shipped_configs():
    shipped = {p.stem for p in CONFIGS.glob("*.toml")}
    assert "retrieval_delta" in shipped
    named = []
    for page in [*DOCS.rglob("*.md"), ROOT / "README.md"]:
        text = page.read_text(encoding="utf-8")
        named += [(page.name, n) for n in re.findall(r"--config ([A-Za-z0-9_]+)", text)]
    assert named, "no fwjax train --config NAME found"
    unknown = [(page, n) for page, n in named if n not in shipped and n != "NAME"]
    assert unknown == []


def test_api_pages_name_public_modules():
    """Every ``::: fwjax.x.y`` directive names a module, or a member of a module, that exists
    (the build resolves the member); a moved module shows up here with its page."""
    targets = []
    for page in (DOCS / "api").glob("*.md"):
        targets += re.findall(r"^::: (fwjax[\w.]*)", page.read_text(encoding="utf-8"), re.M)
    assert len(targets) >= 20
    for target in targets:
        parts = target.split(".")
        found = any(
            (ROOT.joinpath(*parts[:i]).with_suffix(".py")).is_file()
            or (ROOT.joinpath(*parts[:i]) / "__init__.py").is_file()
            for i in (len(parts), len(parts) - 1)  # a module, or a member of one
        )
        assert found, target


def test_quickstart_code_runs():
    """The quickstart's Python blocks, in order, in one namespace; their printed claims are
    checked here too."""
    pytest.importorskip("flax")
    text = (DOCS / "quickstart.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "quickstart.md", "exec"), namespace)
    assert namespace["out"].shape == (2, 64, 4, 16)
    assert namespace["state"].shape == (2, 4, 32, 16)
    assert namespace["memory"].fast_weights.shape == (2, 4, 64, 16)
    assert namespace["logits"].shape == (2, 32, 256)
    assert namespace["sample"].shape == (2, 24)
    jnp = namespace["jax"].numpy
    joined = jnp.concatenate([namespace["first"], namespace["second"]], 1)
    assert float(abs(joined - namespace["out"]).max()) < 1e-4
    assert float(abs(namespace["ref"] - namespace["out"]).max()) < 1e-4


def test_sphinx_roles_render_as_markdown():
    pytest.importorskip("griffe")
    import importlib.util

    spec = importlib.util.spec_from_file_location("griffe_rst", DOCS / "griffe_rst.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = "Uses :func:`~fwjax.ops.delta_rule` in :class:`fwjax.nn.ModelConfig` (row form)::\n"
    assert module.markdown(text) == "Uses `delta_rule` in `fwjax.nn.ModelConfig` (row form):\n"
    assert module.markdown("a :: b\n``x``") == "a :: b\n``x``"  # only roles and line-end ::
