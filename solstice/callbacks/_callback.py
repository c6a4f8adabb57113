"""The `Callback` base class: hooks the Trainer calls around fit/validate/test/predict."""

from typing import TYPE_CHECKING, Any

from jaxtyping import PyTree

from .._hook_names import check_hook_spelling

if TYPE_CHECKING:
    from .._experiment import Experiment
    from .._in_step import InStep
    from .._metrics import Metrics
    from .._view import TrainerView


class Callback:
    """Base class for callbacks: override the hooks you need, leave the rest.

    The Trainer only calls hooks that a callback overrides, so an unused per-batch hook costs
    nothing. Per-batch hooks receive the step's metrics *on the device*: converting them to
    Python numbers (`float(...)`) there would stall the device every step; use `on_log`, which
    fires at log intervals, to read values.

    A method that starts with `on_` and is a near-miss of a hook name (`on_train_epoch_ends`)
    raises `TypeError` when the class is defined.

    State that must survive a checkpoint goes in `state_dict` / `load_state_dict` (JSON-able
    values only: checkpoints are never pickled).

    **Example:**

    ```python
    class PrintEpoch(solstice.callbacks.Callback):
        def on_train_epoch_end(self, trainer, experiment):
            print("finished epoch", trainer.current_epoch)
    ```
    """

    # Whether the hooks read their `experiment` argument. The built-in logging callback and
    # progress bar do not, and receive `None`, which spares rebuilding the experiment from its
    # arrays on every logged step.
    _reads_experiment: bool = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        check_hook_spelling(cls, "Callback")

    def required_metrics(self) -> tuple[str, ...]:
        """The metrics this callback reads from `trainer.callback_metrics` (e.g. the one it
        monitors). `fit` checks them before the first step: a name no stage of the run
        produces is a `ValueError` listing those it does. Default: none."""
        return ()

    def in_step(self) -> "InStep | None":
        """A reduction the Trainer computes inside the compiled training step for this
        callback (see `solstice.InStep`), read with `trainer.in_step_value(self)`; its state
        is kept in checkpoints. Default: none."""
        return None

    def evaluation_experiment(
        self, trainer: "TrainerView", experiment: "Experiment"
    ) -> "Experiment | None":
        """The experiment that validation, test and predict runs use instead of
        `experiment` (the run's, or the previous callback's answer), e.g. with averaged
        weights swapped in; it may differ in array values only. Asked at the start of every
        such run (also inside `fit`); the run's own experiment is left as it is. Default:
        `None` (use `experiment`)."""
        return None

    def provided_metrics(self) -> tuple[str, ...]:
        """The metrics this callback logs with `trainer.log_metrics` for others to monitor
        (e.g. `("val/fid",)` logged in `on_validation_end`): they are read into
        `trainer.callback_metrics` when logged (a device sync, so only for these), and
        count as produced for `required_metrics`. Default: none."""
        return ()

    # ---- checkpointed state
    def state_dict(self) -> dict[str, Any]:
        """Return JSON-able state to save in checkpoints (default: nothing)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state produced by `state_dict` when resuming."""

    # ---- fit
    def on_fit_start(self, trainer: "TrainerView", experiment: "Experiment") -> None:
        """Called once when `fit` begins, before the first epoch."""

    def on_fit_end(self, trainer: "TrainerView", experiment: "Experiment") -> None:
        """Called once when `fit` ends (normally or after `should_stop`)."""

    # ---- train
    def on_train_start(self, trainer: "TrainerView", experiment: "Experiment") -> None:
        """Called when the training loop starts."""

    def on_train_end(self, trainer: "TrainerView", experiment: "Experiment") -> None:
        """Called when the training loop ends."""

    def on_train_epoch_start(self, trainer: "TrainerView", experiment: "Experiment") -> None:
        """Called at the start of every training epoch."""

    def on_train_epoch_end(self, trainer: "TrainerView", experiment: "Experiment") -> None:
        """Called at the end of every training epoch, after that epoch's validation."""

    def on_train_batch_start(
        self, trainer: "TrainerView", experiment: "Experiment", batch: PyTree, batch_idx: int
    ) -> None:
        """Called before each training step."""

    def on_train_batch_end(
        self,
        trainer: "TrainerView",
        experiment: "Experiment",
        metrics: "Metrics",
        batch: PyTree,
        batch_idx: int,
    ) -> None:
        """Called after each training step with the step's on-device metrics."""

    # ---- validation
    def on_validation_start(self, trainer: "TrainerView", experiment: "Experiment") -> None:
        """Called when a validation run starts."""

    def on_validation_end(self, trainer: "TrainerView", experiment: "Experiment") -> None:
        """Called when a validation run ends."""

    def on_validation_epoch_start(self, trainer: "TrainerView", experiment: "Experiment") -> None:
        """Called before the first validation batch."""

    def on_validation_epoch_end(self, trainer: "TrainerView", experiment: "Experiment") -> None:
        """Called after the last validation batch; `trainer.callback_metrics` has `val/*`."""

    def on_validation_batch_start(
        self, trainer: "TrainerView", experiment: "Experiment", batch: PyTree, batch_idx: int
    ) -> None:
        """Called before each validation batch."""

    def on_validation_batch_end(
        self,
        trainer: "TrainerView",
        experiment: "Experiment",
        metrics: "Metrics",
        batch: PyTree,
        batch_idx: int,
    ) -> None:
        """Called after each validation batch with its on-device metrics."""

    # ---- test
    def on_test_start(self, trainer: "TrainerView", experiment: "Experiment") -> None:
        """Called when a test run starts."""

    def on_test_end(self, trainer: "TrainerView", experiment: "Experiment") -> None:
        """Called when a test run ends."""

    def on_test_epoch_start(self, trainer: "TrainerView", experiment: "Experiment") -> None:
        """Called before the first test batch."""

    def on_test_epoch_end(self, trainer: "TrainerView", experiment: "Experiment") -> None:
        """Called after the last test batch; `trainer.callback_metrics` has `test/*`."""

    def on_test_batch_start(
        self, trainer: "TrainerView", experiment: "Experiment", batch: PyTree, batch_idx: int
    ) -> None:
        """Called before each test batch."""

    def on_test_batch_end(
        self,
        trainer: "TrainerView",
        experiment: "Experiment",
        metrics: "Metrics",
        batch: PyTree,
        batch_idx: int,
    ) -> None:
        """Called after each test batch with its on-device metrics."""

    # ---- predict
    def on_predict_start(self, trainer: "TrainerView", experiment: "Experiment") -> None:
        """Called when a predict run starts."""

    def on_predict_end(self, trainer: "TrainerView", experiment: "Experiment") -> None:
        """Called when a predict run ends."""

    def on_predict_epoch_start(self, trainer: "TrainerView", experiment: "Experiment") -> None:
        """Called before the first predict batch."""

    def on_predict_epoch_end(self, trainer: "TrainerView", experiment: "Experiment") -> None:
        """Called after the last predict batch."""

    def on_predict_batch_start(
        self, trainer: "TrainerView", experiment: "Experiment", batch: PyTree, batch_idx: int
    ) -> None:
        """Called before each predict batch."""

    def on_predict_batch_end(
        self,
        trainer: "TrainerView",
        experiment: "Experiment",
        outputs: PyTree,
        batch: PyTree,
        batch_idx: int,
    ) -> None:
        """Called after each predict batch with its on-device outputs."""

    # ---- events
    def on_log(
        self, trainer: "TrainerView", experiment: "Experiment", metrics: dict[str, Any], step: int
    ) -> None:
        """Called when the Trainer publishes metrics: every `log_every_n_steps` training
        steps (`train/*`), at each training epoch end (`train/*_epoch`) and after each
        validation/test run (`val/*`, `test/*`). Values are 0-d device arrays."""

    def on_exception(
        self, trainer: "TrainerView", experiment: "Experiment", exception: BaseException
    ) -> None:
        """Called when a run raises, before the exception propagates."""
