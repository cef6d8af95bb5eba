"""A data loader whose position (epoch, batches consumed, shuffle seed) is saved and restored exactly."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from qattune.errors import QattuneError

from .collate import padded_collate
from .labels import IGNORE_INDEX
from .packing import PackedDataset

log = logging.getLogger(__name__)


def epoch_indices(num_samples: int, epoch: int, shuffle: bool, seed: int, rank: int, world_size: int,
                  drop_last: bool = True) -> list[int]:
    """Sample order of one epoch for one rank: a permutation seeded by `seed + epoch` (or 0..n-1),
    cut to a multiple of `world_size` (unless `drop_last` is off: then the first ranks get one sample
    more), then every `world_size`-th index starting at `rank`."""
    if shuffle:
        generator = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(num_samples, generator=generator).tolist()
    else:
        order = list(range(num_samples))
    if drop_last:
        order = order[: num_samples - num_samples % world_size]
    return order[rank::world_size]


class StatefulDataLoader:
    """Iterates batches of one epoch at a time and remembers how far it got.

    Each rank reads its own share of every global batch. `state_dict()` after any batch and
    `load_state_dict()` in a fresh process continue with exactly the next batch, with the same order.
    With `drop_last` off (validation: every sample scored) the ranks' shares may differ by one sample;
    a rank with a batch fewer reads a filler batch whose labels are all IGNORE_INDEX, so every rank runs
    the same number of forwards (FSDP needs it) and the filler adds no tokens to the loss.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        collate_fn: Callable[[list[Any]], Any],
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        name: str = "the dataset",
        seed_given: bool = True,
    ) -> None:
        if batch_size < 1:
            raise QattuneError(f"batch_size must be at least 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.name = name
        self.seed_given = seed_given  # False: the run drew its seed (seed=null), a resume keeps the checkpoint's
        self.epoch = 0
        self.batches_done = 0
        if len(self) == 0:
            raise QattuneError(self._too_few_message(name))

    def _too_few_message(self, name: str) -> str:
        """Why there is not one batch: `name` (e.g. a config key) and its size, in packs when packed."""
        size = f"{len(self.dataset)} samples"
        if isinstance(self.dataset, PackedDataset):
            size = f"{len(self.dataset)} packs of {self.dataset.max_seq_len} tokens"
        if not self.drop_last:
            return f"{name} has {size}; it needs at least one"
        return (f"{name} has {size}, too few for one batch of {self.batch_size} per rank on {self.world_size} "
                "rank(s); lower the batch size or use more data")

    def __len__(self) -> int:
        """Batches per epoch on every rank (fillers included)."""
        if self.drop_last:
            return len(self.dataset) // self.world_size // self.batch_size
        per_rank = -(-len(self.dataset) // self.world_size)
        return -(-per_rank // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch` (from its first batch) unless already there."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.batches_done = 0

    def restart(self) -> None:
        """Go back to the first batch of the current epoch (validation reads the whole set each time)."""
        self.batches_done = 0

    def _batches(self) -> list[list[int]]:
        """This rank's batches of the epoch; fillers (see the class) are `[0]`, after the real ones."""
        order = epoch_indices(len(self.dataset), self.epoch, self.shuffle, self.seed, self.rank, self.world_size,
                              self.drop_last)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)][: len(self)]
        return batches + [[0]] * (len(self) - len(batches))

    def _real_batches(self) -> int:
        samples, ranks = len(self.dataset), self.world_size
        share = samples // ranks + (not self.drop_last and self.rank < samples % ranks)
        return min(len(self), -(-share // self.batch_size))

    def __iter__(self) -> Iterator[Any]:
        remaining = self._batches()[self.batches_done :]
        if not remaining:
            return
        real = self._real_batches()
        # a private generator: creating the iterator must not draw from the global RNG, or a resumed
        # run (which creates it mid-epoch) would see different dropout than an uninterrupted one
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        loader = DataLoader(
            self.dataset,
            batch_sampler=remaining,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            generator=generator,
        )
        for batch in loader:
            if self.batches_done >= real:  # a filler: nothing in it is scored
                batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
            self.batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "seed": self.seed,
            "shuffle": int(self.shuffle),
            "batch_size": self.batch_size,
            "num_samples": len(self.dataset),
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position; the dataset, batch size and world size must be the same."""
        for key, now in (("num_samples", len(self.dataset)), ("batch_size", self.batch_size), ("world_size", self.world_size)):
            if state[key] != now:
                raise QattuneError(
                    f"cannot resume the data position: the checkpoint was taken with {key}={state[key]}, "
                    f"this run has {key}={now}; resume with the same dataset, batch_size and number of processes"
                )
        for key, now, theirs in (("seed", self.seed, int(state["seed"])), ("shuffle", self.shuffle, bool(state["shuffle"]))):
            if theirs != now and (key != "seed" or self.seed_given):
                log.warning("resuming %s with %s=%s, but the checkpoint's data order was drawn with %s=%s: the run "
                            "continues that order (a changed %s applies to a fresh run)", self.name, key, now, key,
                            theirs, key)
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])


def build_dataloader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = True,
    num_workers: int = 0,
    max_seq_len: Optional[int] = None,
    name: str = "the dataset",
    sharded: bool = True,
    seed_given: bool = True,
) -> StatefulDataLoader:
    """A `StatefulDataLoader` with `padded_collate` (the dataset's `pad_id`), sharded over the
    torch.distributed ranks when a process group is initialized (and `sharded`: False gives this rank
    every batch).

    `drop_last=False` keeps the last, partial batch (validation scores every sample); `name` is how
    errors call the dataset (e.g. its config key, "dataset_val")."""
    rank, world_size = 0, 1
    if sharded and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    collate = functools.partial(padded_collate, pad_id=getattr(dataset, "pad_id", 0), max_seq_len=max_seq_len)
    return StatefulDataLoader(
        dataset, batch_size, collate, shuffle, seed, drop_last, rank, world_size, num_workers, name=name,
        seed_given=seed_given,
    )
