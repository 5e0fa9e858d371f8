"""2-process DDP on CPU (gloo): training unaffected, numbers logged once, same as 1 process."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from integrations.helpers import N_TRAIN, TinyClassifier

from torch_coherence.probe import CoherenceProbe

HERE = Path(__file__).resolve().parent


@pytest.mark.ddp
def test_ddp_two_processes(tmp_path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for out, extra in ((tmp_path, []), (tmp_path / "plain", ["--no-callback"])):
        out.mkdir(exist_ok=True)
        cmd = [sys.executable, str(HERE / "ddp_fit.py"), str(out), *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-4000:]
    probed = torch.load(tmp_path / "weights.pt")
    plain = torch.load(tmp_path / "plain" / "weights.pt")
    for key, value in plain.items():
        assert torch.equal(value, probed[key]), key  # training unaffected
    h0 = json.loads((tmp_path / "history_0.json").read_text())
    h1 = json.loads((tmp_path / "history_1.json").read_text())
    assert [h["step"] for h in h0] == [0, 3, 6]  # the pre-flight probe, then the schedule
    assert h0 == h1  # every rank committed the same broadcast result
    assert h0[0]["batch_size"] == 16.0  # 8 per device x 2 devices
    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))
    assert [int(r["step"]) for r in rows if r.get("coherence/sigma")] == [0, 3, 6]  # once

    # The same probe on the same weights in this (single) process gives the same numbers.
    model = TinyClassifier(batch_size=8)
    model.load_state_dict(torch.load(tmp_path / "weights.pt"))
    probe = CoherenceProbe(
        loss=model.loss_fn,
        probe=model.data,
        probe_size=32,
        dataset_size=N_TRAIN,
        estimates="probe",  # as ddp_fit.py
    )
    opt = torch.optim.SGD(model.parameters(), lr=model.lr)
    single = probe.measure(model, opt, 16).metrics
    for tag, value in single.items():
        if tag != "probe/seconds":
            assert h0[-1][tag] == pytest.approx(value, rel=1e-9, abs=1e-12), tag
