"""The command line, the README's commands and the CI script."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from torch_coherence.cli import main

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["thresholds", "--sharpness", "3", "--sigma", "4", "--lr", "0.1"]


def test_thresholds_prints_report(capsys) -> None:
    assert main([*ARGS, "--batch-size", "32", "--n", "1797"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"Theorem 1 threshold\s+5\.38595", out)
    assert re.search(r"critical batch size\s+10\.05", out)
    assert "regime                  undetermined" in out
    assert "mean-square" in out.lower() or "mean square" in out.lower()


def test_thresholds_sam_and_momentum(capsys) -> None:
    argv = [*ARGS, "--batch-size", "32", "--n", "1797", "--sam-rho", "0.05", "--momentum", "0.9"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "SAM threshold (C.8)" in out


def test_fail_if_unstable_exit_code(capsys) -> None:
    argv = [*ARGS, "--batch-size", "4", "--n", "1797", "--fail-if-unstable"]
    assert main(argv) == 2
    assert "UNSTABLE" in capsys.readouterr().out


def test_bad_argument_is_reported_not_raised(capsys) -> None:
    assert main([*ARGS, "--batch-size", "3000", "--n", "1797"]) == 1
    err = capsys.readouterr().err
    assert "batch_size must lie in [1, n] = [1, 1797]" in err


def test_console_module_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "torch_coherence", *ARGS, "--batch-size", "8", "--n", "100"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "critical learning rate" in proc.stdout


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    demo = next(line for line in lines[:4] if line.startswith("Run the demo: `"))
    test = next(line for line in lines[:4] if line.startswith("Run the tests: `"))
    for cmd in (demo, test):
        assert "pip install torch==2.13.0 &&" in cmd
    assert "pytest" in test
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install torch==2.13.0" in ci
    assert "s/^Run the tests: `" in ci  # .ci/run executes exactly the README's line


@pytest.mark.parametrize("argv", [["--help"], ["thresholds", "--help"]])
def test_help(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage: torch-coherence" in capsys.readouterr().out
