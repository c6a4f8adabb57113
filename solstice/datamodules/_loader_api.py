"""`Loader`: what the Trainer asks of a dataloader, declared once.

Every capability beyond iteration has a default that says "absent" (`None`, or `False`), so
the Trainer never probes with `hasattr`: it calls the method and takes the faster path only
when the loader offers it. Any iterable a DataModule returns is wrapped by `as_loader`.
"""

import abc
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from jaxtyping import PyTree


class Loader(abc.ABC):
    """A dataloader as the Trainer sees it: batches (pytrees of arrays with a leading batch
    axis), in an order fixed for the epoch, and optional capabilities.

    Subclass it for a loader of your own that can do better than the defaults: resume at a
    batch without reading the ones before (`iter_from`), say its batch size (`batch_size`),
    or its length. The built-in loaders implement every capability they can.

    **Example:**

    ```python
    class Shards(solstice.datamodules.Loader):
        def __init__(self, files):
            self.files = files

        def __iter__(self):
            return self.iter_from(0)

        def iter_from(self, start):   # resume without reading the skipped shards
            for f in self.files[start:]:
                yield dict(np.load(f))

        def num_batches(self):
            return len(self.files)
    ```
    """

    #: The global batch size (over all processes), if every batch but a short last
    #: evaluation batch has it; `None` if unknown.
    batch_size: int | None = None

    @abc.abstractmethod
    def __iter__(self) -> Iterator[PyTree]:
        """The epoch's batches, from the first."""

    def num_batches(self) -> int | None:
        """How many batches the epoch has, or `None` if unknown (the default)."""
        return None

    def iter_from(self, start: int) -> Iterator[PyTree]:
        """The epoch's batches from index `start` (the Trainer's exact-resume entry point).
        The default reads and drops the `start` batches before it."""
        return itertools.islice(iter(self), start, None)

    def split_transform(self) -> tuple["Loader", Callable[[PyTree], PyTree]] | None:
        """`(loader, transform)`: the same batches before a transform that the Trainer may
        run inside its compiled step instead (e.g. `uint8` pixels to `float32`: 4x less to
        upload), and that transform; `None` (the default) if there is none."""
        return None

    def device_epoch(self, first_step: int) -> tuple[Callable, PyTree] | None:
        """`(gather, data)` for batches gathered inside the compiled step from data already
        on the devices of `mesh` (see `DeviceBatchLoader`); `None` (the default) if the
        batches come from the host."""
        return None

    #: The device mesh the loader's batches live on (`device_epoch`), or `None`.
    mesh: Any = None

    def iter_stacked(
        self,
        start: int,
        stop: int | None = None,
        *,
        max_batches: int,
        max_bytes: int,
        empty: Callable[[tuple[int, ...], Any], np.ndarray] = np.empty,
    ) -> Iterator[tuple[int, PyTree]] | None:
        """Batches `start` to `stop` gathered straight into stacks of arrays from `empty`
        (see `BatchLoader.iter_stacked`), or `None` (the default) if the loader cannot."""
        return None


class IterableLoader(Loader):
    """Any iterable as a `Loader` with the default capabilities (its `len()`, if it has
    one, is its number of batches)."""

    def __init__(self, iterable: Iterable[PyTree]):
        self.iterable = iterable

    def __iter__(self) -> Iterator[PyTree]:
        return iter(self.iterable)

    def num_batches(self) -> int | None:
        try:
            return len(self.iterable)  # type: ignore[arg-type]
        except TypeError:
            return None

    def __repr__(self) -> str:
        return f"IterableLoader({self.iterable!r})"


def as_loader(loader: Iterable[PyTree]) -> Loader:
    """`loader` itself if it is a `Loader`, else wrapped in an `IterableLoader`."""
    if isinstance(loader, Loader):
        return loader
    if not isinstance(loader, Iterable):
        raise TypeError(
            f"A dataloader must be an iterable of batches (or a `solstice.datamodules.Loader`), "
            f"got `{type(loader).__name__}`. Return a list, a generator or a loader from the "
            "DataModule's `*_dataloader()` methods."
        )
    return IterableLoader(loader)
