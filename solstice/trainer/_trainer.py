"""`Trainer`: the settings of a run, and fit / validate / test / predict."""

import datetime
import os
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jaxtyping import PyTree

from .._experiment import Experiment
from ..callbacks import Callback, LoggingCallback
from ..checkpointing._saver import Saver
from ..datamodules import DataModule
from ..loggers import History, Logger
from ._arguments import check_arguments, check_objects
from ._compilation_cache import enable_compilation_cache
from ._evaluation import evaluate, predict
from ._fit import fit
from ._placement import Placement
from ._precision import policy_for
from ._resume import resolve
from ._run import Run
from ._run_requests import RunRequests
from ._sharding_rules import ShardingRule, TreeRule, check_sharding_rules
from ._steps_cache import StepsCache
from ._trace_log import TraceLog


class Trainer(RunRequests):
    """Runs an experiment: compiles its steps, places data and state on devices, calls hooks
    on the experiment and the callbacks, and publishes metrics to the loggers.

    **Arguments:**

    - `max_epochs`, `max_steps`: when `fit` stops (it needs one; the others need neither).
    - `min_epochs`, `min_steps`: a stop asked before them (`EarlyStopping`, `trainer.stop`)
      waits until they are done (said once in the log).
    - `max_time`: a `timedelta`, a dict (`{"hours": 2}`) or `"DD:HH:MM:SS"`: this fit's
      wall-clock budget. Once passed, `fit` stops at the next step boundary, every saver
      writes, and it returns normally; `ckpt_path="last"` continues the run.
    - `check_val_every_n_epoch`: validate after every n-th training epoch (`None`: by
      `val_check_interval` steps only, counted across epochs).
    - `val_check_interval`: also validate within epochs: every N training steps (an int),
      a fraction of the epoch (a float) or a `timedelta` of wall clock; see the loop page.
    - `overfit_batches`: train on the same N batches (or fraction) every epoch, and validate
      on them.
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
      `[solstice.FullySharded()]`; see `solstice.ByPath`, `solstice.TensorParallel`).
    - `mesh`: named axes over those devices: a dict of sizes (`{"data": 2, "model": 2}`;
      one size may be -1, the devices left) or a `jax.sharding.Mesh` (which brings its own
      devices). Batches are split over the `"data"` axis (the default mesh's one axis is
      `"batch"`) and copied over the others, which sharding rules can name.
    - `enable_progress_bar`: add a `ProgressBar` unless one is in `callbacks`.
    - `steps_per_execution`: fuse this many training steps into one compiled call
      (`lax.scan`); `log_every_n_steps` must be a multiple of it.
    - `accumulate_grad_batches`: K loader batches per optimizer step, scanned as microbatches
      of one compiled step; step counts and intervals count optimizer steps.
    - `prefetch`: uploads put on the devices ahead of the step. Small host batches travel in
      chunks of up to 16 per upload when training single steps without per-batch hooks.
    - `compilation_cache`: JAX's persistent compilation cache (`True`:
      `~/.cache/solstice/jax`; a path; `False`: off; one configured in JAX is kept).
    - `detect_anomaly`: for debugging: raise `FloatingPointError` at the first training step
      whose batch or metrics are not finite, naming the step and the leaf. It reads a flag
      back after every call: slow, so off by default.
    - `precision`: `"32-true"`, `"bf16-mixed"` (float32 parameters and optimizer state,
      steps computed in bfloat16), `"16-mixed"` (float16, dynamic loss scaling: call
      `solstice.scale_loss` on the loss) or `"bf16-true"` (all bfloat16); see
      `docs/training-controls/precision.md`.

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

    #: The loop's clock (for `val_check_interval` as a `timedelta` and `max_time`): seconds,
    #: `time.monotonic` by default; set `trainer.clock` to a function to drive time in tests.
    clock: Callable[[], float] = staticmethod(time.monotonic)
    max_epochs: int | None
    max_steps: int | None
    min_epochs: int | None
    min_steps: int | None
    max_time: datetime.timedelta | None
    check_val_every_n_epoch: int | None
    val_check_interval: "int | float | datetime.timedelta | None"
    overfit_batches: int | float

    def __init__(
        self,
        *,
        max_epochs: int | None = None,
        max_steps: int | None = None,
        min_epochs: int | None = None,
        min_steps: int | None = None,
        max_time: "datetime.timedelta | dict | str | None" = None,
        check_val_every_n_epoch: int | None = 1,
        val_check_interval: "int | float | datetime.timedelta | None" = None,
        overfit_batches: int | float = 0,
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
        mesh: "Mapping[str, int] | jax.sharding.Mesh | None" = None,
        enable_progress_bar: bool = True,
        steps_per_execution: int = 1,
        accumulate_grad_batches: int = 1,
        prefetch: int = 2,
        compilation_cache: "bool | str" = True,
        sharding_rules: Sequence[ShardingRule | TreeRule] = (),
        detect_anomaly: bool = False,
        precision: str = "32-true",
    ):
        settings = check_arguments(**{k: v for k, v in locals().items() if k != "self"})
        self.max_epochs, self.max_steps = settings["max_epochs"], settings["max_steps"]
        self.val_check_interval, self.max_time, self.check_val_every_n_epoch = settings["loop"][:3]
        self.min_epochs, self.min_steps, self.overfit_batches = settings["loop"][3:]
        self.num_sanity_val_steps: int = num_sanity_val_steps
        self.limit_train_batches, self.limit_val_batches = settings["limits"][:2]
        self.limit_test_batches, self.limit_predict_batches = settings["limits"][2:]
        self.fast_dev_run = int(fast_dev_run)
        self.log_every_n_steps: int = log_every_n_steps
        self.seed: int = seed
        self.detect_anomaly: bool = detect_anomaly
        self.steps_per_execution: int = steps_per_execution
        self.accumulate_grad_batches: int = accumulate_grad_batches
        self.precision: str = precision
        self.prefetch: int = prefetch
        self.hparams = settings["hparams"]
        callbacks, loggers = check_objects(callbacks, loggers, enable_progress_bar)
        self.loggers: list[Logger] = [] if self.fast_dev_run else loggers
        self.history = History()
        self._logging = LoggingCallback(self.loggers, history=self.history)
        self.callbacks: list[Callback] = [*callbacks, self._logging]
        self.compilation_cache_dir = enable_compilation_cache(compilation_cache)
        self._placement = Placement(devices, mesh)
        self.sharding_rules = check_sharding_rules(sharding_rules)
        self._init_results()

    def _init_results(self) -> None:
        """What outlives a run: its results, and what the next run can reuse."""
        self.callback_metrics: dict[str, float] = {}
        self._logged: dict[tuple[str, ...], Mapping[str, Any]] = {}  # see `logged_metrics`
        self._steps_cache = StepsCache(
            self._placement, self.sharding_rules, policy_for(self.precision)
        )
        self._run: Run | None = None
        self._fitted: Experiment | None = None  # what the last `fit` returned
        self._fitted_in_step: tuple[dict, PyTree] | None = None  # its in-step reductions
        self._fit_input: weakref.ref | None = None  # the experiment the last `fit` was given
        self._recompile_warned: set[tuple[str, tuple[str, ...]]] = set()
        self._slow_paths_warned: set[str] = set()

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
        are named. Another topology (devices, processes, `sharding_rules`) resumes with the
        same batches, results allclose (docs/scaling.md). A Trainer runs one `fit`: a
        second one after training raises."""
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

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Flush and close the loggers (also done when the Trainer is used as a context)."""
        self._logging.close()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
