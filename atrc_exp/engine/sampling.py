"""Step-indexed training data order: what makes a resumed run see exactly the data of an uninterrupted one.

The batch of global step ``k`` (0-based) is a pure function of ``(seed, k)``:

* epoch ``e = k // steps_per_epoch`` with ``steps_per_epoch = len(dataset) // batch_size``
  (the incomplete last batch is dropped, as ``drop_last=True``);
* the epoch's order is ``torch.randperm(n)`` drawn from a generator seeded with ``seed + e``;
* step ``k`` takes the slice ``[b·B, (b+1)·B)`` of it (``b = k % steps_per_epoch``, B the total
  batch size) and process ``r`` of ``P`` takes its ``r``-th contiguous share of ``B/P`` samples;
* the random augmentation of a sample is seeded from ``(seed, e, index)``, not from whichever
  DataLoader worker happens to load it.

So resuming at step ``k`` only needs ``k``: no sampler state, no worker RNG state, and the result
does not depend on the number of DataLoader workers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for the augmentation of sample ``index`` in ``epoch``."""
    return int(
        np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(2, np.uint64)[0] >> 1
    )


class StepBatchSampler(Sampler[list[int]]):
    """Infinite per-process batches for the global steps ``start_step, start_step + 1, ...`` as
    lists of *codes* ``epoch · n + index`` (decoded by :class:`SeededAugmentation`). The trainer
    has checked that ``batch_size`` divides over the processes and that ``n >= batch_size``."""

    def __init__(
        self, n: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world_size: int = 1
    ):
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.start_step, self.rank = int(start_step), int(rank)
        self.per_process = self.batch_size // int(world_size)
        self.steps_per_epoch = self.n // self.batch_size
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its order), the last one drawn

    def batch_for_step(self, step: int) -> list[int]:
        """The codes this process loads at global step ``step``."""
        epoch, b = divmod(int(step), self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (
                epoch,
                torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)),
            )
        lo = b * self.batch_size + self.rank * self.per_process
        return [epoch * self.n + int(i) for i in self._order[1][lo : lo + self.per_process]]

    def position(self, step: int) -> dict[str, int]:
        """Where global step ``step`` starts in the data order (recorded in checkpoints)."""
        epoch, b = divmod(int(step), self.steps_per_epoch)
        return {
            "epoch": epoch,
            "batch_in_epoch": b,
            "steps_per_epoch": self.steps_per_epoch,
            "seed": self.seed,
        }

    def __iter__(self) -> Iterator[list[int]]:
        return map(self.batch_for_step, itertools.count(self.start_step))

    def __len__(self) -> int:  # infinite; DataLoader only needs this for len(loader)
        return 2**62


class SeededAugmentation(Dataset):
    """Wraps a training dataset so that sample code ``epoch · n + index`` loads ``dataset[index]``
    with torch's RNG seeded by :func:`sample_seed` (the caller's RNG state is left untouched)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = int(seed)
        self.n = len(dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, code: int):
        epoch, index = divmod(int(code), self.n)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.dataset[index]
