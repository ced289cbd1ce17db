"""The training loop's data: the epoch sampler and the three loaders a `Trainer` iterates.

Apart from `llm.data` (token files and windows, which tokenization also imports) because it needs the
process group: several processes each take a shard of every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from llm import distributed
from llm.errors import LLMError
from llm.runtime import select_device
from llm.settings import LoopSettings


class EpochSampler(Sampler[int]):
    """Shuffles exactly like `RandomSampler(generator=None)`: each pass draws its seed from torch's
    global RNG, so seeding once reproduces the book's data order. The seed of the current pass and
    a start offset can be restored, which is what resuming mid-epoch needs. Each rank takes every
    `world_size`-th index of the shared permutation, whose seed rank 0 draws and broadcasts; with
    `even`, the last `n % world_size` indices of the permutation are left out so that every rank has
    as many (the training shards: every rank must take the same number of steps)."""

    def __init__(self, n: int, shuffle: bool, rank: int = 0, world_size: int = 1, even: bool = False):
        self.n, self.shuffle, self.rank, self.world_size = n, shuffle, rank, world_size
        self.used = n - n % world_size if even else n
        self.seed: int | None = None  # seed of the pass in progress
        self._resume: tuple[int | None, int] | None = None

    def resume(self, seed: int | None, start: int) -> None:
        """The next pass: the permutation of `seed`, from its `start`-th index (this rank's)."""
        self._resume = (seed, start)

    def __iter__(self):
        start = 0
        if self._resume is not None:
            (self.seed, start), self._resume = self._resume, None
        elif self.shuffle:
            self.seed = int(torch.empty((), dtype=torch.int64).random_().item())
            if self.world_size > 1:  # every rank draws (the same RNG use), rank 0's seed counts
                self.seed = distributed.broadcast_int(self.seed)
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        else:
            order = list(range(self.n))
        yield from order[: self.used][self.rank :: self.world_size][start:]

    def __len__(self) -> int:
        return len(range(self.rank, self.used, self.world_size))


@dataclass(frozen=True)
class Loaders:
    """What a `Trainer` iterates: the training batches, the training loss's evaluation (the book's: a fresh
    pass of the training data, a new shuffle) and the validation loss's, on this rank of `world_size`."""

    train: DataLoader
    train_eval: DataLoader
    val: DataLoader
    rank: int = 0
    world_size: int = 1

    @property
    def sampler(self) -> EpochSampler | None:
        """The training loader's sampler when the data order can be saved and restored (a resume state)."""
        sampler = self.train.sampler
        return sampler if isinstance(sampler, EpochSampler) else None

    @classmethod
    def given(cls, train_loader: DataLoader, val_loader: DataLoader) -> Loaders:
        """The book's functions: their loaders as they are (batch size, shuffling, collate, `drop_last`),
        the training loss evaluated on the training loader itself, in one process; no resume state."""
        return cls(train_loader, train_loader, val_loader)


def make_loaders(train_set: Dataset, val_set: Dataset, settings: LoopSettings, collate_fn=None) -> Loaders:
    """The pipeline's loaders: `settings.batch_size` per process, this rank's shard of each epoch
    (whole batches only, as many on every rank), batches page-locked on CUDA (copied without waiting)."""
    rank, world = distributed.rank_world()
    pin = select_device(settings.device).type == "cuda"

    def loader(dataset, sampler, drop_last=False):
        return DataLoader(dataset, settings.batch_size, sampler=sampler, drop_last=drop_last, collate_fn=collate_fn,
                          pin_memory=pin)  # fmt: skip

    train = loader(train_set, EpochSampler(len(train_set), True, rank, world, even=True), drop_last=True)
    if len(train) == 0:
        raise LLMError(
            f"the training set has {len(train_set)} examples: too few for one batch of {settings.batch_size}"
        )
    return Loaders(
        train,
        loader(train_set, EpochSampler(len(train_set), True, rank, world)),
        loader(val_set, EpochSampler(len(val_set), False, rank, world)),
        rank,
        world,
    )
