"""The order of one epoch: which examples form each global batch, and each process's share."""

from collections.abc import Iterator
from typing import Any

import numpy as np

from .._checks import check_int
from ._loader_api import Loader


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of `epoch`: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


class EpochOrder:
    """Index bookkeeping shared by every built-in loader (host, device and torch).

    Global batch `b` holds positions `[b * batch_size, (b + 1) * batch_size)` of the epoch's
    order. Training (`drop_last=True`) drops the final partial batch; evaluation keeps it as
    a shorter last batch (never padded: the Trainer decides how to run it, see
    `Trainer.validate`), so every example is seen exactly once. Process `p` of `P` owns the
    contiguous slice `[p * batch_size // P, (p + 1) * batch_size // P)` of every global batch,
    so the global batches do not depend on the number of processes (a process's share of the
    short last batch may hold fewer rows, or none).

    **Arguments:**

    - `num_examples`: size of the split.
    - `batch_size`: the global batch size (over all processes).
    - `shuffle`, `seed`, `epoch`: a shuffled order is `epoch_permutation(num_examples, seed,
      epoch)`; otherwise the examples come in their stored order.
    - `drop_last`: drop the final partial batch (training) or keep it (evaluation).
    - `process_index`, `process_count`: which share of every global batch this process gets.

    **Example:**

    ```python
    order = EpochOrder(10, 4, shuffle=True, seed=0, epoch=1, drop_last=False)
    len(order)               # 3 batches, the last one has 2 examples
    order.local_indices(2)   # the example indices of batch 2 (2 of them)
    ```
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        epoch: int,
        drop_last: bool,
        process_index: int = 0,
        process_count: int = 1,
    ):
        check_int("batch_size", batch_size, minimum=1)
        if not 0 <= process_index < process_count:
            raise ValueError(
                f"`process_index` must be in [0, {process_count}), got {process_index}."
            )
        if batch_size % process_count != 0:
            raise ValueError(
                f"The global `batch_size` {batch_size} is not divisible by the number of "
                f"processes {process_count}; choose a multiple of {process_count}."
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.drop_last = drop_last
        self.process_index = process_index
        self.process_count = process_count
        self.local_batch_size = batch_size // process_count
        self._order: np.ndarray | None = None

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_examples // self.batch_size
        return -(-self.num_examples // self.batch_size)

    def indices(self) -> np.ndarray:
        """The order of all examples this epoch (computed once, then cached)."""
        if self._order is None:
            if self.shuffle:
                self._order = epoch_permutation(self.num_examples, self.seed, self.epoch)
            else:
                self._order = np.arange(self.num_examples)
        return self._order

    def check_start(self, start: int) -> None:
        """Raise `ValueError` unless `start` is a batch index this epoch can start from."""
        if isinstance(start, bool) or not isinstance(start, int | np.integer):
            raise TypeError(f"`start` must be an int batch index, got {start!r}.")
        if not 0 <= start <= len(self):
            raise ValueError(
                f"`start` must be in [0, {len(self)}] (this epoch has {len(self)} batches), "
                f"got {start}."
            )

    def local_indices(self, b: int) -> np.ndarray:
        """This process's example indices in global batch `b` (fewer than
        `local_batch_size`, possibly none, only in a short last evaluation batch)."""
        lo = b * self.batch_size + self.process_index * self.local_batch_size
        return self.indices()[lo : lo + self.local_batch_size]

    def global_indices(self, b: int) -> np.ndarray:
        """Every process's example indices in global batch `b`, in order (fewer than
        `batch_size` only in a short last evaluation batch)."""
        return self.indices()[b * self.batch_size : (b + 1) * self.batch_size]

    def full_batches(self) -> np.ndarray:
        """The example indices of every full global batch of the epoch at once, shape
        `(num_full_batches, batch_size)` (a short last evaluation batch is not included:
        see `global_indices`)."""
        full = self.num_examples // self.batch_size
        order = self.indices()[: full * self.batch_size]
        return order.astype(np.int32).reshape(full, self.batch_size)


class OrderedLoader(Loader):
    """Base of the built-in loaders: batches in the order of an `EpochOrder`, resumable.

    Subclasses call `_set_order(...)` and implement `_batches(start)`; this gives them `len()`,
    iteration, `indices()` and `iter_from(start)` (the Trainer's exact-resume entry point).
    """

    order: EpochOrder
    batch_size: int

    def _set_order(self, num_examples: int, batch_size: int, *, drop_last: bool, **order) -> None:
        """Set `self.order` (an `EpochOrder`; `order` holds its other arguments) and the
        `num_examples`, `batch_size` and `drop_last` every loader exposes."""
        self.order = EpochOrder(num_examples, batch_size, drop_last=drop_last, **order)
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        return len(self.order)

    def num_batches(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[Any]:
        return self.iter_from(0)

    def indices(self) -> np.ndarray:
        """The order of examples this epoch."""
        return self.order.indices()

    def iter_from(self, start: int) -> Iterator[Any]:
        """Yield this epoch's batches starting at batch index `start`."""
        self.order.check_start(start)
        return self._batches(start)

    def _batches(self, start: int) -> Iterator[Any]:
        raise NotImplementedError
