"""The `DataModule` base class: where a run's batches come from."""

from collections.abc import Iterable
from typing import Any

from jaxtyping import PyTree


class DataModule:
    """Provides the batches of every stage; swap one for another without touching the model.

    A batch is a pytree (usually a `dict`) of numpy arrays sharing a leading batch axis.
    The Trainer calls `prepare_data()` once (downloads), `setup(stage)` with `stage` one of
    `"fit"`, `"validate"`, `"test"`, `"predict"`, then `set_epoch(epoch)` before asking for
    each epoch's `train_dataloader()`. The order of training batches must be a function of
    (seed, epoch) so that runs are reproducible and resume exactly.

    A dataloader may be any iterable. If it has an `iter_from(start)` method (as the
    built-in `BatchLoader` does) the Trainer uses it to resume mid-epoch at batch `start`;
    otherwise it skips `start` batches by iterating.

    **Example:**

    ```python
    class Squares(solstice.datamodules.DataModule):
        def train_dataloader(self):
            rng = np.random.default_rng(self.epoch)
            for _ in range(10):
                x = rng.normal(size=(32, 1)).astype(np.float32)
                yield {"x": x, "y": x**2}
    ```
    """

    epoch: int = 0
    #: Optional `transform(batch, step) -> batch` the Trainer applies to every training
    #: batch inside the compiled step (`step`: the global step, an int32 array), e.g.
    #: on-device augmentation keyed by `fold_in(key(seed), step)`.
    device_transform: Any = None

    def prepare_data(self) -> None:
        """Download or prepare data on disk. Called once, before `setup`."""

    def setup(self, stage: str) -> None:
        """Load/split data for `stage` (`"fit"`, `"validate"`, `"test"` or `"predict"`)."""

    def set_epoch(self, epoch: int) -> None:
        """Tell the datamodule which epoch the next `train_dataloader()` is for."""
        self.epoch = epoch

    def train_dataloader(self) -> Iterable[PyTree]:
        """Return the training batches of epoch `self.epoch`."""
        raise NotImplementedError(
            f"`{type(self).__name__}` does not implement `train_dataloader()`, which "
            "`Trainer.fit` needs. Return an iterable of batches (pytrees of numpy arrays)."
        )

    def val_dataloader(self) -> Iterable[PyTree] | None:
        """Return the validation batches, or `None` for no validation."""
        return None

    def test_dataloader(self) -> Iterable[PyTree] | None:
        """Return the test batches, or `None` if there is no test split."""
        return None

    def predict_dataloader(self) -> Iterable[PyTree] | None:
        """Return the batches to predict on, or `None`."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state saved in checkpoints (default: the current epoch)."""
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output."""
        self.epoch = int(state.get("epoch", 0))
