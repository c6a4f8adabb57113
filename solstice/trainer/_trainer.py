"""`Trainer`: runs fit / validate / test / predict on an Experiment and a DataModule."""

import contextlib
import logging
import os
import signal
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._experiment import Experiment
from ..callbacks._callback import Callback
from ..callbacks._logging import LoggingCallback
from ..callbacks._model_checkpoint import ModelCheckpoint
from ..callbacks._progress_bar import ProgressBar
from ..callbacks._terminate_on_nan import TerminateOnNaN
from ..datamodules._datamodule import DataModule
from ..loggers import History, Logger
from ..loggers._convert import check_scalars, to_floats
from ..loggers._packed import PackedMetrics
from ._agreement import Agreement
from ._arguments import check_arguments, check_objects, check_stopping
from ._compilation_cache import enable_compilation_cache
from ._compile import CompiledSteps, TraceLog, static_differences
from ._flat import FlatTree
from ._hooks import Hooks
from ._loop import (
    EvaluationInterrupted,
    TrainAccumulators,
    num_batches,
    run_evaluation,
    run_predict,
    run_train_epoch,
)
from ._placement import Placement
from ._progress import Progress
from ._sharding_rules import (
    ShardingRule,
    check_sharding_rules,
    describe_shardings,
    experiment_shardings,
)
from ._signals import SignalWatch
from ._user_code import warn_at

PyTree = Any
log = logging.getLogger("solstice")


