"""`LoggingCallback`: sends published metrics to the loggers, off the training thread."""

import warnings
from collections.abc import Sequence
from typing import Any

import jax

from .._config import hyperparameters
from ..loggers import AsyncLogger, FanoutLogger, History, Logger
from ._callback import Callback


class LoggingCallback(Callback):
    """Forwards every `on_log` to the loggers through one background thread.

    The Trainer adds one automatically, wrapping its `loggers=` (and `trainer.history`) as
    `AsyncLogger(FanoutLogger(loggers))`: values stay on the device until the logging thread
    converts them; a failing logger is reported with a warning and disabled, never fatal.
    At fit start the experiment's static configuration and the Trainer's settings are logged as
    hyperparameters. With several processes only process 0 writes to the loggers; every
    process keeps its in-memory `History`.
    """

    _reads_experiment = False  # its hooks take the experiment from the trainer if needed

    def __init__(self, loggers: Sequence[Logger]):
        self.loggers = list(loggers)
        self._sink: Logger | None = None

    @property
    def sink(self) -> Logger:
        if self._sink is None:
            loggers = self.loggers
            if jax.process_index() != 0:  # one writer per run: process 0
                loggers = [lg for lg in loggers if isinstance(lg, History)]
            self._sink = AsyncLogger(FanoutLogger(loggers))
        return self._sink

    def on_fit_start(self, trainer, experiment) -> None:
        params = hyperparameters(trainer.experiment)  # `experiment` is None (see above)
        params.update({f"trainer.{k}": v for k, v in trainer.hparams.items()})
        self.sink.log_hyperparams(params)

    def on_log(self, trainer, experiment, metrics: dict[str, Any], step: int) -> None:
        self.sink.log_metrics(metrics, step)

    def flush(self) -> None:
        if self._sink is not None:
            self.sink.flush()

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def state_dict(self) -> dict[str, Any]:
        return {"run_ids": [logger.run_id for logger in self.loggers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make each logger continue the run it wrote to before (e.g. the same W&B run id)."""
        run_ids = state.get("run_ids", [])
        if len(run_ids) != len(self.loggers):
            warnings.warn(
                f"The checkpoint was written with {len(run_ids)} logger(s), this Trainer has "
                f"{len(self.loggers)}; logger runs are not continued. Pass the same `loggers=` "
                "to continue them.",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        for logger, run_id in zip(self.loggers, run_ids):
            if run_id is not None:
                logger.resume_from(run_id)
