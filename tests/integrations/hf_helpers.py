"""Tiny Hugging Face models built from configs (no downloads) and their token data sets."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

VOCAB, SEQ_LEN, N_TRAIN = 12, 6, 48


class TokenDataset(Dataset):
    """Random token sequences; ``labels`` are the tokens (causal LM) or a class per sequence."""

    def __init__(self, kind: str, n: int = N_TRAIN, num_labels: int = 3, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ_LEN), generator=gen)
        if kind == "causal_lm":
            self.labels = self.ids.clone()
        elif kind == "single_label":
            self.labels = self.ids[:, 0] % num_labels  # learnable from the first token
        elif kind == "multi_label":
            self.labels = torch.stack([(self.ids[:, 0] % 2), (self.ids[:, 1] % 2)], 1).float()
        else:  # regression
            self.labels = self.ids[:, 0].float() / VOCAB
        self.kind = kind

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_gpt2(attn: str = "eager"):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ_LEN,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation=attn,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def tiny_bert(num_labels: int = 3, problem_type: str | None = None):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=SEQ_LEN,
        num_labels=num_labels,
        problem_type=problem_type,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def training_args(out, **kw):
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_steps=2,
        report_to=["tensorboard"],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return TrainingArguments(**base)
