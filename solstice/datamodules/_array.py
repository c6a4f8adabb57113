"""`ArrayDataModule`: a DataModule over in-memory arrays, one pytree per split."""

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh
from jaxtyping import PyTree

from .._checks import check_int
from ._augment import StepKeyed
from ._batching import batch_size_of, check_numeric
from ._datamodule import DataModule
from ._device import DeviceBatchLoader, check_mesh, default_mesh, put_replicated
from ._loader import BatchLoader

SPLITS = ("train", "val", "test", "predict")


class ArrayDataModule(DataModule):
    """Serves in-memory arrays: each split is a pytree of arrays with a shared leading axis.

    Training batches are shuffled with an order fixed by `(seed, epoch)` and the final partial
    batch is dropped; evaluation and predict batches keep every example, the last batch shorter
    if the split is not a multiple of the evaluation batch size (the Trainer runs it so that
    every example counts exactly once, see `solstice.Experiment.honours_mask`). Splits may be
    any pytree: dicts, tuples, named tuples, nested containers.

    With `on_device=True` every split is uploaded once to the devices (a full copy on each
    device of `mesh`) and batches are gathered there: no host-to-device copy per step. The
    batches are the same as in host mode (same order, padding and values), but are
    `jax.Array`s already sharded along the batch axis, as the Trainer places them. Keep the
    default host mode for data that does not fit in device memory.

    **Arguments:**

    - `train`, `val`, `test`, `predict`: the splits (`None` = absent).
    - `batch_size`: global training batch size.
    - `eval_batch_size`: global batch size for val/test/predict (default: `batch_size`).
    - `shuffle`: shuffle training batches each epoch.
    - `seed`: fixes the order (and the keys of `augment`).
    - `on_device`: keep the data on the devices and gather batches there.
    - `mesh`: the devices for `on_device` (a `jax.sharding.Mesh` with a `"batch"` or
      `"data"` axis); default: every device, which is the Trainer's default. Pass the
      Trainer's mesh (`trainer.mesh`) if it uses other devices or a mesh of several axes.
    - `transform`: optional deterministic function applied to every batch after gathering and
      padding: to numpy arrays in host mode, to jax arrays inside the compiled gather in device
      mode. Write it with operations both support (arithmetic, indexing, `.astype`), or branch
      on `isinstance(x, np.ndarray)` like `PixelDecode`. It must not change the batch size.
      The Trainer runs it inside its compiled steps on host batches too (they then travel to
      the device before the transform, e.g. as `uint8` pixels), unless per-batch hooks need
      the transformed batch on the host.
    - `augment`: optional random training augmentation `augment(batch, key) -> batch`, a pure
      jax function. It is not applied by the loaders: it is exposed as
      `self.device_transform(batch, step)`, which the Trainer applies to each training batch on
      the device with `key = jax.random.fold_in(jax.random.key(seed), step)`.

    **Example:**

    ```python
    dm = ArrayDataModule(train={"image": x_train, "label": y_train},
                         val={"image": x_val, "label": y_val}, batch_size=64, on_device=True)
    ```
    """

    def __init__(
        self,
        train: PyTree | None = None,
        val: PyTree | None = None,
        test: PyTree | None = None,
        predict: PyTree | None = None,
        *,
        batch_size: int,
        eval_batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        on_device: bool = False,
        mesh: Mesh | None = None,
        transform: Callable[[PyTree], PyTree] | None = None,
        augment: Callable[[PyTree, jax.Array], PyTree] | None = None,
    ):
        check_int("batch_size", batch_size, minimum=1)
        check_int("eval_batch_size", eval_batch_size, minimum=1, allow_none=True)
        if not isinstance(on_device, bool):
            raise TypeError(f"`on_device` must be True or False, got {on_device!r}.")
        if mesh is not None and not on_device:
            raise ValueError("`mesh` only applies with `on_device=True`; pass both or neither.")
        self.splits: dict[str, PyTree | None] = {
            "train": train,
            "val": val,
            "test": test,
            "predict": predict,
        }
        for name, split in self.splits.items():
            if split is not None:
                batch_size_of(split)  # validates a shared leading axis
                check_numeric(split, what=name)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.on_device = on_device
        self.mesh = mesh
        self.transform = transform
        self.augment = augment
        self._device_cache: dict[str, tuple[PyTree, PyTree]] = {}
        if mesh is not None:  # without one, checked when loading: jax.devices() must not
            check_mesh(mesh, self.batch_size)  # run before `jax.distributed.initialize()`
            check_mesh(mesh, self.eval_batch_size)

    @property
    def device_transform(self) -> Callable[[PyTree, Any], PyTree] | None:
        """`None`, or the training augmentation as `fn(batch, step) -> batch` (see `augment`).

        The Trainer calls it on every *training* batch after placing it on the devices
        (inside or next to its compiled step), with `step` the global step index of that
        batch (0-based, counted over all epochs; a Python int or an int32 array, traced or
        not). It is a pure jax function: deterministic in `(seed, step)`, so a resumed run
        sees the same augmentation, and independent of how the batch is sharded.
        """
        if self.augment is None:
            return None
        return StepKeyed(self.augment, self.seed)

    def _device_arrays(self, split: str, arrays: PyTree) -> PyTree:
        cached = self._device_cache.get(split)
        if cached is not None and cached[0] is arrays:
            return cached[1]
        mesh = self.mesh if self.mesh is not None else default_mesh()
        device_arrays = put_replicated(arrays, mesh)
        self._device_cache[split] = (arrays, device_arrays)
        return device_arrays

    def _loader(self, split: str, *, train: bool) -> BatchLoader | DeviceBatchLoader | None:
        arrays = self.splits.get(split)
        if arrays is None:
            return None
        n = batch_size_of(arrays)
        size = self.batch_size if train else self.eval_batch_size
        if n == 0 or (train and n < size):
            raise ValueError(
                f"The `{split}` split has {n} examples, fewer than one batch of {size}; "
                "training would run zero steps. Provide more data or a smaller `batch_size`."
            )
        if self.on_device:
            return DeviceBatchLoader(
                self._device_arrays(split, arrays),
                size,
                mesh=self.mesh,
                shuffle=self.shuffle and train,
                seed=self.seed,
                epoch=self.epoch,
                drop_last=train,
                transform=self.transform,
            )
        return BatchLoader(
            arrays,
            size,
            shuffle=self.shuffle and train,
            seed=self.seed,
            epoch=self.epoch,
            drop_last=train,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            transform=self.transform,
            traceable_transform=True,  # this class's contract: see `transform`
        )

    def train_dataloader(self) -> BatchLoader | DeviceBatchLoader:
        loader = self._loader("train", train=True)
        if loader is None:
            raise ValueError(f"`{type(self).__name__}` has no `train` split; pass `train=` to fit.")
        return loader

    def val_dataloader(self) -> BatchLoader | DeviceBatchLoader | None:
        return self._loader("val", train=False)

    def test_dataloader(self) -> BatchLoader | DeviceBatchLoader | None:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> BatchLoader | DeviceBatchLoader | None:
        return self._loader("predict", train=False)
