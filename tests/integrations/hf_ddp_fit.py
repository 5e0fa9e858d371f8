"""2-process Hugging Face Trainer run (gloo, CPU): ``torchrun --nproc_per_node 2 THIS OUT``.

Each rank writes its callback history; rank zero also writes the final weights and the
Trainer's log history. ``--no-callback`` trains without the callback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from integrations.hf_helpers import TokenDataset, tiny_bert, training_args
from transformers import Trainer

from torch_coherence.callbacks import CoherenceTrainerCallback


def main(out: Path) -> None:
    torch.set_num_threads(1)
    with_callback = "--no-callback" not in sys.argv
    cb = CoherenceTrainerCallback(max_overhead=None, every_n_steps=2, probe_size=8)
    args = training_args(
        out / "run", max_steps=4, per_device_train_batch_size=4, ddp_backend="gloo"
    )
    trainer = Trainer(
        model=tiny_bert(),
        args=args,
        train_dataset=TokenDataset("single_label"),
        callbacks=[cb] if with_callback else [],
    )
    trainer.train()
    rank = trainer.args.process_index
    if with_callback:
        (out / f"history_{rank}.json").write_text(json.dumps(cb.history))
    if rank == 0:
        torch.save(trainer.model.state_dict(), out / "weights.pt")
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
