"""`RunRequests`: what hooks may ask of the Trainer during a run (publish metrics, media,
stop, continue with another experiment, flush the logs): the actions of the `TrainerView`
protocol, defined apart from the Trainer's settings and its read-only views (`RunViews`)."""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from .._experiment import Experiment
from ..callbacks import LoggingCallback
from ..loggers._convert import check_scalars, to_floats
from ._run_views import RunViews


class RunRequests(RunViews):
    """Requests from hooks to the Trainer's current run (a base of `Trainer`, on its
    views)."""

    _logging: LoggingCallback
    callbacks: list[Any]
    callback_metrics: dict[str, float]

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Publish extra scalars (numbers or 0-d device arrays) like the Trainer's own: to
        every `on_log`, the loggers and `trainer.history`, with the current `"epoch"`.
        Device values are copied (an array of the experiment is donated to the next step)
        and converted on the logging thread, so this never syncs, except for the metrics a
        callback declares in `provided_metrics()`: those are read at once into
        `callback_metrics`, where `EarlyStopping` and `ModelCheckpoint` can monitor them.
        `step` defaults to `trainer.global_step`."""
        check_scalars(metrics)
        run = self._current()
        metrics = {k: jnp.copy(v) if isinstance(v, jax.Array) else v for k, v in metrics.items()}
        run.publish(metrics, self.global_step if step is None else int(step))
        provided = {name for cb in self.callbacks for name in cb.provided_metrics()}
        if provided.intersection(metrics):
            self._update_callback_metrics({k: v for k, v in metrics.items() if k in provided})

    def log_images(self, images: Mapping[str, Any], step: int | None = None) -> None:
        """Send images (name -> array, see `Logger.log_images`) to the loggers, never syncing:
        copied on the device here, read back on the logging thread (as `log_metrics`)."""
        self._logging.log_images(images, self.global_step if step is None else int(step))

    def log_histograms(self, values: Mapping[str, Any], step: int | None = None) -> None:
        """Send a histogram of each array of `values` to the loggers (as `log_images`)."""
        self._logging.log_histograms(values, self.global_step if step is None else int(step))

    def after_save_checkpoint(self, path: str, info: Mapping[str, Any]) -> None:
        """Tell the loggers a checkpoint was committed (`Logger.after_save_checkpoint`)."""
        self._logging.after_save_checkpoint(path, info)

    def stop(self, reason: str, *, by: str) -> None:
        """Ask `fit` to stop after the current step and the epoch's end-of-epoch work. Why
        and where are kept in `trainer.stopped` and in checkpoints taken from then on, so a
        resumed run stays stopped (see `fit`)."""
        self._current().stop(reason, by)

    def replace_experiment(self, experiment: Experiment, *, by: str) -> None:
        """Continue the run with `experiment` (`by`: who asks, for messages)."""
        self._current().replace_experiment(experiment, by)

    def flush_logs(self, *, loggers: bool = True) -> None:
        """Wait until `history` holds everything published so far, and (with `loggers`) the
        loggers have written it, each for at most `LoggingCallback.flush_timeout` seconds."""
        self._logging.flush_history()
        if loggers:
            self._logging.flush()

    def _update_callback_metrics(self, metrics: dict[str, Any]) -> dict[str, float]:
        host = to_floats(metrics)  # one copy; a non-scalar raises naming the metric
        self.callback_metrics.update(host)
        return host
