"""The `Experiment` abstraction: everything that changes during a run, and its steps."""

import abc
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import equinox as eqx
from jaxtyping import PyTree

from ._hook_names import check_hook_spelling
from ._metrics import Metrics

if TYPE_CHECKING:
    from ._view import TrainerView


class Experiment(eqx.Module):
    """Holds the stateful objects of a run (model, optimizer, PRNG key, ...) and its steps.

    An experiment is an immutable `equinox.Module`. `train_step` returns a *new* experiment
    together with the step's `Metrics`. The Trainer compiles the steps itself (do not decorate
    them with `jax.jit`), donates the experiment's buffers, and places everything on devices.

    A batch is whatever pytree of arrays the DataModule yields (a dict, a tuple `(x, y)`, a
    named tuple, a registered dataclass, nested), with a leading batch axis on every leaf.
    `eval_step` needs to know nothing about padding: every evaluation sample counts exactly
    once, because the last, shorter batch of a split runs at its own size (see
    `honours_mask` for the alternative).

    Experiments receive the same hooks as callbacks (`on_train_epoch_start(trainer)`, ...),
    with no-op defaults. A hook may return a replacement experiment (for example with an
    annealed coefficient); returning `None` keeps the current one.

    **Example:**

    ```python
    class Regression(solstice.Experiment):
        model: eqx.nn.Linear
        optimizer: solstice.Optimizer

        def train_step(self, batch):
            def loss_fn(model):
                pred = jax.vmap(model)(batch["x"])
                return jnp.mean((pred - batch["y"]) ** 2)

            loss, grads = eqx.filter_value_and_grad(loss_fn)(self.model)
            updates, optimizer = self.optimizer(grads, eqx.filter(self.model, eqx.is_array))
            model = eqx.apply_updates(self.model, updates)
            new = eqx.tree_at(lambda e: (e.model, e.optimizer), self, (model, optimizer))
            return new, MeanLoss(loss)

        def eval_step(self, batch):
            return MeanLoss((jax.vmap(self.model)(batch["x"]) - batch["y"]) ** 2)
    ```
    """

    #: Whether `eval_step` and `predict_step` ignore the rows where `batch["mask"]` is false.
    #: `False` (the default): the last, shorter evaluation batch runs at its own size, in a
    #: step compiled for it (one more compilation per evaluation stage). `True` (as
    #: `ClassificationExperiment`): every dict evaluation batch gets a boolean `"mask"` and the
    #: short one is padded to full size, so one compiled step serves all batches. Either way
    #: every sample counts exactly once.
    honours_mask: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        check_hook_spelling(cls, "Experiment")

    @abc.abstractmethod
    def train_step(self, batch: PyTree) -> tuple["Experiment", Metrics]:
        """One optimisation step: return `(new_experiment, metrics)`."""

    @abc.abstractmethod
    def eval_step(self, batch: PyTree) -> Metrics:
        """Evaluate one batch (validation and test); return its `Metrics`."""

    def predict_step(self, batch: PyTree) -> PyTree:
        """Return predictions for one batch: a pytree of arrays with a leading batch axis."""
        raise NotImplementedError(
            f"`{type(self).__name__}` does not implement `predict_step(batch)`, which "
            "`Trainer.predict` needs. Define it to return a pytree of arrays with a leading "
            "batch axis."
        )

    def validate_batch(self, batch: PyTree) -> None:
        """Check a host (numpy) batch before it goes to the device; raise `ValueError` if bad.

        Runs on the data-feeding thread, off the training thread. The default accepts
        everything.

        It sees the batch as the loader yields it. A loader whose transform the Trainer runs
        inside the compiled step (`BatchLoader.split_transform`, e.g. the built-in
        DataModules' `uint8` -> `float32` pixel decode) yields it *before* that transform:
        check labels and shapes here, not the decoded pixel dtype. Batches that are already
        on the device (`on_device=True` DataModules) are not checked.
        """

    # ---- hooks: same names as `solstice.callbacks.Callback`; return a new experiment or None.
    def on_fit_start(self, trainer: "TrainerView") -> Optional["Experiment"]:
        """Called once when `fit` begins, before the first epoch."""

    def on_fit_end(self, trainer: "TrainerView") -> Optional["Experiment"]:
        """Called once when `fit` ends."""

    def on_train_start(self, trainer: "TrainerView") -> Optional["Experiment"]:
        """Called when the training loop starts."""

    def on_train_end(self, trainer: "TrainerView") -> Optional["Experiment"]:
        """Called when the training loop ends."""

    def on_train_epoch_start(self, trainer: "TrainerView") -> Optional["Experiment"]:
        """Called at the start of every training epoch."""

    def on_train_epoch_end(self, trainer: "TrainerView") -> Optional["Experiment"]:
        """Called at the end of every training epoch (after validation, if any)."""

    def on_train_batch_start(
        self, trainer: "TrainerView", batch: PyTree, batch_idx: int
    ) -> Optional["Experiment"]:
        """Called before each training step (a per-batch hook: costs a call per batch)."""

    def on_train_batch_end(
        self, trainer: "TrainerView", metrics: Metrics, batch: PyTree, batch_idx: int
    ) -> Optional["Experiment"]:
        """Called after each training step with its (on-device) metrics."""

    def on_validation_start(self, trainer: "TrainerView") -> Optional["Experiment"]:
        """Called when a validation run starts."""

    def on_validation_end(self, trainer: "TrainerView") -> Optional["Experiment"]:
        """Called when a validation run ends."""

    def on_validation_epoch_start(self, trainer: "TrainerView") -> Optional["Experiment"]:
        """Called before the first validation batch."""

    def on_validation_epoch_end(self, trainer: "TrainerView") -> Optional["Experiment"]:
        """Called after the last validation batch, once `val/*` metrics are computed."""

    def on_validation_batch_start(
        self, trainer: "TrainerView", batch: PyTree, batch_idx: int
    ) -> Optional["Experiment"]:
        """Called before each validation batch."""

    def on_validation_batch_end(
        self, trainer: "TrainerView", metrics: Metrics, batch: PyTree, batch_idx: int
    ) -> Optional["Experiment"]:
        """Called after each validation batch with its (on-device) metrics."""

    def on_test_start(self, trainer: "TrainerView") -> Optional["Experiment"]:
        """Called when a test run starts."""

    def on_test_end(self, trainer: "TrainerView") -> Optional["Experiment"]:
        """Called when a test run ends."""

    def on_test_epoch_start(self, trainer: "TrainerView") -> Optional["Experiment"]:
        """Called before the first test batch."""

    def on_test_epoch_end(self, trainer: "TrainerView") -> Optional["Experiment"]:
        """Called after the last test batch, once `test/*` metrics are computed."""

    def on_test_batch_start(
        self, trainer: "TrainerView", batch: PyTree, batch_idx: int
    ) -> Optional["Experiment"]:
        """Called before each test batch."""

    def on_test_batch_end(
        self, trainer: "TrainerView", metrics: Metrics, batch: PyTree, batch_idx: int
    ) -> Optional["Experiment"]:
        """Called after each test batch with its (on-device) metrics."""

    def on_predict_start(self, trainer: "TrainerView") -> Optional["Experiment"]:
        """Called when a predict run starts."""

    def on_predict_end(self, trainer: "TrainerView") -> Optional["Experiment"]:
        """Called when a predict run ends."""

    def on_predict_epoch_start(self, trainer: "TrainerView") -> Optional["Experiment"]:
        """Called before the first predict batch."""

    def on_predict_epoch_end(self, trainer: "TrainerView") -> Optional["Experiment"]:
        """Called after the last predict batch."""

    def on_predict_batch_start(
        self, trainer: "TrainerView", batch: PyTree, batch_idx: int
    ) -> Optional["Experiment"]:
        """Called before each predict batch."""

    def on_predict_batch_end(
        self, trainer: "TrainerView", outputs: PyTree, batch: PyTree, batch_idx: int
    ) -> Optional["Experiment"]:
        """Called after each predict batch with its (on-device) outputs."""

    def on_log(
        self, trainer: "TrainerView", metrics: dict[str, Any], step: int
    ) -> Optional["Experiment"]:
        """Called whenever the Trainer publishes metrics (log intervals, epoch ends)."""

    def on_exception(
        self, trainer: "TrainerView", exception: BaseException
    ) -> Optional["Experiment"]:
        """Called when fit/validate/test/predict raises, before the exception propagates."""
