"""The Quickstart scripts: scripts/setup.sh installs quietly and only when needed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Stands in for .venv/bin/python: "installs" noisily (like setuptools' editable-install banner),
# or fails when FAKE_PIP_FAIL is set.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "NOISE: editable install banner $*"
echo "NOISE on stderr" >&2
if [[ -n "${FAKE_PIP_FAIL:-}" ]]; then exit 3; fi
"""


def _checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", root / "scripts" / "setup.sh")
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    python = root / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return root


def _setup(root: Path, *args, fail=False) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", **({"FAKE_PIP_FAIL": "1"} if fail else {})}
    return subprocess.run(
        ["bash", "scripts/setup.sh", *args], cwd=root, env=env, capture_output=True, text=True
    )


def test_setup_prints_one_line_when_it_installs_and_nothing_otherwise(tmp_path):
    root = _checkout(tmp_path)
    first = _setup(root)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        "fwjax setup: installing fwjax[dev,data] into .venv (pip's output: .venv/pip-install.log)"
    ]
    assert first.stderr == ""
    assert "NOISE" in (root / ".venv" / "pip-install.log").read_text()
    for extras in ((), ("dev",), ("data,dev",)):  # covered by the first install
        again = _setup(root, *extras)
        assert (again.returncode, again.stdout, again.stderr) == (0, "", ""), extras
    more = _setup(root, "dev,notebooks")
    assert "installing fwjax[dev,notebooks]" in more.stdout


def test_setup_shows_pips_output_when_the_install_fails(tmp_path):
    root = _checkout(tmp_path)
    proc = _setup(root, fail=True)
    assert proc.returncode == 1
    assert "NOISE on stderr" in proc.stderr and "failed" in proc.stderr
    assert not list((root / ".venv").glob(".fwjax-installed-*"))
