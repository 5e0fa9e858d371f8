"""The real TensorBoard server lists the coherence tags of a Trainer.fit run."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import pytorch_lightning as pl
from integrations.helpers import TinyClassifier, trainer_kwargs
from pytorch_lightning.loggers import TensorBoardLogger

from torch_coherence.callbacks import CoherenceCallback

TAGS = {
    "coherence/sigma",
    "stability/margin",
    "stability/critical_lr",
    "sharpness/ggn",
    "stability/lyapunov",
    "stability/typical_critical_lr",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.usefixtures("quiet_lightning")
def test_tensorboard_server_lists_coherence_tags(tmp_path) -> None:
    pl.seed_everything(0)
    logger = TensorBoardLogger(str(tmp_path / "runs"), name="demo")
    cb = CoherenceCallback(max_overhead=None, every_n_steps=2, probe_size=16)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], logger=logger, max_steps=4)).fit(
        TinyClassifier()
    )
    port = _free_port()
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "runs")]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}/data/plugin/scalars/tags"
        deadline, found = time.monotonic() + 90, set()
        while time.monotonic() < deadline and not TAGS <= found:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    runs = json.load(resp)
                found = {tag for tags in runs.values() for tag in tags}
            except OSError:
                pass
            if not TAGS <= found:
                time.sleep(0.5)
        assert TAGS <= found, f"tags seen: {sorted(found)}"
    finally:
        server.kill()
        server.wait(timeout=30)
