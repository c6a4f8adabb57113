"""`TrainAccumulators`: the on-device metric accumulators of the current training epoch."""

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from ..checkpointing._checkpoint_state import StoredTree
from ._flat import FlatTree


class TrainAccumulators:
    """The metrics of the current log interval (`acc`) and of the epoch so far (`total`),
    merged on the device inside the compiled steps, and the flags saying which of them
    restarts at the next step.

    They are part of a mid-epoch checkpoint (`metrics` and `flags`), so metrics after a
    resume are bit-identical too. Their structure is that of the experiment's metrics, known
    once the first step's batch is (`init`); restored arrays wait for it (`StoredTree`).
    """

    def __init__(self, true: jax.Array, false: jax.Array):
        self._true, self._false = true, false
        self.acc_flat = FlatTree()
        self.total_flat = FlatTree()
        self.fresh_interval = True
        self.fresh_epoch = True
        self.steps_in_interval = 0
        self.interval_closed = False  # closed inside a step, not yet published
        self._restored: StoredTree | None = None

    @property
    def acc(self) -> PyTree:
        return self.acc_flat.tree

    @property
    def total(self) -> PyTree:
        return self.total_flat.tree

    @property
    def ready(self) -> bool:
        """Whether the accumulators exist (the first step's batch showed their structure)."""
        return self.acc_flat.treedef is not None

    @property
    def restoring(self) -> bool:
        """Whether accumulators restored from a checkpoint wait for `init`."""
        return self._restored is not None

    def init(self, empty: PyTree) -> None:
        """Create them from `empty` (zeros shaped like one step's metrics), or from the
        restored arrays, checked against that structure."""
        if self._restored is None:
            self.acc_flat.tree = empty
            self.total_flat.tree = jax.tree.map(jnp.copy, empty)
            return
        stored, self._restored = self._restored, None
        restored = stored.resolve({"acc": empty, "total": empty}, "training accumulators")
        self.acc_flat.tree, self.total_flat.tree = restored["acc"], restored["total"]

    def reset_flag(self) -> jax.Array:
        flag = self._true if self.fresh_interval else self._false
        self.fresh_interval = False
        return flag

    def epoch_flag(self) -> jax.Array:
        flag = self._true if self.fresh_epoch else self._false
        self.fresh_epoch = False
        return flag

    def new_interval(self) -> None:
        self.fresh_interval = True
        self.steps_in_interval = 0
        self.interval_closed = False

    def new_epoch(self) -> None:
        self.new_interval()
        self.fresh_epoch = True

    # ---- checkpoint
    @property
    def held(self) -> bool:
        """Whether there are accumulators to checkpoint: live ones, or restored ones that
        no step has taken up yet (a run stopped right after it resumed mid-epoch)."""
        return self.ready or self.restoring

    def metrics(self) -> PyTree:
        """The arrays a mid-epoch checkpoint holds (as restored, if no step has run since),
        or `None` if there are none."""
        if self._restored is not None:
            return self._restored
        return None if not self.ready else {"acc": self.acc, "total": self.total}

    def flags(self) -> dict[str, Any]:
        return {
            "fresh_interval": self.fresh_interval,
            "fresh_epoch": self.fresh_epoch,
            "steps_in_interval": self.steps_in_interval,
        }

    def restore(self, flags: dict[str, Any], metrics: StoredTree | None) -> None:
        """Restore the flags, and arrays that replace the accumulators at `init`."""
        self.fresh_interval = bool(flags["fresh_interval"])
        self.fresh_epoch = bool(flags["fresh_epoch"])
        self.steps_in_interval = int(flags["steps_in_interval"])
        self.acc_flat.tree = None
        self.total_flat.tree = None
        self._restored = metrics
