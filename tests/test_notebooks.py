"""The notebooks' sources are jupytext percent-format ``notebooks/*.py`` files, each paired with
the committed ``.ipynb`` (``jupytext --sync notebooks/*.py``): the pairs hold the same cells and
metadata, the ``.ipynb`` carry no outputs, and the notebooks are Colab-ready (GPU runtime, an
install cell that runs only in Colab) and switchable to a fast mode.

Executing them is CI's job: ``FWJAX_NOTEBOOK_FAST=1 pytest --nbmake notebooks/*.ipynb``.
"""

import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
jupytext = pytest.importorskip("jupytext")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NAMES = sorted(p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
# What the pair must agree on beyond the cells (the header of the .py holds exactly these).
METADATA_KEYS = ("accelerator", "colab", "kernelspec")


def colab_url(name: str) -> str:
    """The "Open in Colab" address of ``notebooks/<name>.ipynb``, from the notebook's own
    install cell (the repository address is written there once)."""
    repo = install_source(read_py(name)).split("git+https://github.com/")[1].split('"')[0]
    return f"https://colab.research.google.com/github/{repo}/blob/main/notebooks/{name}.ipynb"


def read_py(name: str):
    return jupytext.read(NOTEBOOK_DIR / f"{name}.py")


def read_ipynb(name: str):
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def code_sources(nb) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def install_source(nb) -> str:
    return code_sources(nb)[0]


def differences(py_nb, ipynb_nb) -> list[str]:
    """Where the notebook read from the ``.py`` and the ``.ipynb`` disagree (empty: in sync)."""
    out = []
    a = [(c.cell_type, c.source) for c in py_nb.cells]
    b = [(c.cell_type, c.source) for c in ipynb_nb.cells]
    if len(a) != len(b):
        out.append(f"{len(a)} cells in the .py, {len(b)} in the .ipynb")
    pairs = enumerate(zip(a, b, strict=False))
    out += [f"cell {i}: {x[0]} {x[1][:60]!r}" for i, (x, y) in pairs if x != y]
    out += [
        f"metadata {key}"
        for key in METADATA_KEYS
        if py_nb.metadata.get(key) != ipynb_nb.metadata.get(key)
    ]
    formats = ipynb_nb.metadata.get("jupytext", {}).get("formats")
    if formats != "ipynb,py:percent":
        out.append(f"jupytext formats {formats!r} must be 'ipynb,py:percent'")
    return out


def test_every_notebook_is_paired():
    assert len(NAMES) == 3
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == NAMES
    assert not (NOTEBOOK_DIR / "build.py").exists()


@pytest.mark.parametrize("name", NAMES)
def test_ipynb_matches_its_percent_source(name):
    assert differences(read_py(name), read_ipynb(name)) == [], (
        f"{name}: run jupytext --sync notebooks/{name}.py"
    )


def test_a_stale_pair_is_detected():
    name = NAMES[0]
    py_nb, ipynb_nb = read_py(name), read_ipynb(name)
    py_nb.cells[3].source += "\nx = 1"
    assert differences(py_nb, ipynb_nb) == [f"cell 3: code {py_nb.cells[3].source[:60]!r}"]
    py_nb = read_py(name)
    py_nb.cells.pop()
    py_nb.metadata["accelerator"] = "TPU"
    found = differences(py_nb, ipynb_nb)
    assert found[0].endswith("in the .ipynb") and "metadata accelerator" in found


def test_percent_source_round_trips():
    """jupytext writes each ``.py`` back unchanged: nothing in it is lost in the ``.ipynb``."""
    for name in NAMES:
        text = (NOTEBOOK_DIR / f"{name}.py").read_text(encoding="utf-8")
        assert jupytext.writes(read_ipynb(name), fmt="py:percent") == text, name


def test_no_outputs_and_valid_ids():
    for name in NAMES:
        nb = read_ipynb(name)
        nbformat.validate(nb)
        ids = [cell.id for cell in nb.cells]
        assert len(set(ids)) == len(ids), name
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [], f"{name} cell {cell.id} has outputs"
                assert cell.execution_count is None, f"{name} cell {cell.id}"


def test_colab_metadata_and_cells():
    urls = {colab_url(name) for name in NAMES}
    assert len({url.split("/blob/")[0] for url in urls}) == 1  # one repository address
    for name in NAMES:
        nb = read_ipynb(name)
        assert nb.metadata["accelerator"] == "GPU"
        assert nb.metadata["colab"]["provenance"] == []
        assert nb.metadata["kernelspec"]["name"] == "python3"
        assert colab_url(name) in nb.cells[0].source  # the badge
        for readme in (NOTEBOOK_DIR / "README.md", ROOT / "README.md"):
            assert colab_url(name) in readme.read_text(encoding="utf-8"), readme
        install, params = code_sources(nb)[:2]
        assert 'if "google.colab" in sys.modules:' in install
        assert 'os.environ.get("FWJAX_NOTEBOOK_FAST") == "1"' in params
        for source in code_sources(nb):  # no magics: every cell is plain Python
            assert not any(line.lstrip().startswith(("%", "!")) for line in source.splitlines())


def test_install_cell_does_nothing_outside_colab(monkeypatch):
    assert "google.colab" not in sys.modules
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append((a, k)))
    for name in NAMES:
        source = install_source(read_ipynb(name))
        exec(source, {})  # off Colab: no install
        assert calls == []
        exec(source.replace('"google.colab" in sys.modules', "True"), {})
        (args,), kwargs = calls.pop()
        assert args[1:5] == ["-m", "pip", "install", "-q"]
        assert args[5].startswith("fwjax @ git+https://github.com/") and kwargs == {"check": True}
