"""`ProgressBar`: a tqdm bar per epoch with live metrics, without syncing the device."""

import sys
from typing import Any

from .._periodic import Every
from ._callback import Callback


def _format(value: float) -> str:
    return f"{value:.4g}"


class ProgressBar(Callback):
    """Shows a tqdm bar per training epoch with steps/s and the latest metrics.

    The bar advances at log intervals (`log_every_n_steps`) and epoch ends, never per step,
    and at most as often as tqdm redraws (`mininterval`, 0.1 s): logging every step costs it
    next to nothing. It shows the values that the logging thread has already converted
    (`trainer.history`), so it never reads from the device and never stalls training. After
    validation the `val/*` metrics are added to the epoch's bar.

    **Arguments:**

    - `metrics`: substrings of metric names to show (default: `loss` and `accuracy`).
    - `leave`: keep each epoch's bar on screen when it finishes.

    **Example:**

    ```python
    trainer = solstice.Trainer(max_epochs=5, callbacks=[ProgressBar(metrics=("loss", "f1"))])
    ```
    """

    _reads_experiment = False  # its hooks never look at the experiment

    def __init__(self, metrics: tuple[str, ...] = ("loss", "accuracy"), leave: bool = True):
        self.metrics = tuple(metrics)
        self.leave = leave
        self._bar: Any = None
        self._shown: dict[str, str] = {}
        self._wanted_names: dict[str, bool] = {}  # a cache of `_wanted`, for `_wanted_for`
        self._wanted_for = self.metrics
        self._redraw = Every(seconds=0.1)  # tqdm's `mininterval`, set with the bar

    def _wanted(self, name: str) -> bool:
        if self._wanted_for is not self.metrics:  # `metrics` was changed
            self._wanted_names.clear()
            self._wanted_for = self.metrics
        wanted = self._wanted_names.get(name)
        if wanted is None:
            short = name.split("/", 1)[-1]
            wanted = any(m in short for m in self.metrics) and not short.endswith("_epoch")
            self._wanted_names[name] = wanted
        return wanted

    def _refresh(self, trainer, flush: bool = False) -> None:
        if flush:  # epoch end: waiting for the logging thread is allowed here
            trainer.flush_logs(loggers=False)
        metrics = trainer.history.metrics  # read in place: the last value of each wanted list
        for name in tuple(metrics):  # (a copy of the names: the logging thread may add one)
            if self._wanted(name):
                values = metrics.get(name)
                if values:
                    self._shown[name] = _format(values[-1])
        if self._bar is not None and self._shown:
            self._bar.set_postfix(self._shown, refresh=False)

    def _update(self, trainer) -> None:
        """Bring the bar to the current batch, with fresh metrics (tqdm redraws if due)."""
        self._refresh(trainer)
        self._bar.update(trainer.progress.batch_idx - self._bar.n)
        self._redraw.fired(trainer.progress.batch_idx)

    def on_train_epoch_start(self, trainer, experiment) -> None:
        from tqdm.auto import tqdm

        self._close()
        self._bar = tqdm(
            total=trainer.num_training_batches,
            initial=trainer.progress.batch_idx,
            desc=f"Epoch {trainer.current_epoch}",
            unit="step",
            leave=self.leave,
            dynamic_ncols=True,
            miniters=1,  # redraw at every update after `mininterval`; `on_log` paces them
            file=sys.stderr,
        )
        self._redraw = Every(seconds=self._bar.mininterval)
        self._redraw.last_time = float("-inf")  # the first interval redraws at once

    def on_log(self, trainer, experiment, metrics: dict[str, Any], step: int) -> None:
        # Called at every log interval (every step with `log_every_n_steps=1`): only the clock
        # is read, until tqdm would redraw anyway.
        if self._bar is None or not self._redraw.time_due():
            return
        if trainer.progress.stage == "train":
            self._update(trainer)

    def on_train_epoch_end(self, trainer, experiment) -> None:
        self._refresh(trainer, flush=True)
        if self._bar is not None:
            self._bar.update(trainer.progress.batch_idx - self._bar.n)
        self._close()

    def on_fit_end(self, trainer, experiment) -> None:
        self._close()

    def on_exception(self, trainer, experiment, exception) -> None:
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix(self._shown, refresh=False)
            self._bar.close()
            self._bar = None
