"""`TrainerView`: what hooks see of the Trainer, and the actions they may ask of it.

Callbacks and experiment hooks receive the Trainer typed as this protocol: the position in
the run, its settings and results, read-only, and a few requests (log, stop, replace the
experiment, flush the logs). They never touch its private attributes, and the callbacks
package does not import the Trainer's module.
"""

import datetime
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import jax
from jaxtyping import PyTree

from ._progress import Progress

if TYPE_CHECKING:
    from ._experiment import Experiment
    from ._step_cost import StepCost
    from .loggers import History, Logger


class TrainerView(Protocol):
    """The Trainer as a hook sees it (`solstice.Trainer` implements it)."""

    # ---- where the run is
    @property
    def progress(self) -> Progress:
        """Epoch, global step, batch within the epoch and stage (read-only)."""
        ...

    @property
    def current_epoch(self) -> int: ...

    @property
    def global_step(self) -> int: ...

    @property
    def num_training_batches(self) -> int | None:
        """The batches of the current training epoch, if known."""
        ...

    @property
    def train_batch_size(self) -> int | None:
        """The global training batch size, once the first batch has been seen."""
        ...

    @property
    def fitting(self) -> bool:
        """Whether `fit` is running (its validations included; not `validate`/`test`)."""
        ...

    # ---- settings
    max_epochs: int | None
    max_steps: int | None
    check_val_every_n_epoch: int | None
    val_check_interval: "int | float | datetime.timedelta | None"
    log_every_n_steps: int
    steps_per_execution: int
    accumulate_grad_batches: int
    fast_dev_run: int

    @property
    def loggers(self) -> Sequence["Logger"]: ...

    @property
    def hparams(self) -> dict[str, Any]: ...

    @property
    def devices(self) -> list[jax.Device]: ...

    @property
    def mesh(self) -> jax.sharding.Mesh: ...

    # ---- results
    @property
    def callback_metrics(self) -> dict[str, float]:
        """The latest host value of every monitorable metric (epoch ends, validation)."""
        ...

    @property
    def history(self) -> "History": ...

    @property
    def experiment(self) -> "Experiment":
        """The current experiment (its arrays on the Trainer's devices)."""
        ...

    @property
    def should_stop(self) -> bool: ...

    @property
    def stopped(self) -> dict[str, Any] | None:
        """Why and where `fit` stopped (see `stop`), or `None`."""
        ...

    @property
    def checkpoint_callbacks(self) -> list[Any]: ...

    # ---- requests
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Publish scalars to every `on_log`, the loggers and the history."""
        ...

    def log_images(self, images: Mapping[str, Any], step: int | None = None) -> None:
        """Send images to the loggers that record them (off the training thread)."""
        ...

    def log_histograms(self, values: Mapping[str, Any], step: int | None = None) -> None:
        """Send a histogram of each array to the loggers that record them."""
        ...

    def after_save_checkpoint(self, path: str, info: Mapping[str, Any]) -> None:
        """Tell the loggers a checkpoint was committed at `path`."""
        ...

    def stop(self, reason: str, *, by: str) -> None:
        """Ask `fit` to stop after the current step and epoch-end work."""
        ...

    def replace_experiment(self, experiment: "Experiment", *, by: str) -> None:
        """Continue with `experiment` (e.g. the best one, restored) from here on."""
        ...

    def in_step_value(self, callback: Any) -> PyTree:
        """The current on-device state of `callback.in_step()` (reading it to the host is a
        device sync: do it at log intervals, not per step); in an evaluation run, that of
        the fit or checkpoint its experiment comes from; `None` if there is none."""
        ...

    def train_step_cost(self) -> "StepCost | None":
        """XLA's cost analysis of the compiled training step (FLOPs, bytes), or `None`
        before the run's first training step."""
        ...

    def block_until_ready(self) -> None:
        """Wait until the devices have run every step dispatched so far (a device sync: for
        a profiler's trace or a timing, never per step)."""
        ...

    def flush_logs(self, *, loggers: bool = True) -> None:
        """Wait until the history (and with `loggers`, the loggers) have everything
        published so far."""
        ...
