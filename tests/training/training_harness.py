"""Builds a Trainer around the toy model the way a recipe would (shared by the training tests)."""

from __future__ import annotations

import os

import torch
from training_toys import make_model

from qattune.data import StatefulDataLoader, padded_collate
from qattune.training import AdamW, CrossEntropyLoss, Trainer, get_cosine_schedule_with_warmup, num_training_steps


def model_saver(model):
    def save_model(directory: str, step: int) -> None:
        torch.save(model.state_dict(), os.path.join(directory, "model.pt"))

    return save_model


def build_trainer(
    dataset,
    *,
    model=None,
    batch_size=2,
    accum=1,
    epochs=1,
    max_steps_per_epoch=None,
    lr=3e-3,
    shuffle=True,
    dropout=0.0,
    warmup=2,
    loss_fn=None,
    **trainer_kwargs,
) -> Trainer:
    model = model if model is not None else make_model(dropout=dropout)
    loader = StatefulDataLoader(dataset, batch_size, padded_collate, shuffle=shuffle, seed=5)
    optimizer = AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    total = num_training_steps(len(loader), accum, epochs, max_steps_per_epoch)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    trainer_kwargs.setdefault("save_model", model_saver(model))
    trainer_kwargs.setdefault("progress_bar", False)
    return Trainer(
        model,
        optimizer,
        loss_fn if loss_fn is not None else CrossEntropyLoss(),
        loader,
        lr_scheduler=scheduler,
        epochs=epochs,
        max_steps_per_epoch=max_steps_per_epoch,
        gradient_accumulation_steps=accum,
        **trainer_kwargs,
    )
