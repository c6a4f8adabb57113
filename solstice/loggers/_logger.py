"""The `Logger` abstraction: somewhere to send dictionaries of scalars."""

import abc
from collections.abc import Mapping
from typing import Any


class Logger(abc.ABC):
    """Receives dictionaries of scalar metrics (and hyperparameters) and records them.

    `log_metrics` is the one method to implement. Values may be Python numbers, numpy
    scalars or 0-d JAX arrays; a logger converts them with `float(...)` itself. Wrap any logger
    in `solstice.loggers.AsyncLogger` to move that conversion (a device-to-host copy) and the
    I/O off the training thread; the Trainer does this for every logger it is given.

    **Example:**

    ```python
    class PrintLogger(solstice.Logger):
        def log_metrics(self, metrics, step):
            print(step, {k: float(v) for k, v in metrics.items()})
    ```
    """

    @abc.abstractmethod
    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record `metrics` (name -> scalar) at training step `step`."""

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        """Record the run's hyperparameters (a flat or nested mapping). Default: ignore."""

    def flush(self) -> None:
        """Make everything logged so far durable/visible. Default: nothing to do."""

    def close(self) -> None:
        """Flush and release resources. Must be safe to call more than once."""
        self.flush()

    def resume_from(self, run_id: str) -> "Logger":
        """Continue the run `run_id` (saved in a checkpoint) instead of starting a new one.

        Called by the Trainer when resuming, before anything is logged. Default: nothing to
        continue (file loggers append to their directory anyway). Returns `self`.
        """
        return self

    @property
    def run_id(self) -> str | None:
        """An identifier of the run this logger writes to, saved in checkpoints so a resumed
        run continues it (W&B run id, log directory, ...). Default: `None`."""
        return None