class Trainer:
    """Owns the loop: compiles the experiment's steps, places data and state on devices,
    calls hooks on the experiment and the callbacks, and publishes metrics to the loggers.

    **Arguments:**

    - `max_epochs`, `max_steps`: when to stop fitting (`fit` needs at least one; `validate`,
      `test` and `predict` need neither).
    - `check_val_every_n_epoch`: validate after every n-th training epoch.
    - `num_sanity_val_steps`: before training, `fit` runs this many validation batches
      (default 2, as in Lightning; `-1`: all; `0`: none) so that an error in `eval_step`
      shows in seconds, not after the first epoch. It calls no hook, logs nothing and
      changes nothing: a run with it is bit-identical to one without.
    - `limit_train_batches`, `limit_val_batches`, `limit_test_batches`,
      `limit_predict_batches`: an int number of batches or a float fraction per epoch.
    - `fast_dev_run`: `True` (or an int n) runs n batches of train/val/test in one epoch
      without loggers or checkpoints, to smoke-test a setup.
    - `log_every_n_steps`: how often training metrics are published (the only time the
      training loop reads values back from the device).
    - `callbacks`: `solstice.callbacks.Callback` objects. `ModelCheckpoint`s run after the
      others (as in Lightning), so a checkpoint holds every other callback's latest state.
    - `loggers`: `solstice.Logger` objects. Default: none; metrics are always recorded in
      memory in `trainer.history`, and nothing is written to disk unless a logger is given.
    - `seed`: seed of the Trainer's own randomness (on-device batch transforms).
    - `devices`: `"auto"` (all devices), an int (the first n) or a list of devices; batches
      are split over them along the batch axis, the experiment is replicated.
    - `sharding_rules`: split large arrays of the experiment over the devices instead of
      replicating them (FSDP / ZeRO-3 style), e.g. `[solstice.FullySharded()]`. Each rule
      is a callable `rule(path, shape, dtype, mesh) -> PartitionSpec | None` (see
      `solstice.ByPath`); the first that answers wins, unclaimed arrays are replicated.
    - `enable_progress_bar`: add a `ProgressBar` unless one is in `callbacks`.
    - `steps_per_execution`: fuse this many training steps into one compiled call
      (`lax.scan`); `log_every_n_steps` must be a multiple of it.
    - `prefetch`: how many uploads are put on the devices ahead of the step. Small host
      batches (under 4 MiB) travel in chunks of up to 16 batches per upload when training
      single steps without per-batch hooks: one transfer costs ~40 us of host time however
      small, and each step takes its batch from the chunk on the device.
    - `compilation_cache`: keep compiled steps in JAX's persistent cache (`True`: the
      per-user `~/.cache/solstice/jax`; a path; `False` to opt out). A cache directory the
      user configured in JAX already is left as it is.
    - `detect_anomaly`: for debugging (Lightning's name): after every training step, check
      that its batch and its metrics (the loss) are finite, and raise `FloatingPointError`
      at the first step where they are not, naming the step and the batch leaf (or the
      metrics). It reads a flag back from the device after every (fused) call and feeds
      batches one upload each: slow, so off by default. Training only.

    SIGINT (Ctrl-C) and SIGTERM (preemption) during `fit` stop the run at the next step
    boundary, or before the next batch of a validation run (which a resume then reruns);
    with several processes, at the next point where they agree (about once a second, and
    between epochs), all of them together: each `ModelCheckpoint` saves a checkpoint, the
    loggers are flushed, and the run
    ends as the signal would have (`KeyboardInterrupt`; `SystemExit(143)` for SIGTERM). A
    second signal acts at once. Only in the main thread.

    **Example:**

    ```python
    trainer = solstice.Trainer(max_epochs=10, loggers=[solstice.CSVLogger("logs")])
    experiment = trainer.fit(experiment, Digits(batch_size=64))
    print(trainer.test(experiment, Digits(batch_size=256)))   # {"test/accuracy": ...}
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
        max_epochs, max_steps, limits = check_arguments(
            max_epochs=max_epochs,
            max_steps=max_steps,
            fast_dev_run=fast_dev_run,
            check_val_every_n_epoch=check_val_every_n_epoch,
            num_sanity_val_steps=num_sanity_val_steps,
            log_every_n_steps=log_every_n_steps,
            steps_per_execution=steps_per_execution,
            prefetch=prefetch,
            limits=(
                limit_train_batches,
                limit_val_batches,
                limit_test_batches,
                limit_predict_batches,
            ),
        )
        limit_train_batches, limit_val_batches, limit_test_batches, limit_predict_batches = limits
        callbacks, loggers = check_objects(callbacks, loggers)

        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.check_val_every_n_epoch = check_val_every_n_epoch
        self.num_sanity_val_steps = num_sanity_val_steps
        self.limit_train_batches = limit_train_batches
        self.limit_val_batches = limit_val_batches
        self.limit_test_batches = limit_test_batches
        self.limit_predict_batches = limit_predict_batches
        self.fast_dev_run = int(fast_dev_run)
        self.log_every_n_steps = log_every_n_steps
        self.seed = seed
        if not isinstance(detect_anomaly, bool):
            raise TypeError(f"`detect_anomaly` must be True or False, got {detect_anomaly!r}.")
        self.detect_anomaly = detect_anomaly
        self.steps_per_execution = steps_per_execution
        self.prefetch = prefetch
        self.loggers = [] if self.fast_dev_run else loggers
        self.history = History()
        self._logging = LoggingCallback(self.loggers, history=self.history)
        if (
            enable_progress_bar
            and jax.process_index() == 0  # one bar per run, not one per process
            and not any(isinstance(cb, ProgressBar) for cb in callbacks)
        ):
            callbacks.append(ProgressBar())
        checkpoints = [cb for cb in callbacks if isinstance(cb, ModelCheckpoint)]
        others = [cb for cb in callbacks if not isinstance(cb, ModelCheckpoint)]
        self.callbacks: list[Callback] = [*others, *checkpoints, self._logging]
        self.hparams = {
            "max_epochs": max_epochs,
            "max_steps": max_steps,
            "log_every_n_steps": log_every_n_steps,
            "steps_per_execution": steps_per_execution,
            "seed": seed,
        }

        self.compilation_cache_dir = enable_compilation_cache(compilation_cache)
        self._placement = Placement(devices)
        self.sharding_rules = check_sharding_rules(sharding_rules)
        self._true = jax.device_put(np.bool_(True), self._placement.replicated)
        self._false = jax.device_put(np.bool_(False), self._placement.replicated)
        self.trace_log = TraceLog()
        self.progress = Progress()
        self.should_stop = False
        self.stopped: dict[str, Any] | None = None  # why and where `fit` stopped (see `stop`)
        self.callback_metrics: dict[str, float] = {}
        self._logged: dict[tuple[str, ...], Mapping[str, Any]] = {}  # see logged_metrics
        self.num_training_batches: int | None = None
        self.train_batch_size: int | None = None  # global, known after the first batch
        self.datamodule: DataModule | None = None
        self._steps: CompiledSteps | None = None
        self._dyn_state = FlatTree()  # the experiment's arrays; `_dyn` is the tree view
        self._experiment_cache: tuple[PyTree, Experiment] | None = None
        self._hooks: Hooks | None = None
        self._train_state = TrainAccumulators(self._true, self._false)
        self._step_counter: jax.Array | None = None  # global step on device (see _compile)
        self._guard: jax.Array | None = None  # on-device first non-finite step (TerminateOnNaN)
        self.nonfinite_step: int | None = None
        self._signals: SignalWatch | None = None
        self._agreement: Agreement | None = None  # set while `fit` runs
        self._epoch_complete = False  # inside `on_train_epoch_end`: the epoch is done
        self._step_savers: list[ModelCheckpoint] = []
        self._fitted: Experiment | None = None  # what the last `fit` returned
        self._fit_input: weakref.ref | None = None  # the experiment the last `fit` was given
        self._recompile_warned: set[tuple[str, tuple[str, ...]]] = set()
        self._val_metric_names: set[str] | None = None  # known after the sanity check
        self._required_checked = False
        self._resumed_from: tuple[Any, dict[str, Any]] | None = None  # (path, its settings)

    # ------------------------------------------------------------------ properties
    @property
    def _dyn(self) -> PyTree:
        """The experiment's arrays as a tree (kept flat between steps, see `FlatTree`)."""
        return self._dyn_state.tree

    @_dyn.setter
    def _dyn(self, tree: PyTree) -> None:
        self._dyn_state.tree = tree

    @property
    def experiment(self) -> Experiment:
        """The current experiment (its arrays live on the Trainer's devices)."""
        if self._steps is None:
            raise RuntimeError("The Trainer has no experiment yet; call `fit` (or test, ...).")
        cache = self._experiment_cache
        leaves = self._dyn_state.leaves
        if cache is None or cache[0] is not leaves:
            built = self._steps.experiment_from_leaves(leaves)
            cache = self._experiment_cache = (leaves, built)
        return cache[1]

    def describe_shardings(self) -> str:
        """A table of the experiment's arrays: path, shape, `PartitionSpec` and the bytes each
        device holds (see `sharding_rules`)."""
        if self._steps is None:
            raise RuntimeError("The Trainer has no experiment yet; call `fit` (or test, ...).")
        dyn = self._dyn
        shardings = jax.tree.map(lambda x: x.sharding, dyn)
        return describe_shardings(dyn, shardings)

    @property
    def current_epoch(self) -> int:
        return self.progress.epoch

    @property
    def global_step(self) -> int:
        return self.progress.global_step

    @property
    def devices(self) -> list[jax.Device]:
        return self._placement.devices

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self._placement.mesh

    @property
    def checkpoint_callbacks(self) -> list[ModelCheckpoint]:
        """The `ModelCheckpoint` callbacks (`ckpt_path="last"`/`"best"` use the first)."""
        return [cb for cb in self.callbacks if isinstance(cb, ModelCheckpoint)]

    # ------------------------------------------------------------------ set-up
    def _attach(self, experiment: Experiment) -> None:
        if not isinstance(experiment, Experiment):
            raise TypeError(
                f"Expected a `solstice.Experiment`, got `{type(experiment).__name__}`. "
                "Subclass `solstice.Experiment` (or use `solstice.ClassificationExperiment`)."
            )
        self._hooks = Hooks(self.callbacks, experiment)
        keep = any(self._hooks.active(f"on_{s}_batch_end") for s in ("train", "validation", "test"))
        track = self.detect_anomaly or any(isinstance(cb, TerminateOnNaN) for cb in self.callbacks)
        self._step_savers = [cb for cb in self.checkpoint_callbacks if cb.saves_on_steps]
        dyn, static = eqx.partition(experiment, eqx.is_array)
        if (
            self._steps is None
            or self._steps.keep_step_metrics != keep
            or self._steps.track_nonfinite != track
            or not eqx.tree_equal(static, self._steps.static)
        ):
            # A different experiment structure: new functions, whose first traces are not
            # recompilations (a fresh trace log, so no false warning).
            self.trace_log = TraceLog()
            self._steps = CompiledSteps(
                experiment,
                self._placement.replicated,
                self.trace_log,
                keep_step_metrics=keep,
                track_nonfinite=track,
                dyn_shardings=self._dyn_shardings(dyn),
                detect_anomaly=self.detect_anomaly,
            )
        self._dyn = self._place_experiment(dyn)
        self._experiment_cache = None

    def _dyn_shardings(self, dyn: PyTree) -> PyTree:
        """Where the experiment's arrays live: replicated, or split by `sharding_rules`."""
        if not self.sharding_rules:
            return None
        return experiment_shardings(dyn, self._placement.mesh, self.sharding_rules)

    def _place_experiment(self, dyn: PyTree, copy: bool = True) -> PyTree:
        shardings = self._steps.dyn_shardings
        if shardings is None:
            return self._placement.replicate(dyn, copy=copy)
        return self._placement.shard(dyn, shardings, copy=copy)

    def _replace_experiment(self, new: Any, where: str, source: Any = None) -> None:
        """Make `new` (returned by `where`, e.g. a hook of the experiment whose function is
        `source`) the current experiment. A new non-array part compiles the steps again,
        reported once per hook and changed fields by a warning pointing at `source`."""
        if not isinstance(new, Experiment):
            raise TypeError(
                f"`{where}` returned a `{type(new).__name__}`; a hook on the experiment must "
                "return a `solstice.Experiment` (a replacement) or `None`."
            )
        dyn, static = eqx.partition(new, eqx.is_array)
        if not eqx.tree_equal(static, self._steps.static):
            changes = static_differences(self._steps.static, static, type(new).__name__)
            key = (where, tuple(change.split(":")[0] for change in changes))
            if key not in self._recompile_warned:
                self._recompile_warned.add(key)
                warn_at(
                    source,
                    f"`{where}` returned an experiment whose non-array part changed ("
                    f"{'; '.join(changes[:5]) or 'its structure'}), so the steps are compiled "
                    "again for it (each time it changes). Keep numbers that change during a "
                    "run as `jnp` arrays (e.g. `jnp.asarray(0.5)`), not Python values or "
                    "`eqx.field(static=True)`.",
                    RuntimeWarning,
                )
            else:
                log.info("%s changed the experiment's non-array part: compiling again.", where)
            self._steps = CompiledSteps(
                new,
                self._placement.replicated,
                self.trace_log,
                keep_step_metrics=self._steps.keep_step_metrics,
                track_nonfinite=self._steps.track_nonfinite,
                dyn_shardings=self._dyn_shardings(dyn),
                detect_anomaly=self.detect_anomaly,
            )
            self.trace_log.new_generation()  # its first traces are not retraces
        self._hooks.refresh(new)
        self._dyn = self._place_experiment(dyn, copy=False)
        self._experiment_cache = None

    def _prepare_data(self, datamodule: DataModule, stage: str) -> None:
        if not isinstance(datamodule, DataModule):
            raise TypeError(
                f"Expected a `solstice.datamodules.DataModule`, got "
                f"`{type(datamodule).__name__}`. Wrap arrays in `ArrayDataModule(...)`."
            )
        self.datamodule = datamodule
        datamodule.prepare_data()
        datamodule.setup(stage)

    @contextlib.contextmanager
    def _run(self, stage: str) -> Iterator[None]:
        self.progress.stage = stage
        try:
            yield
        except BaseException as exc:
            for cb_exc in self._call_exception_hooks(exc):
                warnings.warn(
                    f"An `on_exception` hook raised {cb_exc!r}.", RuntimeWarning, stacklevel=3
                )
            raise
        finally:
            self.progress.stage = None
            self._logging.flush()

    def _call_exception_hooks(self, exc: BaseException) -> list[BaseException]:
        errors = []
        if self._hooks is None or not self._hooks.active("on_exception"):
            return errors
        try:
            self._hooks.call(self, "on_exception", exc)
        except Exception as hook_exc:  # noqa: BLE001 - reported, the original propagates
            errors.append(hook_exc)
        return errors

    # ------------------------------------------------------------------ publishing
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Publish extra scalars (numbers or 0-d device arrays) like the Trainer's own.

        They reach every callback's `on_log`, the loggers and `trainer.history`, with the
        current `"epoch"` added. Device values are converted on the logging thread, so this
        never syncs, except the metrics a callback declares in `provided_metrics()`: those
        are read at once into `trainer.callback_metrics`, where `EarlyStopping` and
        `ModelCheckpoint` can monitor them. `step` defaults to `trainer.global_step`.

        **Example:**

        ```python
        class LogWeightNorm(Callback):
            def on_train_epoch_end(self, trainer, experiment):
                norm = optax.tree.norm(eqx.filter(experiment.model, eqx.is_array))
                trainer.log_metrics({"weights/norm": norm})
        ```
        """
        check_scalars(metrics)
        if self._hooks is None:
            raise RuntimeError("`log_metrics` can only be called during fit/validate/test/predict.")
        # Device values are read later, on the logging thread; an array of the experiment
        # (an `inject_hyperparams` learning rate, say) is donated to the next step by then.
        # A copy of each is dispatched, never waited for.
        metrics = {k: jnp.copy(v) if isinstance(v, jax.Array) else v for k, v in metrics.items()}
        self._publish(metrics, self.global_step if step is None else int(step))
        provided = {k: v for k, v in metrics.items() if k in self._provided_metrics()}
        if provided:
            self._update_callback_metrics(provided)

    def stop(self, reason: str, *, by: str) -> None:
        """Ask `fit` to stop: after the current step, and after the current epoch's
        end-of-epoch work (its metrics, validation, `on_train_epoch_end` and checkpoints).

        Why and where (`by`, `reason`, the epoch and global step) is kept in
        `trainer.stopped` and in the checkpoints taken from now on, so that a run resumed
        from them stays stopped: `fit(..., ckpt_path=...)` then returns the experiment
        without training, unless `max_epochs`/`max_steps` are raised or
        `continue_stopped=True` is passed. `EarlyStopping` and `TerminateOnNaN` stop this way;
        setting `trainer.should_stop = True` directly is recorded as `by="should_stop"`.

        **Arguments:**

        - `reason`: a sentence saying why (logged, and shown when a resume stays stopped).
        - `by`: who asks, e.g. `"EarlyStopping"`.
        """
        self.should_stop = True
        if self.stopped is None:
            self.stopped = {
                "by": by,
                "reason": reason,
                "epoch": self.progress.epoch,
                "global_step": self.progress.global_step,
                "final": True,
            }

    def stop_record(self) -> dict[str, Any] | None:
        """What a checkpoint taken now records of a stop (see `stop`), or `None`."""
        if self.stopped is not None:
            return dict(self.stopped)
        if self.should_stop:
            return {
                "by": "should_stop",
                "reason": "`trainer.should_stop` was set to True.",
                "epoch": self.progress.epoch,
                "global_step": self.progress.global_step,
                "final": True,
            }
        return None

    def _provided_metrics(self) -> set[str]:
        return {name for cb in self.callbacks for name in cb.provided_metrics()}

    def _publish(self, metrics: Mapping[str, Any], step: int) -> None:
        if isinstance(metrics, PackedMetrics):  # never touch its values here (a dispatch each)
            metrics = metrics.with_items(epoch=self.progress.epoch)
            self._logged[metrics.names] = metrics
        else:
            metrics = {**metrics, "epoch": self.progress.epoch}
            self._logged[tuple(metrics)] = metrics
        self._hooks.call(self, "on_log", metrics, step)

    @property
    def logged_metrics(self) -> dict[str, Any]:
        """The latest value of every metric logged so far (device arrays or numbers)."""
        out: dict[str, Any] = {}
        for metrics in self._logged.values():
            out.update(metrics)
        return out

    def _close_train_interval(self) -> None:
        """Close a partial log interval (epoch end) with its own compiled call."""
        state = self._train_state
        packed, state.total = self._steps.close_interval(
            "train", state.acc, state.total, state.epoch_flag()
        )
        self._publish_train_interval(packed)

    def _publish_train_interval(self, packed: Any) -> None:
        """A log interval was closed on the device (`packed`, see `CompiledSteps.unpack`):
        start a new one and publish it."""
        state = self._train_state
        state.fresh_interval = True
        state.steps_in_interval = 0
        self._read_nonfinite()
        self._publish(self._steps.unpack("train", packed, "train/"), self.progress.global_step)

    def _read_nonfinite(self) -> None:
        """Read the on-device non-finite guard (log intervals and epoch ends only)."""
        if self._guard is not None and self.nonfinite_step is None:
            first_bad = int(self._guard)
            if first_bad >= 0:
                self.nonfinite_step = first_bad

    def _check_anomaly(self, batch: PyTree, n: int, first_step: int) -> None:
        """`detect_anomaly`: after a call of `n` steps that began after global step
        `first_step`, raise at the first step whose batch or metrics were not finite."""
        bad = int(self._guard)  # the one read per step that this debugging option costs
        if bad < 0:
            return
        one = batch if n == 1 else jax.tree.map(lambda x: x[bad - first_step - 1], batch)
        host = jax.device_get(one)
        leaves = [
            f"`batch{jax.tree_util.keystr(path)}`"
            for path, x in jax.tree_util.tree_leaves_with_path(host)
            if np.issubdtype(np.asarray(x).dtype, np.inexact) and not np.isfinite(x).all()
        ]
        where = f"training step {bad} (epoch {self.progress.epoch}, counting steps from 1)"
        if leaves:
            raise FloatingPointError(
                f"detect_anomaly: the input of {where} is not finite: {', '.join(leaves)} "
                "holds NaN or inf. Clean the data (or the DataModule's transform) that "
                "produces it."
            )
        raise FloatingPointError(
            f"detect_anomaly: the metrics (the loss) of {where} are not finite, with finite "
            "inputs: the step itself produced NaN or inf (a learning rate too high, a log or "
            "division of 0, an overflow in low precision...)."
        )

    def _start_guard(self) -> None:
        if not self._steps.track_nonfinite:
            self._guard = None
            return
        first_bad = -1 if self.nonfinite_step is None else self.nonfinite_step
        self._guard = jax.device_put(np.int32(first_bad), self._placement.replicated)

    # ------------------------------------------------------------------ step boundaries
    def _step_boundary(self) -> None:
        """After every (fused) training call: step-triggered checkpoints, then signals.

        Signals and timed checkpoints are acted on at agreement points (every boundary with
        one process; with several, steps every process picks alike, see `Agreement`)."""
        savers, step = self._step_savers, self.progress.global_step
        signum, due = 0, [False] * len(savers)
        if self._agreement.due(step):
            mine = [cb.time_due() for cb in savers]
            signum, due = self._agreement.agree(step, self._received_signal(), mine)
        for cb, time_due in zip(savers, due):
            cb.plan_step_save(self, time_due=time_due)
        if signum:
            self._stop_for_signal(signum)  # writes them with the interrupt saves of this boundary
        else:
            self._write_checkpoints(savers)

    def _received_signal(self) -> int:
        """The signal this process received and has not acted on yet (0: none)."""
        signals = self._signals
        return 0 if signals is None or signals.received is None else int(signals.received)

    def _agreed_signal(self) -> int:
        """Between epochs: the signal to act on, agreed by every process (a collective with
        several; every process reaches these points alike)."""
        return self._agreement.agree(self.progress.global_step, self._received_signal(), ())[0]

    def _write_checkpoints(self, checkpoints: list[ModelCheckpoint]) -> None:
        """Write the saves the `ModelCheckpoint`s planned at this moment. Only once all have
        planned (and updated their books), so that each checkpoint holds every callback's
        books as they are after all of this moment's saves."""
        for cb in checkpoints:
            cb.write_planned(self)

    def _stop_for_signal(self, signum: int) -> None:
        """Save, flush and end as signal `signum` would have (received by this process, or,
        with several processes, by another: all stop together)."""
        name = signal.Signals(signum).name
        log.warning(
            "%s received: stopping at global step %d (epoch %d, batch %d).",
            name,
            self.progress.global_step,
            self.progress.epoch,
            self.progress.batch_idx,
        )
        self.stopped = {
            "by": name,
            "reason": f"{name} received: the run was interrupted (a resume continues it).",
            "epoch": self.progress.epoch,
            "global_step": self.progress.global_step,
            "final": False,
        }
        checkpoints = self.checkpoint_callbacks
        for cb in checkpoints:
            cb.plan_interrupt_save(self)
        self._write_checkpoints(checkpoints)
        for cb in checkpoints:
            cb.wait()
        self._logging.flush()
        self._signals.finish(signum)  # raises, unless a previous Python handler chose otherwise
        self.should_stop = True

    def _update_callback_metrics(self, metrics: dict[str, Any]) -> dict[str, float]:
        host = to_floats(metrics)  # one copy; a non-scalar raises naming the metric
        self.callback_metrics.update(host)
        return host

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        experiment: Experiment,
        datamodule: DataModule,
        ckpt_path: str | None = None,
        *,
        continue_stopped: bool = False,
    ) -> Experiment:
        """Train `experiment` on `datamodule`; return the trained experiment.

        **Arguments:**

        - `experiment`: the initial experiment (left untouched: the Trainer works on a copy).
        - `datamodule`: provides `train_dataloader()` and optionally `val_dataloader()`.
        - `ckpt_path`: resume exactly where a checkpoint was taken: `"last"` (the newest
          valid checkpoint in the first `ModelCheckpoint`'s `dirpath`; none yet starts
          from scratch, so preemptible jobs can always pass it), `"best"` (the best one
          by that callback's `monitor`) or the path of a checkpoint. Parameters, optimizer
          and PRNG state, the position in the epoch, metric accumulators, data order,
          callback states and history continue as if the run had never stopped. A
          corrupted newest checkpoint is reported and skipped for the previous one.
          `experiment` is the template: its non-array parts are used as they are. A run
          that was stopped (`EarlyStopping`, `TerminateOnNaN`, `trainer.stop`) or had
          completed stays so: `fit` returns the checkpoint's experiment without training,
          with a warning saying why, unless `max_epochs`/`max_steps` are larger than that
          run's or `continue_stopped=True`. A checkpoint written with other settings
          (batch size, seed, `steps_per_execution`, devices, datamodule) warns naming each
          difference, or raises where exact resume is impossible (another batch size
          mid-epoch).
        - `continue_stopped`: train on from a checkpoint of a stopped run (see above).

        **Returns:** the trained experiment. `validate`, `test` and `predict` called without
        an experiment use it.

        A Trainer runs one `fit`: its callbacks, history and progress belong to that run, so
        a second `fit` after one that trained raises `RuntimeError` instead of training
        nothing (create a new Trainer, or resume with `ckpt_path=` in a new one).
        """
        check_stopping(self.max_epochs, self.max_steps)
        if self.progress.global_step > 0:
            raise RuntimeError(
                f"This Trainer has already run `fit` (to global step "
                f"{self.progress.global_step}, epoch {self.progress.epoch}): a Trainer runs one "
                "fit, and its callbacks, history and progress belong to that run. For a new "
                "run, create a new `Trainer`; to train on, create one with a larger "
                "`max_epochs`/`max_steps` and pass `ckpt_path='last'` (with a "
                "`ModelCheckpoint`), or fit the returned experiment in a new Trainer."
            )
        self._attach(experiment)
        self._fit_input = weakref.ref(experiment)
        self._prepare_data(datamodule, "fit")
        self.should_stop = False
        self.stopped = None
        self._resumed_from = None
        self._epoch_complete = False
        self.nonfinite_step = None
        if ckpt_path is not None:
            self._resume(ckpt_path, continue_stopped=continue_stopped)
        if self.checkpoint_callbacks and not self.fast_dev_run:
            # The history file lives beside the checkpoints that count its records; process 0
            # writes it, the others only name it in their checkpoint state.
            path = os.path.join(self.checkpoint_callbacks[0].dirpath, "history.jsonl")
            self.history.persist_to(path, write=jax.process_index() == 0)
        self._start_guard()
        self._step_counter = jax.device_put(
            np.int32(self.progress.global_step), self._placement.replicated
        )
        self._steps.set_batch_transform(getattr(datamodule, "device_transform", None))
        try:
            with self._run("train"), SignalWatch() as self._signals:
                self._agreement = Agreement(self._placement, self.progress.global_step)
                if not self._fit_done():
                    self._preflight(datamodule)
                hooks = self._hooks
                hooks.call(self, "on_fit_start")
                hooks.call(self, "on_train_start")
                while not self._fit_done():
                    signum = self._agreed_signal()
                    if signum:
                        self._stop_for_signal(signum)
                        continue
                    self._train_epoch(datamodule)
                signum = self._agreed_signal()
                if signum:
                    self._stop_for_signal(signum)
                hooks.call(self, "on_train_end")
                hooks.call(self, "on_fit_end")
        finally:
            self._signals = None
            self._agreement = None
        self._fitted = self.experiment
        return self._fitted

    def _validation_loader(self, datamodule: DataModule) -> Any:
        """The validation loader `fit` will use, or `None` if this run never validates."""
        if self.limit_val_batches == 0:
            return None
        if self.max_epochs is not None and self.max_epochs < self.check_val_every_n_epoch:
            return None
        return datamodule.val_dataloader()

    def _preflight(self, datamodule: DataModule) -> None:
        """Before the first step: run `num_sanity_val_steps` validation batches (errors in
        `eval_step` show in seconds; nothing is changed, logged or hooked). A monitored
        `val/*` metric in a run that never validates fails here; the other names are
        checked when the first training batch shows the training metrics
        (`check_required_metrics`)."""
        self.progress.stage = "sanity_check"
        try:
            self._val_metric_names = self._sanity_check(datamodule)
        finally:
            self.progress.stage = "train"
        self._required_checked = False
        self._check_required_metrics(None)  # the `val/*` names, known now

    def _at_first_batch(self, train_batch: PyTree) -> None:
        """Once per `fit`, at its first training batch (before the step runs): every metric
        a callback requires must be one this run produces, and a resumed run's batch size
        must be its checkpoint's (see `check_settings`)."""
        if self._required_checked:
            return
        self._required_checked = True
        self._check_required_metrics(self._steps.metric_names("train", self._dyn, train_batch))
        if self._resumed_from is not None:
            from ._resume import check_settings

            path, saved = self._resumed_from
            size = {"train_batch_size": saved.get("train_batch_size")}
            now = {"train_batch_size": self.train_batch_size}
            check_settings(size, now, path, mid_epoch=self.progress.batch_idx > 0)

    def _check_required_metrics(self, train_names: set[str] | None) -> None:
        """Raise `ValueError` naming a required metric no stage produces. `None`: the
        training metrics are not known yet (only `val/*` names are checked); validation
        names that `_sanity_check` could not know (`None`) are accepted."""
        val_names = self._val_metric_names
        produced = self._provided_metrics()
        if train_names is not None:
            produced |= {f"train/{name}_epoch" for name in train_names}
        if val_names is not None:
            produced |= {f"val/{name}" for name in val_names}
        for cb in self.callbacks:
            missing = [
                key
                for key in cb.required_metrics()
                if key not in produced
                and (train_names is not None or key.startswith("val/"))
                and (val_names is not None or not key.startswith("val/"))
            ]
            if not missing:
                continue
            never = not val_names and any(k.startswith("val/") for k in missing)
            why = (
                " This run never validates (no validation split, `limit_val_batches=0` or "
                "`check_val_every_n_epoch` above `max_epochs`), so it has no `val/*` metrics."
                if never
                else ""
            )
            listing = ", ".join(f"`{k}`" for k in sorted(produced)) or "none"
            if train_names is None:
                listing += " (and the training metrics, as `train/<name>_epoch`)"
            raise ValueError(
                f"`{type(cb).__name__}` monitors `{missing[0]}`, which no stage of this run "
                f"produces.{why} Metrics it can monitor: {listing}. Pass one of them as "
                "`monitor=`."
            )

    def _sanity_check(self, datamodule: DataModule) -> set[str] | None:
        """Run the sanity validation; return the names of the validation metrics (without
        the `val/` prefix), an empty set if this run never validates, or `None` if unknown
        (`num_sanity_val_steps=0`)."""
        loader = self._validation_loader(datamodule)
        if loader is None:
            return set()
        limit = num_batches(loader, self.limit_val_batches, "limit_val_batches")
        steps = self.num_sanity_val_steps
        if steps == 0:
            return None
        count = limit if steps == -1 else (steps if limit is None else min(steps, limit))
        return set(run_evaluation(self, "validation", loader, count, sanity_check=True))

    def _fit_done(self) -> bool:
        p = self.progress
        return (
            self.should_stop
            or (self.max_epochs is not None and p.epoch >= self.max_epochs)
            or (self.max_steps is not None and p.global_step >= self.max_steps)
        )

    def _train_epoch(self, datamodule: DataModule) -> None:
        progress = self.progress
        datamodule.set_epoch(progress.epoch)
        loader = datamodule.train_dataloader()
        count = num_batches(loader, self.limit_train_batches, "limit_train_batches")
        if count == 0:
            raise ValueError(
                f"The training dataloader of `{type(datamodule).__name__}` yields no batches "
                f"(epoch {progress.epoch}). Check the training split is not empty and is at "
                "least one batch long."
            )
        self.num_training_batches = count
        if progress.batch_idx == 0:
            self._train_state.new_epoch()
        self._hooks.call(self, "on_train_epoch_start")
        steps_before = progress.global_step
        run_train_epoch(self, loader, count)
        if progress.global_step == steps_before and progress.batch_idx == 0:
            raise ValueError(
                f"The training dataloader of `{type(datamodule).__name__}` yielded no batches "
                f"in epoch {progress.epoch}; an empty training split cannot be fitted."
            )
        if not progress.epoch_logged:  # (a run resumed in this epoch's validation has)
            epoch_metrics = self._steps.compute("train", self._train_state.total)
            self._read_nonfinite()
            epoch_metrics = {f"train/{k}_epoch": v for k, v in epoch_metrics.items()}
            self._publish(epoch_metrics, progress.global_step)
            self._update_callback_metrics(epoch_metrics)
            progress.epoch_logged = True
        if (progress.epoch + 1) % self.check_val_every_n_epoch == 0:
            if not self._validate_during_fit(datamodule):
                # A signal stopped validation: the epoch stays open (all its batches done),
                # so the checkpoint the signal takes reruns validation when resumed.
                return
        self._epoch_complete = True  # a checkpoint taken now resumes at the next epoch
        self._hooks.call(self, "on_train_epoch_end")  # the ModelCheckpoints plan their saves
        self._write_checkpoints(self.checkpoint_callbacks)
        progress.epoch += 1
        progress.batch_idx = 0
        progress.epoch_logged = False
        self._epoch_complete = False
        self._train_state.new_epoch()

    def _validate_during_fit(self, datamodule: DataModule) -> bool:
        """Run validation at an epoch end; `False` if a signal interrupted it."""
        loader = datamodule.val_dataloader()
        if loader is None:
            return True
        self.progress.stage = "validation"
        try:
            self._evaluate("validation", "val", loader, self.limit_val_batches)
        except EvaluationInterrupted:
            return False
        finally:
            self.progress.stage = "train"
        self.progress.validation_runs += 1
        return True

    def _evaluate(self, stage: str, prefix: str, loader: Any, limit: Any) -> dict[str, float]:
        count = num_batches(loader, limit, f"limit_{prefix}_batches")
        hooks = self._hooks
        hooks.call(self, f"on_{stage}_start")
        hooks.call(self, f"on_{stage}_epoch_start")
        computed = run_evaluation(self, stage, loader, count)
        metrics = {f"{prefix}/{k}": v for k, v in computed.items()}
        host = self._update_callback_metrics(metrics) if metrics else {}
        if metrics:
            self._publish(metrics, self.progress.global_step)
        hooks.call(self, f"on_{stage}_epoch_end")
        hooks.call(self, f"on_{stage}_end")
        return host

    def _resume(self, ckpt_path: str, *, continue_stopped: bool) -> None:
        from ._resume import resume_from

        resume_from(self, ckpt_path, continue_stopped=continue_stopped)

    # ------------------------------------------------------------------ evaluation
    def validate(
        self,
        experiment: Experiment | None = None,
        datamodule: DataModule | None = None,
        *,
        ckpt_path: str | None = None,
    ) -> dict[str, float]:
        """Run the validation split once; return `{"val/<metric>": value}`.

        **Arguments:**

        - `experiment`: what to evaluate; default: the experiment the last `fit` returned.
        - `datamodule`: default: the one the last `fit` used.
        - `ckpt_path`: evaluate a checkpoint instead: `"best"` or `"last"` (of the first
          `ModelCheckpoint`'s `dirpath`) or a path; `experiment` (or the fitted one) is the
          template its arrays are loaded into.
        """
        return self._evaluate_standalone(experiment, datamodule, ckpt_path, "validation", "val")

    def test(
        self,
        experiment: Experiment | None = None,
        datamodule: DataModule | None = None,
        *,
        ckpt_path: str | None = None,
    ) -> dict[str, float]:
        """Run the test split once; return `{"test/<metric>": value}`. Arguments as in
        `validate`."""
        return self._evaluate_standalone(experiment, datamodule, ckpt_path, "test", "test")

    def _for_evaluation(
        self,
        experiment: Experiment | None,
        datamodule: DataModule | None,
        ckpt_path: str | None,
        method: str,
    ) -> tuple[Experiment, DataModule]:
        """The experiment and datamodule `validate`/`test`/`predict` work on (see `validate`)."""
        if datamodule is None:
            if self.datamodule is None:
                raise ValueError(
                    f"`trainer.{method}()` needs a datamodule: pass one "
                    f"(`trainer.{method}(experiment, datamodule)`), or call `fit` first to "
                    "use its datamodule."
                )
            datamodule = self.datamodule
        if experiment is None:
            experiment = self._fitted
            if experiment is None:
                raise ValueError(
                    f"`trainer.{method}()` has no experiment: pass one "
                    f"(`trainer.{method}(experiment, datamodule)`), or call `fit` first; "
                    "without one it uses the experiment `fit` returned (with `ckpt_path=`, as "
                    "the template the checkpoint is loaded into)."
                )
        elif self._fit_input is not None and experiment is self._fit_input():
            warnings.warn(
                f"`trainer.{method}` was given the experiment that was passed to `fit`, which "
                "is untrained: `fit` never changes its argument, it returns the trained "
                f"experiment. Use `experiment = trainer.fit(...)`, or call "
                f"`trainer.{method}()` without an experiment to use the fitted one.",
                UserWarning,
                stacklevel=4,
            )
        if ckpt_path is not None:
            from ..checkpointing._export import load
            from ._resume import resolve

            found = resolve(self, ckpt_path)
            if found is None:
                raise FileNotFoundError(
                    f"`ckpt_path={ckpt_path!r}`: there is no checkpoint in "
                    f"`{self.checkpoint_callbacks[0].dirpath}` to {method}."
                )
            experiment = load(found[0], like=experiment)
        return experiment, datamodule

    def _evaluate_standalone(
        self,
        experiment: Experiment | None,
        datamodule: DataModule | None,
        ckpt_path: str | None,
        stage: str,
        prefix: str,
    ) -> dict[str, float]:
        method = "validate" if stage == "validation" else stage
        experiment, datamodule = self._for_evaluation(experiment, datamodule, ckpt_path, method)
        self._attach(experiment)
        self._prepare_data(datamodule, method)
        loader = (
            datamodule.val_dataloader() if stage == "validation" else datamodule.test_dataloader()
        )
        if loader is None:
            raise ValueError(
                f"`{type(datamodule).__name__}.{'val' if stage == 'validation' else 'test'}"
                f"_dataloader()` returned None, so there is nothing to {stage}. Give the "
                f"datamodule a {prefix} split."
            )
        limit = self.limit_val_batches if stage == "validation" else self.limit_test_batches
        with self._run(stage):
            return self._evaluate(stage, prefix, loader, limit)

    def predict(
        self,
        experiment: Experiment | None = None,
        datamodule: DataModule | None = None,
        *,
        ckpt_path: str | None = None,
    ) -> PyTree:
        """Run `predict_step` over the predict split. Arguments as in `validate`.

        **Returns:** the outputs of exactly the real samples, in order, in the structure
        `predict_step` returns, each leaf concatenated along the batch axis (numpy arrays).
        """
        experiment, datamodule = self._for_evaluation(experiment, datamodule, ckpt_path, "predict")
        self._attach(experiment)
        self._prepare_data(datamodule, "predict")
        loader = datamodule.predict_dataloader()
        if loader is None:
            raise ValueError(
                f"`{type(datamodule).__name__}.predict_dataloader()` returned None; give the "
                "datamodule a predict split."
            )
        count = num_batches(loader, self.limit_predict_batches, "limit_predict_batches")
        with self._run("predict"):
            self._hooks.call(self, "on_predict_start")
            self._hooks.call(self, "on_predict_epoch_start")
            outputs = run_predict(self, loader, count)
            self._hooks.call(self, "on_predict_epoch_end")
            self._hooks.call(self, "on_predict_end")
        return outputs

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Flush and close the loggers (also done when the Trainer is used as a context)."""
        self._logging.close()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
