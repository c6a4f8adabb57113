"""`ProgressBar`: a tqdm bar per epoch with live metrics, without syncing the device."""

import sys
from typing import Any

from ._callback import Callback


def _format(value: float) -> str:
    return f"{value:.4g}"


class ProgressBar(Callback):
    """Shows a tqdm bar per training epoch with steps/s and the latest metrics.

    The bar advances at log intervals (`log_every_n_steps`) and epoch ends, never per step.
    It shows the values that the logging thread has already converted (`trainer.history`),
    so it never reads from the device and never stalls training. After validation the
    `val/*` metrics are added to the epoch's bar.

    **Arguments:**

    - `metrics`: substrings of metric names to show (default: `loss` and `accuracy`).
    - `leave`: keep each epoch's bar on screen when it finishes.

    **Example:**

    ```python
    trainer = solstice.Trainer(max_epochs=5, callbacks=[ProgressBar(metrics=("loss", "f1"))])
    ```
    """

    def __init__(self, metrics: tuple[str, ...] = ("loss", "accuracy"), leave: bool = True):
        self.metrics = tuple(metrics)
        self.leave = leave
        self._bar: Any = None
        self._shown: dict[str, str] = {}

    def _wanted(self, name: str) -> bool:
        short = name.split("/", 1)[-1]
        return any(m in short for m in self.metrics) and not short.endswith("_epoch")

    def _refresh(self, trainer, flush: bool = False) -> None:
        if flush:  # epoch end: waiting for the logging thread is allowed here
            trainer._logging.flush()
        history = trainer.history
        for name in list(history.metrics):
            if self._wanted(name) and history.metrics[name]:
                self._shown[name] = _format(history.metrics[name][-1])
        if self._bar is not None and self._shown:
            self._bar.set_postfix(self._shown, refresh=False)

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
            file=sys.stderr,
        )

    def on_log(self, trainer, experiment, metrics: dict[str, Any], step: int) -> None:
        if self._bar is None or trainer.progress.stage != "train":
            return
        self._refresh(trainer)
        self._bar.update(trainer.progress.batch_idx - self._bar.n)

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
