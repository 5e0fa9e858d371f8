"""2-process DDP test script: ``python ddp_fit.py OUTDIR [--no-callback]``.

Trains TinyClassifier with ``strategy="ddp"`` on CPU (gloo) with the callback and writes,
per rank, the callback history and timings (seconds each rank spent in the probe, and the
time of an all-reduce of a Gram-sized float64 tensor, the communication the alternative
design, splitting the Gram over ranks, would need); rank zero also writes the final weights.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl
import torch
from integrations.helpers import TinyClassifier, trainer_kwargs
from pytorch_lightning.loggers import CSVLogger

from torch_coherence.callbacks import CoherenceCallback


class TimedCallback(CoherenceCallback):
    """Records the wall time each rank spends in :meth:`run_probe` (rank 1: waiting)."""

    seconds: list[float]

    def run_probe(self, trainer, pl_module):
        start = time.perf_counter()
        try:
            return super().run_probe(trainer, pl_module)
        finally:
            self.seconds = [*getattr(self, "seconds", []), time.perf_counter() - start]


def main(out: Path) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    probe_size = 32
    # the probe's own estimates: the single-process check of test_ddp.py compares to 1e-9,
    # which a warm-started data-set Lanczos (tol 1e-4) would not reproduce from a cold start
    cb = TimedCallback(max_overhead=None, every_n_steps=3, probe_size=probe_size, estimates="probe")
    with_callback = "--no-callback" not in sys.argv
    logger = CSVLogger(str(out), name="csv", version=0)
    kw = trainer_kwargs(out, callbacks=[cb] if with_callback else [], logger=logger, max_steps=6)
    kw.update(strategy="ddp", devices=2, deterministic=False)
    trainer = pl.Trainer(**kw)
    start = time.perf_counter()
    trainer.fit(TinyClassifier(batch_size=8))
    seconds = time.perf_counter() - start
    rank = trainer.global_rank
    if not with_callback:
        if rank == 0:
            torch.save(trainer.lightning_module.state_dict(), out / "weights.pt")
        _shutdown()
        return
    (out / f"history_{rank}.json").write_text(json.dumps(cb.history))
    gram = torch.randn(probe_size * 3, probe_size * 3, dtype=torch.float64)
    torch.distributed.barrier()
    start_ar = time.perf_counter()
    for _ in range(10):
        torch.distributed.all_reduce(gram)
    allreduce = (time.perf_counter() - start_ar) / 10
    timing = {"fit_seconds": seconds, "run_probe_seconds": cb.seconds, "allreduce": allreduce}
    (out / f"timing_{rank}.json").write_text(json.dumps(timing))
    if rank == 0:
        torch.save(trainer.lightning_module.state_dict(), out / "weights.pt")
    _shutdown()


def _shutdown() -> None:
    """Leave gloo cleanly: exiting while the peer still holds connections can abort."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
