"""``torch-coherence demo`` end to end, shortened."""

from __future__ import annotations

import pytest

from torch_coherence.cli import main
from torch_coherence.demo import what_happened


@pytest.mark.usefixtures("quiet_lightning")
def test_demo_quick(tmp_path, capsys) -> None:
    argv = ["demo", "--out", str(tmp_path), "--epochs", "1", "--every", "20"]
    assert main([*argv, "--probe-size", "64", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "T1 critical lr" in out and "blow-up lr" in out
    third = "\n[3] 1.5 x the blow-up lr" in out  # when [2]'s pre-flight lookahead found one
    assert "what really happened (blow-up" in out and "the stable run: no blow-up" in out
    assert out.count("; the probe predicted") == (3 if third else 2)
    assert f"tensorboard --logdir {tmp_path}" in out
    assert (tmp_path / "demo" / "coherence_curves.png").stat().st_size > 10_000
    runs = sorted(p.name for p in (tmp_path / "demo").iterdir() if p.is_dir())
    assert len(runs) == (3 if third else 2) and any(r.startswith("stable_lr") for r in runs)


@pytest.mark.parametrize(
    ("losses", "start"),
    [
        ([2.0, 1.5, 1.0], "no blow-up: the loss went from 2 to 1"),
        ([1.0, 3.0, 0.5], "no blow-up: the loss spiked to 3x"),
        ([1.0, 5.0, 11.0], "training blew up at optimizer step 3: loss 11 against 1 at"),
        ([1.0, 11.0, 0.5], "training blew up at optimizer step 2: loss 11 against 1 at"),
        ([1.0, float("nan")], "training blew up at optimizer step 2"),
        ([], "no optimizer step"),
    ],
)
def test_what_happened_uses_the_benchmarks_blowup_rule(losses, start) -> None:
    assert what_happened(losses).startswith(start)


def test_what_happened_says_when_a_blowup_recovered() -> None:
    assert what_happened([1.0, 11.0, 0.5]).endswith("then recovered to 0.5 by step 3")
    assert "recovered" not in what_happened([1.0, 11.0, float("inf")])
    assert what_happened([1.0, 11.0, 5.0]).endswith("and ended at 5 (5x) at step 3")
