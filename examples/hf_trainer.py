"""CoherenceTrainerCallback in a Hugging Face ``Trainer`` (tiny models from configs, no downloads).

Run:  pip install "torch-coherence[hf]"   (transformers and accelerate)
      OMP_NUM_THREADS=1 python examples/hf_trainer.py              (a BERT classifier)
      OMP_NUM_THREADS=1 python examples/hf_trainer.py --model gpt2 (a causal LM)
Then: tensorboard --logdir runs/hf_trainer   (tags under train/coherence/..., train/readable/...)

The data are random token sequences; the classifier's label is the first token mod 3, the
language model learns the sequences themselves. The callback draws its probe from the
train dataset, infers the loss from the model (cross-entropy for a single-label
classifier, the shifted-token cross-entropy per sequence for a causal LM), probes before
the first step and then every ``--every`` optimizer steps, and logs through
``Trainer.log``: the numbers are in ``trainer.state.log_history`` and in every
``report_to`` integration.

Cost, measured on one thread at load average 11 (a shared 2-core machine): a BERT probe
(64 sequences, 3 classes) took 4-7 s, a GPT-2 probe (8 sequences of 8 tokens, vocabulary
16: 128 outputs per sequence) 18-29 s; the causal-LM probe grows with tokens x vocabulary
(docs/integrations.md).
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PrinterCallback,
    Trainer,
    TrainingArguments,
)

from torch_coherence.callbacks import CoherenceTrainerCallback

VOCAB, SEQ_LEN = 16, 8


class Tokens(Dataset):
    """``n`` random sequences; ``labels``: the tokens (LM) or the first token mod 3."""

    def __init__(self, n: int, causal_lm: bool, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ_LEN), generator=gen)
        self.labels = self.ids.clone() if causal_lm else self.ids[:, 0] % 3

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def make_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=16, n_layer=1, n_head=2,
            bos_token_id=0, eos_token_id=0, attn_implementation="eager",
        )  # fmt: skip
        return GPT2LMHeadModel(config)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=SEQ_LEN, num_labels=3,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("bert", "gpt2"), default="bert")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--out", default="runs/hf_trainer")
    args = parser.parse_args()
    causal_lm = args.model == "gpt2"
    callback = CoherenceTrainerCallback(
        every_n_steps=args.every, max_overhead=None, probe_size=8 if causal_lm else 64
    )
    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=16,
        learning_rate=args.lr,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_steps=args.every,
        report_to=["tensorboard"],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=make_model(args.model),
        args=training_args,
        train_dataset=Tokens(512, causal_lm),
        callbacks=[callback],
    )
    trainer.remove_callback(PrinterCallback)  # the table below instead of every log dict
    trainer.train()
    print(f"loss: {type(callback.probe.loss).__name__ if not causal_lm else 'causal_lm_loss'}")
    print(f"{'step':>5} {'sigma':>8} {'sharpness':>10} {'margin':>8} {'critical lr':>12} {'s':>6}")
    for entry in trainer.state.log_history:
        if "coherence/sigma" in entry:
            print(
                f"{entry['step']:5d} {entry['coherence/sigma']:8.3g} "
                f"{entry['sharpness/ggn']:10.3g} {entry['stability/margin']:8.3g} "
                f"{entry['stability/critical_lr']:12.3g} {entry['probe/seconds']:6.2f}"
            )
    print(callback.probe.last_report.explain())
    print(f"tensorboard --logdir {args.out}")


if __name__ == "__main__":
    main()
