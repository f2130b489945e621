"""The package outside a checkout: shipped configs, the wheel's contents, a run from the wheel."""

import os
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

import fwjax
from fwjax import configs
from fwjax.cli import load_train_config, main

REPO = Path(__file__).resolve().parents[1]


def test_every_shipped_config_has_a_description_and_is_listed(capsys):
    names = configs.names()
    assert {"retrieval_delta", "lm_tiny", "shakespeare_char_softmax"} <= set(names)
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == names
    for name, line in zip(names, lines, strict=True):
        description = configs.describe(name)
        assert len(description) > 10, f"{name} has no one-line description"
        assert line.endswith(description)


def test_a_config_is_found_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_train_config("retrieval_delta").task.value == "retrieval"
    path = tmp_path / "mine.toml"
    path.write_text((configs.config_dir() / "retrieval_delta.toml").read_text() + "\n")
    assert load_train_config(str(path)) == load_train_config("retrieval_delta")


def test_one_version_source():
    assert version("fwjax") == fwjax.__version__
    citation = (REPO / "CITATION.cff").read_text()
    assert f"version: {fwjax.__version__}" in citation
    assert f"## [{fwjax.__version__}]" in (REPO / "CHANGELOG.md").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and "Apache License" in (REPO / "LICENSE").read_text()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    (path,) = out.glob("fwjax-*.whl")
    return path


def test_the_wheel_holds_the_configs_types_and_license(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in configs.names():
        assert f"fwjax/configs/{name}.toml" in names
    assert "fwjax/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("experiments/", "tests/", "benchmarks/")) for n in names)


def test_the_wheel_trains_a_named_config_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site), "XLA_FLAGS": ""}
    workdir = tmp_path / "run"
    script = (
        "import sys, fwjax; from fwjax.cli import main;"
        f"assert fwjax.__file__.startswith({str(site)!r}), fwjax.__file__;"
        "sys.exit(main(sys.argv[1:]))"
    )
    args = ["train", "--config", "retrieval_delta", "--workdir", str(workdir),
            "--set", "steps=3", "--set", "eval_every=3", "--set", "retrieval.d_key=16",
            "--set", "batch_size=8"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (workdir / "summary.json").is_file()
