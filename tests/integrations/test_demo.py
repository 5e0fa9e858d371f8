"""``torch-coherence demo`` end to end, shortened."""

from __future__ import annotations

import pytest

from torch_coherence.cli import main


@pytest.mark.usefixtures("quiet_lightning")
def test_demo_quick(tmp_path, capsys) -> None:
    argv = ["demo", "--out", str(tmp_path), "--epochs", "1", "--every", "20"]
    assert main([*argv, "--probe-size", "64", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "critical lr" in out and "above critical" in out
    assert f"tensorboard --logdir {tmp_path}" in out
    assert (tmp_path / "demo" / "coherence_curves.png").stat().st_size > 10_000
    runs = sorted(p.name for p in (tmp_path / "demo").iterdir() if p.is_dir())
    assert len(runs) == 2 and runs[0].startswith("stable_lr")
