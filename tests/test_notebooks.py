"""The committed notebooks are exactly what notebooks/build.py produces: stripped of outputs,
Colab-ready (GPU runtime, an install cell that runs only in Colab) and switchable to a fast mode.

Executing them is CI's job: ``FWJAX_NOTEBOOK_FAST=1 pytest --nbmake notebooks/*.ipynb``.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOK_DIR / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def notebooks(build):
    return {name: nbformat.read(NOTEBOOK_DIR / name, as_version=4) for name in build.NOTEBOOKS}


def test_every_notebook_is_built(build):
    on_disk = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
    assert on_disk == sorted(build.NOTEBOOKS)
    assert len(on_disk) == 3


def test_committed_notebooks_equal_the_build(build):
    for name in build.NOTEBOOKS:
        committed = (NOTEBOOK_DIR / name).read_text(encoding="utf-8")
        assert committed == build.render(name), f"{name} is stale: run python notebooks/build.py"
    assert build.main(["--check"]) == 0


def test_check_detects_a_stale_notebook(build, tmp_path, monkeypatch):
    monkeypatch.setattr(build, "NOTEBOOK_DIR", tmp_path)
    assert build.main([]) == 0
    first = next(iter(build.NOTEBOOKS))
    path = tmp_path / first
    path.write_text(path.read_text(encoding="utf-8").replace("fwjax", "fwjaX", 1))
    assert build.main(["--check"]) == 1


def test_no_outputs_and_valid_ids(notebooks):
    for name, nb in notebooks.items():
        nbformat.validate(nb)
        ids = [cell.id for cell in nb.cells]
        assert len(set(ids)) == len(ids), name
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [], f"{name} cell {cell.id} has outputs"
                assert cell.execution_count is None, f"{name} cell {cell.id}"


def test_colab_metadata_and_cells(build, notebooks):
    for name, nb in notebooks.items():
        assert nb.metadata["accelerator"] == "GPU"
        assert nb.metadata["colab"]["provenance"] == []
        assert nb.metadata["kernelspec"]["name"] == "python3"
        assert build.colab_url(name) in nb.cells[0].source  # the badge
        assert build.colab_url(name) in (NOTEBOOK_DIR / "README.md").read_text(encoding="utf-8")
        code = [cell.source for cell in nb.cells if cell.cell_type == "code"]
        install, params = code[0], code[1]
        assert 'if "google.colab" in sys.modules:' in install
        assert build.FWJAX_REPO_URL in install
        assert 'os.environ.get("FWJAX_NOTEBOOK_FAST") == "1"' in params
        # Magics only in the install cell, inside the Colab branch.
        for source in code[1:]:
            assert not any(line.lstrip().startswith(("%", "!")) for line in source.splitlines())


def test_install_cell_does_nothing_outside_colab(notebooks):
    transform = pytest.importorskip("IPython.core.inputtransformer2").TransformerManager()
    assert "google.colab" not in sys.modules

    def get_ipython():
        raise AssertionError("the install branch ran outside Colab")

    for nb in notebooks.values():
        source = next(c.source for c in nb.cells if c.cell_type == "code")
        python = transform.transform_cell(source)
        assert "run_line_magic" in python  # the %pip line is really there
        exec(python, {"get_ipython": get_ipython})  # off Colab: no error
        with pytest.raises(AssertionError, match="install branch"):
            exec(
                python.replace('"google.colab" in sys.modules', "True"),
                {"get_ipython": get_ipython},
            )
