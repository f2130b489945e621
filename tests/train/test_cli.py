"""The ``fwjax`` command in subprocesses: one-line user errors, workdir safety, finished runs,
healing checkpoints, interrupts, periodic logs and argument validation."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fwjax.cli import main
from fwjax.train.metrics import read_metrics
from tests.xla_flags import FAST_COMPILE

REPO = Path(__file__).resolve().parents[2]

# A retrieval run that compiles and steps in a few seconds.
TINY = [
    "retrieval.num_keys=8",
    "retrieval.d_key=16",
    "batch_size=8",
    "log_every=1",
    "eval_every=2",
    "checkpoint.every_steps=2",
    "checkpoint.keep=3",
]
TINY_CHAR_LM = [
    "lm.tokenizer=char",
    "lm.segment_len=16",
    "lm.model.d_model=32",
    "lm.model.d_ff=64",
    "lm.model.num_heads=2",
    "lm.model.num_layers=1",
    "batch_size=4",
    "steps=2",
    "log_every=1",
    "eval_every=2",
    "eval_batches=1",
    "progress_bar=false",
]


def _env(**extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env["XLA_FLAGS"] = FAST_COMPILE  # one device, like a user's laptop
    env.pop("FWJAX_DEBUG", None)
    return {**env, **extra}


def fwjax(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """Runs ``python -m fwjax.cli ARGS`` in the repository; returns the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "fwjax.cli", *map(str, args)],
        cwd=REPO,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _train_args(workdir, *overrides, config="retrieval_delta", steps=4) -> list[str]:
    sets = [f"--set={s}" for s in (*TINY, f"steps={steps}", *overrides)]
    return ["train", "--config", config, "--workdir", str(workdir), *sets]


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``directory`` with its size and modification time (ns)."""
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _final_line(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step retrieval run (checkpoints at steps 2 and 4) and its process."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    proc = fwjax(*_train_args(workdir))
    assert proc.returncode == 0, proc.stderr
    return workdir, proc


@pytest.fixture
def copy_of_finished(finished, tmp_path):
    workdir, proc = finished
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    return copy, proc


# --- one-line user errors ----------------------------------------------------------------------


def _user_error_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    bad_toml = tmp / "bad.toml"
    bad_toml.write_text('task = "retrieval"\nsteps = = 3\n')
    empty = tmp / "empty.txt"
    empty.write_text("")
    w = str(tmp / "w")
    train_lm = ["train", "--config", "lm_tiny", "--workdir", w]
    return {
        "unknown_config": (["train", "--config", "no_such", "--workdir", w], "no_such"),
        "unknown_key": (
            ["train", "--config", "retrieval_delta", "--workdir", w, "--set", "stepz=3"],
            r"unknown key(s) ['stepz']",
        ),
        "bad_value": (
            ["train", "--config", "retrieval_delta", "--workdir", w, "--set", "batch_size=0"],
            "batch_size=0 must be a positive int",
        ),
        "malformed_toml": (["train", "--config", bad_toml, "--workdir", w], "line 2"),
        "missing_text": (
            [*train_lm, "--set", "lm.text_path=/nonexistent/corpus.txt"],
            "/nonexistent/corpus.txt",
        ),
        "not_a_workdir": (["eval", "--workdir", tmp / "nothing"], "config.json"),
        "bad_argument": (["generate", "--workdir", w, "--prompt", "x", "--tokens", "-3"], "-3"),
        "empty_tfds_text": (
            [
                *train_lm,
                f"--set=lm.text_path={empty}",
                "--set=lm.dataset=local_text",
                f"--set=lm.data_dir={tmp / 'tfds'}",
            ],
            "has 0 characters: too few for a train and a validation split",
        ),
    }


def _check_one_line(code: int, err: str, case: str, needle: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fwjax ") and "error: " in lines[0]
    assert needle in lines[0]
    if case == "malformed_toml":
        assert "bad.toml" in lines[0]
    if case == "unknown_config":  # every candidate once, even when two folders hold them
        names = lines[0].split("one of ")[1]
        assert names.count("'retrieval_delta'") == 1


# In subprocesses: the real entry point, one case per kind of failure (config lookup, TOML
# parsing, data loading); the other cases run the same main() in-process.
@pytest.mark.parametrize("case", ["unknown_config", "malformed_toml", "missing_text"])
def test_user_errors_print_one_line_and_exit_2(case, tmp_path):
    args, needle = _user_error_cases(tmp_path)[case]
    proc = fwjax(*args)
    _check_one_line(proc.returncode, proc.stderr, case, needle)


@pytest.mark.parametrize(
    "case", ["unknown_key", "bad_value", "not_a_workdir", "bad_argument", "empty_tfds_text"]
)
def test_user_errors_in_process(case, tmp_path, capsys):
    args, needle = _user_error_cases(tmp_path)[case]
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse
        code = e.code
    _check_one_line(code, capsys.readouterr().err, case, needle)


def test_debug_shows_the_traceback(tmp_path):
    args = ["train", "--config", "retrieval_delta", "--workdir", tmp_path, "--set", "stepz=3"]
    for proc in (fwjax("--debug", *args), fwjax(*args, env=_env(FWJAX_DEBUG="1"))):
        assert proc.returncode != 0
        assert "Traceback (most recent call last)" in proc.stderr
        assert "stepz" in proc.stderr


# --- workdirs ----------------------------------------------------------------------------------


def test_a_workdir_with_another_config_is_refused_before_anything_changes(copy_of_finished):
    workdir, _ = copy_of_finished
    before = _snapshot(workdir)
    proc = fwjax(*_train_args(workdir, "retrieval.d_key=32"))
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "retrieval.d_key: 16 -> 32" in line and "--workdir" in line and "--overwrite" in line
    assert _snapshot(workdir) == before
    # --overwrite deletes the old run and trains the new config from scratch.
    proc = fwjax(*_train_args(workdir, "retrieval.d_key=32"), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((workdir / "config.json").read_text())
    assert config["retrieval"]["d_key"] == 32
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["resumed_from"] is None and summary["steps"] == 4
    steps = [r["step"] for r in read_metrics(workdir) if r["split"] == "train"]
    assert steps == [1, 2, 3, 4]


def test_extending_a_run_is_allowed_and_recorded(copy_of_finished):
    workdir, _ = copy_of_finished
    proc = fwjax(*_train_args(workdir, steps=6))
    assert proc.returncode == 0, proc.stderr
    assert _final_line(proc).startswith("fwjax train: step 6/6")
    assert json.loads((workdir / "config.json").read_text())["steps"] == 6
    records = read_metrics(workdir)
    changes = [r for r in records if r["split"] == "config"]
    assert len(changes) == 1 and changes[0]["step"] == 4
    assert json.loads(changes[0]["changed"]) == {"steps": [4, 6]}
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_rerunning_a_finished_run_reprints_its_summary_and_changes_no_file(copy_of_finished):
    workdir, first = copy_of_finished
    before = _snapshot(workdir)
    again = fwjax(*_train_args(workdir))
    assert again.returncode == 0, again.stderr
    assert _final_line(again) == _final_line(first)
    assert "eval loss=" in _final_line(again)
    assert _snapshot(workdir) == before
    # Fewer steps than the run already has: refused, nothing changes.
    fewer = fwjax(*_train_args(workdir, steps=2))
    assert fewer.returncode == 2 and "beyond steps=2" in fewer.stderr, fewer.stderr
    assert _snapshot(workdir) == before


def test_a_corrupt_latest_checkpoint_is_set_aside_and_the_step_saved_again(copy_of_finished):
    workdir, first = copy_of_finished
    data = [p for p in (workdir / "checkpoints" / "4").rglob("*") if p.is_file()]
    data = [p for p in data if p.parent.name == "d"]  # the array chunks, not the metadata
    assert data
    for p in data:
        p.write_bytes(b"\x00garbage")
    proc = fwjax(*_train_args(workdir))
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "checkpoint step 4" in warnings[0], proc.stderr
    assert "corrupt" in warnings[0]
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
    assert (workdir / "corrupt" / "4").is_dir()
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4]
    assert _final_line(proc).split(" in ")[0] == _final_line(first).split(" in ")[0]
    # The healed run evaluates at step 4, and training again changes nothing.
    proc = fwjax("eval", "--workdir", workdir)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 4
    assert [r["step"] for r in read_metrics(workdir) if r["split"] == "train"] == [1, 2, 3, 4]


# --- interrupts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sig", "code"),
    [
        # ≈ 10–20 s; the same handler as SIGTERM's, which stays in the default suite
        pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow),
        (signal.SIGTERM, 143),
    ],
)
def test_a_signal_saves_a_checkpoint_and_exits_with_128_plus_its_number(sig, code, tmp_path):
    workdir = tmp_path / "run"
    args = _train_args(workdir, "checkpoint.every_steps=100000", "eval_every=100000", steps=100000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fwjax.cli", *args],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not any(r["split"] == "train" for r in read_metrics(workdir)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fwjax train: interrupted at step ") and "Traceback" not in err
    assert last.endswith("; checkpoint saved; re-run the same command to resume")
    step = int(last.split("interrupted at step ")[1].split(";")[0])
    assert (workdir / "checkpoints" / str(step)).is_dir()
    if sig == signal.SIGINT:  # resuming continues from the interrupted step
        proc = fwjax(*_train_args(workdir, steps=step + 2))
        assert proc.returncode == 0, proc.stderr
        summary = json.loads((workdir / "summary.json").read_text())
        assert summary["resumed_from"] == step and summary["steps"] == step + 2
        train_steps = [r["step"] for r in read_metrics(workdir) if r["split"] == "train"]
        assert train_steps == sorted(set(train_steps)) and train_steps[-1] == step + 2


# --- logs --------------------------------------------------------------------------------------


def test_without_a_bar_a_periodic_log_line_is_printed(finished):
    _, proc = finished  # progress_bar defaults to true, but stderr is a pipe here: no bar
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fwjax train: step")]
    assert lines, proc.stderr
    assert "loss" in lines[0] and "tokens/s" in lines[0] and "ETA" in lines[0]
    assert "\r" not in proc.stderr  # no tqdm bar


# --- language models: tokenizer, generate / eval arguments ------------------------------------


@pytest.fixture(scope="module")
def char_lm(tmp_path_factory):
    """A 2-step char-level LM run on generated text."""
    workdir = tmp_path_factory.mktemp("char_lm") / "run"
    sets = [f"--set={s}" for s in TINY_CHAR_LM]
    proc = fwjax("train", "--config", "lm_tiny", "--workdir", workdir, *sets)
    assert proc.returncode == 0, proc.stderr
    return workdir


def test_train_writes_the_tokenizer_and_generate_writes_nothing(char_lm):
    assert (char_lm / "tokenizer.json").is_file()
    before = _snapshot(char_lm)  # a read-only copy of the workdir would do
    proc = fwjax("generate", "--workdir", char_lm, "--prompt", "the", "--tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("the")
    assert _snapshot(char_lm) == before


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["generate", "--prompt", "a", "--tokens", "-3"], "--tokens: -3 must be >= 1"),
        (["generate", "--prompt", "a", "--top-k", "0"], "--top-k: 0 must be >= 1"),
        (["generate", "--prompt", "a", "--temperature", "-1"], "--temperature: -1.0 must be"),
        (["eval", "--mode", "sliding", "--stride", "0"], "--stride: 0 must be >= 1"),
        (["eval", "--mode", "segments", "--segment-len", "0"], "--segment-len: 0 must be >= 1"),
        (["generate", "--prompt", "a€b¤€"], "2 symbol(s) outside the char vocabulary: ['€', '¤']"),
        (["generate", "--prompt", "a", "--top-k", "100000"], "--top-k 100000 must be <="),
    ],
    ids=["tokens", "top_k", "temperature", "stride", "segment_len", "unknown", "top_k_vocab"],
)
def test_generate_and_eval_arguments_are_validated(char_lm, args, needle, capsys):
    command, *rest = args
    try:
        code = main([command, "--workdir", str(char_lm), *rest])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_unknown_symbols_can_be_replaced_and_temperature_0_is_greedy(char_lm, capsys):
    w = str(char_lm)
    assert main(["generate", "--workdir", w, "--prompt", "a€", "--unknown", "replace"]) == 0
    assert "replaced 1 unknown symbol(s) ['€']" in capsys.readouterr().err
    outs = []
    for seed in ("0", "1"):
        args = ["--prompt", "the", "--tokens", "8", "--temperature", "0", "--seed", seed]
        assert main(["generate", "--workdir", w, *args]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("the")


def test_a_run_trained_on_one_device_evaluates_on_eight(char_lm, capsys):
    """batch_size=4 does not divide 8 devices: eval shrinks the data axis instead of failing."""
    import jax

    assert len(jax.devices()) == 8
    assert main(["eval", "--workdir", str(char_lm)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2


def test_unexpected_errors_keep_their_traceback(monkeypatch, tmp_path):
    def bug(args):
        return 1 / 0

    def library_error(args):
        return json.loads("{")  # a ValueError raised outside fwjax's own validation

    args = ["train", "--config", "retrieval_delta", "--workdir", str(tmp_path)]
    for fn, error in ((bug, ZeroDivisionError), (library_error, ValueError)):
        monkeypatch.setattr("fwjax.cli.cmd_train", fn)
        with pytest.raises(error):
            main(args)
