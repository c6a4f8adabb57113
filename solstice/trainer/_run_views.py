"""`RunViews`: what the Trainer shows of its current (or last) run, read-only.

The state lives in the `Run`; these properties are the Trainer's typed views of it (the
`TrainerView` protocol that hooks receive), defined apart from the Trainer's settings and
actions.
"""

from typing import TYPE_CHECKING, Any

import jax
from jaxtyping import PyTree

from .._experiment import Experiment
from .._progress import Progress
from .._step_cost import StepCost
from ..callbacks import ModelCheckpoint
from ..datamodules import DataModule
from ._hooks import callback_keys
from ._precision import LOSS_SCALE
from ._sharding_rules import describe_shardings

if TYPE_CHECKING:
    from ._placement import Placement
    from ._run import Run


class RunViews:
    """Read-only views of the Trainer's current run (a mixin of `Trainer`)."""

    _run: "Run | None"
    _placement: "Placement"
    _logged: dict[tuple[str, ...], Any]
    callbacks: list[Any]

    def _current(self) -> "Run":
        if self._run is None:
            raise RuntimeError("The Trainer has no experiment yet; call `fit` (or test, ...).")
        return self._run

    @property
    def progress(self) -> Progress:
        """Epoch, global step, batch within the epoch, validations, stage."""
        return Progress() if self._run is None else self._run.progress

    @property
    def fitting(self) -> bool:
        """Whether `fit` is running (its validations included; not `validate`/`test`)."""
        run = self._run
        return run is not None and run.fitting and run.progress.stage is not None

    @property
    def current_epoch(self) -> int:
        return self.progress.epoch

    @property
    def global_step(self) -> int:
        return self.progress.global_step

    @property
    def experiment(self) -> Experiment:
        """The current experiment (its arrays live on the Trainer's devices)."""
        return self._current().experiment

    @property
    def datamodule(self) -> DataModule | None:
        """The DataModule of the current (or last) run."""
        return None if self._run is None else self._run.datamodule

    @property
    def num_training_batches(self) -> int | None:
        return None if self._run is None else self._run.num_training_batches

    @property
    def train_batch_size(self) -> int | None:
        """The global training batch size, once the first batch has been seen."""
        return None if self._run is None else self._run.train_batch_size

    @property
    def should_stop(self) -> bool:
        return self._run is not None and self._run.should_stop

    @should_stop.setter
    def should_stop(self, value: bool) -> None:
        self._current().should_stop = bool(value)

    @property
    def stopped(self) -> dict[str, Any] | None:
        """Why and where `fit` stopped (`by`, `reason`, `epoch`, `global_step`), or `None`."""
        return None if self._run is None else self._run.stopped

    @property
    def devices(self) -> list[jax.Device]:
        return self._placement.devices

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self._placement.mesh

    @property
    def checkpoint_callbacks(self) -> list[ModelCheckpoint]:
        """The `ModelCheckpoint` callbacks (`ckpt_path="last"`/`"best"` use the first)."""
        return [cb for cb in self.callbacks if isinstance(cb, ModelCheckpoint)]

    @property
    def logged_metrics(self) -> dict[str, Any]:
        """The latest value of every metric logged so far (device arrays or numbers)."""
        out: dict[str, Any] = {}
        for metrics in self._logged.values():
            out.update(metrics)
        return out

    def in_step_value(self, callback: Any) -> PyTree:
        """The current on-device state of `callback.in_step()` (reading it to the host is a
        device sync: at log intervals, not per step). In a validate/test/predict run, the
        final state of the fit whose returned experiment it evaluates, or of the
        `ckpt_path=` checkpoint; `None` where the run has none."""
        for key, cb in callback_keys(self.callbacks):
            if cb is callback:
                return self._current().in_step_value(key)
        raise ValueError(f"{callback!r} is not a callback of this Trainer.")

    def train_step_cost(self) -> StepCost | None:
        """XLA's cost analysis of the compiled training step (`StepCost`: FLOPs and bytes per
        step), or `None` before the run's first training step. The first call lowers the
        step again for the first call's argument shapes; JAX finds the executable in its
        cache (with `steps_per_execution > 1` the single step is compiled once for it)."""
        first = None if self._run is None else self._run.first_train_call
        return None if first is None else first.cost()

    def block_until_ready(self) -> None:
        """Wait until the devices have run every step dispatched so far: the step counter
        the last call returned is ready only then (a device sync: not per step)."""
        run = self._current()
        jax.block_until_ready((run.step_counter, run.experiment_state.leaves))

    @property
    def loss_scale(self) -> float | None:
        """The current loss scale under `precision="16-mixed"`, else `None` (reading it is
        a device sync: not per step)."""
        run = self._run
        if run is None or LOSS_SCALE not in run.in_steps:
            return None
        return float(run.in_step_value(LOSS_SCALE).scale)

    def describe_shardings(self) -> str:
        """A table of the experiment's arrays: path, shape, `PartitionSpec` and the bytes each
        device holds (see `sharding_rules`)."""
        dyn = self._current().dyn
        return describe_shardings(dyn, jax.tree.map(lambda x: x.sharding, dyn))
