"""`Trainer`: the settings of a run, and fit / validate / test / predict."""

import os
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from .._experiment import Experiment
from ..callbacks import Callback, LoggingCallback
from ..checkpointing._saver import Saver
from ..datamodules import DataModule
from ..loggers import History, Logger
from ..loggers._convert import check_scalars, to_floats
from ._arguments import check_arguments, check_objects
from ._compilation_cache import enable_compilation_cache
from ._evaluation import evaluate, predict
from ._fit import fit
from ._placement import Placement
from ._resume import resolve
from ._run import Run
from ._run_views import RunViews
from ._sharding_rules import ShardingRule, check_sharding_rules
from ._steps_cache import StepsCache
from ._trace_log import TraceLog


class Trainer(RunViews):
    """Runs an experiment: compiles its steps, places data and state on devices, calls hooks
    on the experiment and the callbacks, and publishes metrics to the loggers.

    **Arguments:**

    - `max_epochs`, `max_steps`: when `fit` stops (it needs one; the others need neither).
    - `check_val_every_n_epoch`: validate after every n-th training epoch.
    - `num_sanity_val_steps`: validation batches `fit` runs before training (2, as in
      Lightning; `-1`: all; `0`: none) so an error in `eval_step` shows in seconds. No hook,
      no log, no change: a run with it is bit-identical to one without.
    - `limit_{train,val,test,predict}_batches`: an int number of batches or a fraction.
    - `fast_dev_run`: `True` (or n) runs n batches of each stage in one epoch, without
      loggers or checkpoints, to smoke-test a setup.
    - `log_every_n_steps`: how often training metrics are published (the only time the
      training loop reads values back from the device).
    - `callbacks`: `solstice.callbacks.Callback`s. Savers (`ModelCheckpoint`) run after the
      others (as in Lightning), so a checkpoint holds every other callback's latest state.
    - `loggers`: `solstice.Logger`s (default none: nothing is written to disk; every metric
      is in `trainer.history`).
    - `seed`: seed of the Trainer's own randomness (on-device batch transforms).
    - `devices`: `"auto"` (all), an int (the first n) or a list of devices; batches are split
      over them, the experiment replicated, or split by `sharding_rules` (e.g.
      `[solstice.FullySharded()]`; see `solstice.ByPath`).
    - `enable_progress_bar`: add a `ProgressBar` unless one is in `callbacks`.
    - `steps_per_execution`: fuse this many training steps into one compiled call
      (`lax.scan`); `log_every_n_steps` must be a multiple of it.
    - `prefetch`: uploads put on the devices ahead of the step. Small host batches travel in
      chunks of up to 16 per upload when training single steps without per-batch hooks.
    - `compilation_cache`: JAX's persistent compilation cache (`True`:
      `~/.cache/solstice/jax`; a path; `False`: off; one configured in JAX is kept).
    - `detect_anomaly`: for debugging: raise `FloatingPointError` at the first training step
      whose batch or metrics are not finite, naming the step and the leaf. It reads a flag
      back after every call: slow, so off by default.

    SIGINT (Ctrl-C) and SIGTERM (preemption) during `fit` stop the run at the next step
    boundary, or before the next batch of a validation run (which a resume then reruns);
    with several processes, at the next point where they all agree (about once a second):
    each saver writes a checkpoint, the loggers are flushed, and the run ends as the signal
    would have (`KeyboardInterrupt`; `SystemExit(143)` for SIGTERM). A second signal acts at
    once.

    **Example:**

    ```python
    trainer = solstice.Trainer(max_epochs=10, loggers=[solstice.CSVLogger("logs")])
    experiment = trainer.fit(experiment, Digits(batch_size=64))
    print(trainer.test())   # the fitted experiment on Digits' test split: {"test/accuracy": ...}
    ```
    """

    def __init__(
        self,
        *,
        max_epochs: int | None = None,
        max_steps: int | None = None,
        check_val_every_n_epoch: int = 1,
        num_sanity_val_steps: int = 2,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        fast_dev_run: bool | int = False,
        log_every_n_steps: int = 50,
        callbacks: Sequence[Callback] | None = None,
        loggers: Sequence[Logger] | None = None,
        seed: int = 0,
        devices: "str | int | Sequence[jax.Device]" = "auto",
        enable_progress_bar: bool = True,
        steps_per_execution: int = 1,
        prefetch: int = 2,
        compilation_cache: "bool | str" = True,
        sharding_rules: Sequence[ShardingRule] = (),
        detect_anomaly: bool = False,
    ):
        settings = check_arguments(**{k: v for k, v in locals().items() if k != "self"})
        self.max_epochs: int | None = settings["max_epochs"]
        self.max_steps: int | None = settings["max_steps"]
        self.check_val_every_n_epoch: int = check_val_every_n_epoch
        self.num_sanity_val_steps: int = num_sanity_val_steps
        self.limit_train_batches, self.limit_val_batches = settings["limits"][:2]
        self.limit_test_batches, self.limit_predict_batches = settings["limits"][2:]
        self.fast_dev_run = int(fast_dev_run)
        self.log_every_n_steps: int = log_every_n_steps
        self.seed: int = seed
        self.detect_anomaly: bool = detect_anomaly
        self.steps_per_execution: int = steps_per_execution
        self.prefetch: int = prefetch
        self.hparams = settings["hparams"]
        callbacks, loggers = check_objects(callbacks, loggers, enable_progress_bar)
        self.loggers: list[Logger] = [] if self.fast_dev_run else loggers
        self.history = History()
        self._logging = LoggingCallback(self.loggers, history=self.history)
        self.callbacks: list[Callback] = [*callbacks, self._logging]
        self.compilation_cache_dir = enable_compilation_cache(compilation_cache)
        self._placement = Placement(devices)
        self.sharding_rules = check_sharding_rules(sharding_rules)
        # What outlives a run: its results, and what the next run can reuse.
        self.callback_metrics: dict[str, float] = {}
        self._logged: dict[tuple[str, ...], Mapping[str, Any]] = {}  # see `logged_metrics`
        self._steps_cache = StepsCache(self._placement, self.sharding_rules)
        self._run: Run | None = None
        self._fitted: Experiment | None = None  # what the last `fit` returned
        self._fit_input: weakref.ref | None = None  # the experiment the last `fit` was given
        self._recompile_warned: set[tuple[str, tuple[str, ...]]] = set()
        self._slow_paths_warned: set[str] = set()

    # ------------------------------------------------------------------ requests from hooks
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

    # ------------------------------------------------------------------ runs
    @property
    def trace_log(self) -> TraceLog:
        """The traces of the compiled steps (`count(name)`), for the retrace warning."""
        return self._steps_cache.trace_log

    def fit(
        self,
        experiment: Experiment,
        datamodule: DataModule,
        ckpt_path: str | os.PathLike | None = None,
        *,
        continue_stopped: bool = False,
    ) -> Experiment:
        """Train `experiment` (left untouched) on `datamodule`; return the trained one.

        `ckpt_path`: resume exactly where a checkpoint was taken: `"last"` (the newest valid
        one of the first `ModelCheckpoint`; none yet starts afresh, so preemptible jobs can
        always pass it), `"best"` or a path; `experiment` is then the template. A run that
        had stopped (`EarlyStopping`, ...) or completed stays so, with a warning, unless the
        limits are raised or `continue_stopped=True`; other settings than the checkpoint's
        are named. A Trainer runs one `fit`: a second one after training raises."""
        return fit(self, experiment, datamodule, ckpt_path, continue_stopped)

    def validate(
        self,
        experiment: Experiment | None = None,
        datamodule: DataModule | None = None,
        *,
        ckpt_path: str | None = None,
    ) -> dict[str, float]:
        """Run the validation split once; return `{"val/<metric>": value}`. `experiment`,
        `datamodule`: default those of the last `fit`; `ckpt_path`: `"best"`, `"last"` or a
        path, loaded into that experiment."""
        return evaluate(self, "validation", experiment, datamodule, ckpt_path)

    def test(
        self,
        experiment: Experiment | None = None,
        datamodule: DataModule | None = None,
        *,
        ckpt_path: str | None = None,
    ) -> dict[str, float]:
        """Run the test split once; return `{"test/<metric>": value}` (see `validate`)."""
        return evaluate(self, "test", experiment, datamodule, ckpt_path)

    def predict(
        self,
        experiment: Experiment | None = None,
        datamodule: DataModule | None = None,
        *,
        ckpt_path: str | None = None,
    ) -> PyTree:
        """Run `predict_step` over the predict split (arguments as in `validate`); return the
        outputs of exactly the real samples, in order, in `predict_step`'s structure."""
        return predict(self, experiment, datamodule, ckpt_path)

    def find_checkpoint(self, ckpt_path: str | os.PathLike, method: str = "use") -> str:
        """The verified checkpoint `ckpt_path` names (`"best"`, `"last"` or a path)."""
        found = resolve([cb for cb in self.callbacks if isinstance(cb, Saver)], ckpt_path)
        if found is None:
            raise FileNotFoundError(
                f"`ckpt_path={ckpt_path!r}`: there is no checkpoint to {method}."
            )
        return str(found[0])

    # ------------------------------------------------------------------ results
    def _update_callback_metrics(self, metrics: dict[str, Any]) -> dict[str, float]:
        host = to_floats(metrics)  # one copy; a non-scalar raises naming the metric
        self.callback_metrics.update(host)
        return host

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Flush and close the loggers (also done when the Trainer is used as a context)."""
        self._logging.close()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
