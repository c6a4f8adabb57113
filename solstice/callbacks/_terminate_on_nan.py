"""`TerminateOnNaN`: stop training when the training metrics stop being finite."""

import warnings

from .._in_step import FirstNonFinite, InStep
from ._callback import Callback
from ._intervals import is_train_epoch_end, is_train_interval


class TerminateOnNaN(Callback):
    """Stops `fit` when a training step's metrics (e.g. its loss) hold NaN or inf.

    The check runs inside the compiled training step (an in-step reduction,
    `Callback.in_step`): the Trainer carries a small on-device counter that records the first
    step whose metrics were not finite. It is read only when metrics are published (every
    `log_every_n_steps` steps and at epoch ends), never per step, so it costs no
    synchronisation. When it is set, the run stops (after the current epoch's end-of-epoch
    work) with a `RuntimeWarning` naming the step, which `nonfinite_step` then holds.
    `ModelCheckpoint` never saves a state with non-finite arrays, so the last checkpoint is
    the last finite state.

    **Example:**

    ```python
    trainer = solstice.Trainer(max_epochs=10, callbacks=[TerminateOnNaN(), ModelCheckpoint("ckpts")])
    ```
    """

    def __init__(self) -> None:
        self.nonfinite_step: int | None = None

    def in_step(self) -> InStep:
        return FirstNonFinite()

    def on_train_start(self, trainer, experiment) -> None:
        self.nonfinite_step = None

    def on_log(self, trainer, experiment, metrics, step) -> None:
        if self.nonfinite_step is not None or trainer.progress.stage != "train":
            return
        if not (is_train_interval(metrics) or is_train_epoch_end(metrics)):
            return  # (a callback's own record: no second read at the same moment)
        bad = int(trainer.in_step_value(self))  # at log intervals only: one small read
        if bad < 0:
            return
        self.nonfinite_step = bad
        trainer.stop(
            f"the training metrics stopped being finite at training step {bad}.",
            by="TerminateOnNaN",
        )
        last = next(
            (cb.last_model_path for cb in trainer.checkpoint_callbacks if cb.last_model_path), ""
        )
        saved = (
            f"The last checkpoint, `{last}`, holds the last finite state."
            if last
            else "No checkpoint was saved; add a `ModelCheckpoint` to keep the last finite state."
        )
        warnings.warn(
            f"TerminateOnNaN: the training metrics stopped being finite at training step {bad} "
            f"(counting from 1; noticed at step {trainer.global_step}, epoch "
            f"{trainer.current_epoch}). Stopping. {saved}",
            RuntimeWarning,
            stacklevel=2,
        )
