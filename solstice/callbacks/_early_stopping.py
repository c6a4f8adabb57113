"""`EarlyStopping`: stop fitting when a monitored metric stops improving."""

import logging
import math
import warnings
from typing import Any

import equinox as eqx
import jax

from .._checks import check_int
from .._view import TrainerView
from ..checkpointing._export import load
from ..checkpointing._tree import LeafSpec, from_storage, to_storage
from ._callback import Callback
from ._monitor import Monitor, better, check_mode, worst

log = logging.getLogger("solstice")


def _optional_float(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`EarlyStopping({name}=...)` must be a number or None, got {value!r}.")
    return float(value)


class EarlyStopping(Callback):
    """Stops `fit` (`trainer.stop`) when `monitor` has not improved for
    `patience` checks, with Lightning's semantics.

    The metric is checked at the end of every epoch in which it was computed (`val/*`
    metrics: epochs that ran validation; others, e.g. `train/loss_epoch`: every epoch); with
    `Trainer(val_check_interval=...)`, a `val/*` metric right after every validation (as in
    Lightning), so a stop can come within an epoch. At each check, in this order:

    1. `check_finite` and the value is NaN or infinite: stop.
    2. `stopping_threshold` reached (below it for `"min"`, above for `"max"`): stop, the
       goal is met.
    3. `divergence_threshold` passed the wrong way (above it for `"min"`): stop.
    4. The value beats the best so far by more than `min_delta`: it becomes the best and the
       wait count is reset.
    5. Otherwise the wait count grows; reaching `patience` stops.

    Its state (wait count, best score, stop epoch) is saved in checkpoints, so a resumed run
    stops exactly where the uninterrupted one would. A monitored metric that the Trainer
    never produces raises `ValueError` listing those it does.

    **Arguments:**

    - `monitor`: the metric, e.g. `"val/loss"`.
    - `mode`: `"min"` or `"max"`: which direction is better.
    - `patience`: checks without improvement before stopping.
    - `min_delta`: the least change that counts as an improvement.
    - `stopping_threshold`: stop as soon as the metric is this good.
    - `divergence_threshold`: stop as soon as the metric is this bad.
    - `check_finite`: stop when the metric is NaN or infinite.
    - `restore_best`: when `fit` ends, put back the experiment of the best check (kept as a
      host copy at each improvement; after a resume, the `best_model_path` of a
      `ModelCheckpoint` with the same `monitor` and `mode` is used if the best check came
      before the resume).

    **Attributes:** `wait_count`, `best_score`, `best_epoch`, `stopped_epoch` (0 if not
    stopped), `stop_reason`.

    **Example:**

    ```python
    trainer = solstice.Trainer(
        max_epochs=100, callbacks=[EarlyStopping("val/loss", patience=5, min_delta=1e-3)]
    )
    ```
    """

    def __init__(
        self,
        monitor: str,
        mode: str = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_finite: bool = True,
        restore_best: bool = False,
    ):
        check_mode(mode, "EarlyStopping")
        check_int("`EarlyStopping(patience=...)`", patience)
        min_delta = _optional_float("min_delta", min_delta) or 0.0
        if min_delta < 0:
            raise ValueError(
                f"`EarlyStopping(min_delta={min_delta})` must be >= 0; it is the least change "
                "that counts as an improvement, in the direction `mode` says is better."
            )
        self._monitor = Monitor(monitor, "EarlyStopping")
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = min_delta
        self.stopping_threshold = _optional_float("stopping_threshold", stopping_threshold)
        self.divergence_threshold = _optional_float("divergence_threshold", divergence_threshold)
        self.check_finite = bool(check_finite)
        self.restore_best = bool(restore_best)
        self.wait_count = 0
        self.best_score = worst(mode)
        self.best_epoch: int | None = None
        self.stopped_epoch = 0
        self.stop_reason: str | None = None
        self._best_arrays: tuple[list[LeafSpec], dict[str, Any]] | None = None
        self._best_step: int | None = None  # the global step of the best check, this fit

    def required_metrics(self) -> tuple[str, ...]:
        return (self.monitor,)

    @property
    def state_key(self) -> str:
        return f"EarlyStopping{{monitor={self.monitor!r}, mode={self.mode!r}}}"

    def state_dict(self) -> dict[str, Any]:
        return {
            "wait_count": self.wait_count,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "stopped_epoch": self.stopped_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wait_count = int(state["wait_count"])
        self.best_score = float(state["best_score"])
        self.best_epoch = state.get("best_epoch")
        self.stopped_epoch = int(state["stopped_epoch"])
        self._best_arrays = None

    # ------------------------------------------------------------------ the rule
    def check(self, current: float, epoch: int) -> tuple[bool, str | None]:
        """Apply one check of value `current` at `epoch`: `(should_stop, reason)`."""
        sign = 1.0 if self.mode == "min" else -1.0
        if self.check_finite and not math.isfinite(current):
            return True, (
                f"Monitored metric `{self.monitor}` = {current} is not finite. Previous best "
                f"value was {self.best_score:.6g}. Stopping."
            )
        if self.stopping_threshold is not None and better(
            current, self.stopping_threshold, self.mode
        ):
            return True, (
                f"Stopping threshold reached: `{self.monitor}` = {current:.6g} is "
                f"{'below' if self.mode == 'min' else 'above'} {self.stopping_threshold}."
            )
        if self.divergence_threshold is not None and better(
            -current, -self.divergence_threshold, self.mode
        ):
            return True, (
                f"Divergence threshold passed: `{self.monitor}` = {current:.6g} is "
                f"{'above' if self.mode == 'min' else 'below'} {self.divergence_threshold}."
            )
        if better(current + sign * self.min_delta, self.best_score, self.mode):
            self.best_score = current
            self.best_epoch = epoch
            self.wait_count = 0
            return False, None
        self.wait_count += 1
        if self.wait_count >= self.patience:
            return True, (
                f"`{self.monitor}` did not improve by more than {self.min_delta} in the last "
                f"{self.wait_count} checks. Best score: {self.best_score:.6g} (epoch "
                f"{self.best_epoch}). Stopping."
            )
        return False, None

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer, experiment) -> None:
        self._monitor.start()
        self._best_step = None

    def on_validation_end(self, trainer, experiment) -> None:
        self._monitor.note_validation(trainer)
        if self._checks_after_validation(trainer):
            self._check(trainer)

    def on_train_epoch_end(self, trainer, experiment) -> None:
        if not self._checks_after_validation(trainer):
            self._check(trainer)

    def _checks_after_validation(self, trainer: TrainerView) -> bool:
        """Whether to check right after each validation of a fit (with `val_check_interval`,
        validations happen within epochs), not at epoch ends."""
        return (
            trainer.fitting
            and trainer.val_check_interval is not None
            and self.monitor.startswith("val/")
        )

    def _check(self, trainer: TrainerView) -> None:
        current = self._monitor.read(trainer)
        if current is None:
            return
        previous_best = self.best_score
        stop, reason = self.check(current, trainer.current_epoch)
        improved = self.best_score != previous_best  # the experiment now is the best
        if improved:
            self._best_step = trainer.global_step
        if self.restore_best and improved:
            stored, leaf_specs = to_storage(eqx.filter(trainer.experiment, eqx.is_array))
            self._best_arrays = (
                [LeafSpec.from_json(d) for d in leaf_specs],
                jax.device_get(stored),
            )
        if stop and reason is not None:
            trainer.stop(reason, by="EarlyStopping")
            self.stopped_epoch = trainer.current_epoch
            self.stop_reason = reason
            log.info("EarlyStopping at epoch %d: %s", trainer.current_epoch, reason)

    def on_train_end(self, trainer, experiment) -> None:
        self._monitor.check_seen(trainer)

    def on_fit_end(self, trainer, experiment) -> None:
        if (
            self.restore_best
            and self.best_epoch is not None
            and self._best_step != trainer.global_step
        ):
            self._restore(trainer)

    def _restore(self, trainer: TrainerView) -> None:
        if self._best_arrays is not None:
            saved, stored = self._best_arrays
            dyn, static = eqx.partition(trainer.experiment, eqx.is_array)
            best = eqx.combine(from_storage(dyn, saved, stored), static)
        else:
            best = self._best_from_checkpoint(trainer)
            if best is None:
                warnings.warn(
                    f"EarlyStopping(restore_best=True): the best experiment (epoch "
                    f"{self.best_epoch}) was before the resume and no `ModelCheckpoint` "
                    f"monitoring `{self.monitor}` ({self.mode}) has it; keeping the last one.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return
        trainer.replace_experiment(best, by="EarlyStopping(restore_best=True)")
        log.info("EarlyStopping: restored the experiment of epoch %s.", self.best_epoch)

    def _best_from_checkpoint(self, trainer: TrainerView) -> Any:
        for cb in trainer.checkpoint_callbacks:
            if cb.monitor == self.monitor and cb.mode == self.mode and cb.best_model_path:
                cb.wait()
                return load(cb.best_model_path, like=trainer.experiment)
        return None
