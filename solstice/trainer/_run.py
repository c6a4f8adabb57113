"""`Run`: one fit, validation, test or predict of a Trainer, and the state it advances.

The Trainer holds settings and what outlives a run (callbacks, loggers, history, the compiled
steps it can reuse). A `Run` holds what exists only while (and after) it runs, as
non-optional fields: the experiment's arrays on the devices, the metric accumulators, the
in-step states, the position, why it stopped. Its device state is the `TrainState` value of
a checkpoint (`checkpoint_state`), kept as flat leaf lists between steps for speed.
"""

import contextlib
import hashlib
import logging
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import PartitionSpec
from jaxtyping import PyTree

from .._experiment import Experiment
from .._in_step import FirstNonFinite, InStep
from .._periodic import Every
from .._progress import Progress
from ..checkpointing._checkpoint_state import CheckpointState, RunRecord, TrainState
from ..datamodules import DataModule
from ..loggers._packed import PackedMetrics
from ._accumulators import TrainAccumulators
from ._compile import CompiledSteps
from ._flat import FlatTree
from ._hooks import Hooks, callback_keys
from ._loop_controls import LoopControls
from ._precision import LOSS_SCALE, LossScaleState
from ._step_cost import FirstTrainCall
from ._trace_log import static_differences
from ._user_code import warn_at

if TYPE_CHECKING:
    from ._trainer import Trainer

log = logging.getLogger("solstice")

ANOMALY = "detect_anomaly"  # the name of `Trainer(detect_anomaly=True)`'s in-step state


class Run:
    """The state of one run of `trainer` on `experiment`, and the means to advance it.

    **Arguments:**

    - `trainer`: the Trainer (settings, callbacks, logging, devices, compiled-step cache).
    - `experiment`: the experiment to run (left untouched: its arrays are copied).
    - `stage`: `"train"` (a fit), `"validation"`, `"test"` or `"predict"`.
    """

    def __init__(self, trainer: "Trainer", experiment: Experiment, stage: str):
        if not isinstance(experiment, Experiment):
            raise TypeError(
                f"Expected a `solstice.Experiment`, got `{type(experiment).__name__}`. "
                "Subclass `solstice.Experiment` (or use `solstice.ClassificationExperiment`)."
            )
        self.trainer = trainer
        self.placement = trainer._placement
        experiment = trainer._steps_cache.policy.start(experiment)  # bf16-true: cast once
        self.hooks = Hooks(trainer.callbacks, experiment, trainer, self)
        self.in_steps = self.in_steps_of(trainer) if stage == "train" else {}
        keep = any(self.hooks.active(f"on_{s}_batch_end") for s in ("train", "validation", "test"))
        dyn = eqx.filter(experiment, eqx.is_array)
        # (an evaluation runs no training step: any compiled steps of the structure will do)
        in_steps = self.in_steps if stage == "train" else None
        self.steps: CompiledSteps = trainer._steps_cache.get(experiment, keep, in_steps)
        self.experiment_state = FlatTree(self.place(dyn, copy=True))
        self._experiment_cache: tuple[list, Experiment] | None = None
        self.progress = Progress(stage=stage)
        # when metrics are published (steps); when validation runs and a stop takes effect
        self.log_every = Every(steps=trainer.log_every_n_steps)
        self.controls = LoopControls(trainer)
        self.fitting = stage == "train"
        self.should_stop = False
        self.interrupted = False  # stopped by a signal or `max_time`: a resume continues
        self.stopped: dict[str, Any] | None = None
        self.datamodule: DataModule | None = None
        self.num_training_batches: int | None = None
        self.train_batch_size: int | None = None
        self.signals: Any = None  # while `fit` runs: its `SignalWatch`
        self.agreement: Any = None  # while `fit` runs: its `Agreement`
        self.epoch_done = False  # inside `on_train_epoch_end`: a checkpoint resumes after it
        self.val_metric_names: frozenset[str] | None = None  # known after the sanity check
        self.checked_first_batch = False
        self.resumed_from: tuple[Any, dict[str, Any]] | None = None  # (path, its settings)
        replicated = self.placement.replicated
        self.true = jax.device_put(np.bool_(True), replicated)
        self.false = jax.device_put(np.bool_(False), replicated)
        self.accumulators = TrainAccumulators(self.true, self.false)
        initial = {key: ins.init(experiment) for key, ins in self.in_steps.items()}
        self.in_step_state = FlatTree(self.placement.replicate(initial) if initial else None)
        self.step_counter = jax.device_put(np.int32(0), replicated)
        self.first_train_call: FirstTrainCall | None = None  # for `train_step_cost`

    @staticmethod
    def in_steps_of(trainer: "Trainer") -> dict[str, InStep]:
        """The in-step reductions of a fit of `trainer`: each callback's, by its checkpoint
        name, and `detect_anomaly`'s."""
        in_steps = {}
        for key, cb in callback_keys(trainer.callbacks):
            in_step = cb.in_step()
            if in_step is not None:
                in_steps[key] = in_step
        if trainer.detect_anomaly:
            in_steps[ANOMALY] = FirstNonFinite(inputs=True)
        scaling = trainer._steps_cache.policy.scaling
        if scaling is not None:  # 16-mixed: the dynamic loss scale
            in_steps[LOSS_SCALE] = LossScaleState(scaling)
        return in_steps

    # ------------------------------------------------------------------ the experiment
    def place(self, dyn: PyTree, *, copy: bool) -> PyTree:
        shardings = self.steps.dyn_shardings
        if shardings is None:
            return self.placement.replicate(dyn, copy=copy)
        return self.placement.shard(dyn, shardings, copy=copy)

    @property
    def dyn(self) -> PyTree:
        """The experiment's arrays, as a tree."""
        return self.experiment_state.tree

    @property
    def experiment(self) -> Experiment:
        """The current experiment, rebuilt from its arrays when they changed."""
        cache, leaves = self._experiment_cache, self.experiment_state.leaves
        if cache is None or cache[0] is not leaves:
            cache = self._experiment_cache = (leaves, self.steps.experiment_from_leaves(leaves))
        return cache[1]

    def replace_experiment(self, new: Any, where: str, source: Any = None) -> None:
        """Continue with `new` (returned by `where`: a hook of the experiment, whose function
        is `source`, or a callback's request). A new non-array part compiles the steps again,
        reported once per hook and changed fields by a warning pointing at `source`."""
        if not isinstance(new, Experiment):
            raise TypeError(
                f"`{where}` returned a `{type(new).__name__}`; a hook on the experiment must "
                "return a `solstice.Experiment` (a replacement) or `None`."
            )
        new = self.steps.policy.start(new)
        dyn, static = eqx.partition(new, eqx.is_array)
        if not eqx.tree_equal(static, self.steps.static):
            self._report_recompile(where, source, static, type(new).__name__)
            self.steps = self.trainer._steps_cache.get(
                new, self.steps.keep_step_metrics, self.in_steps, new_structure=True
            )
            self.steps.set_batch_transform(getattr(self.datamodule, "device_transform", None))
        self.hooks.refresh(new)
        self.experiment_state.tree = self.place(dyn, copy=False)
        self._experiment_cache = None

    def _report_recompile(self, where: str, source: Any, static: PyTree, name: str) -> None:
        changes = static_differences(self.steps.static, static, name)
        key = (where, tuple(change.split(":")[0] for change in changes))
        if key in self.trainer._recompile_warned:
            log.info("%s changed the experiment's non-array part: compiling again.", where)
            return
        self.trainer._recompile_warned.add(key)
        warn_at(
            source,
            f"`{where}` returned an experiment whose non-array part changed ("
            f"{'; '.join(changes[:5]) or 'its structure'}), so the steps are compiled again "
            "for it (each time it changes). Keep numbers that change during a run as `jnp` "
            "arrays (e.g. `jnp.asarray(0.5)`), not Python values or `eqx.field(static=True)`.",
            RuntimeWarning,
        )

    # ------------------------------------------------------------------ stopping
    def stop(self, reason: str, by: str, *, final: bool = True) -> None:
        """Stop after the current step (see `Trainer.stop`); the first reason is kept. Not
        `final`: an interruption (a signal, `max_time`), which a resume continues."""
        self.should_stop = True
        self.interrupted = self.interrupted or not final
        if self.stopped is None:
            self.stopped = {
                "by": by,
                "reason": reason,
                "epoch": self.progress.epoch,
                "global_step": self.progress.global_step,
                "final": final,
            }

    def stop_record(self) -> dict[str, Any] | None:
        """What a checkpoint taken now records of a stop, or `None`."""
        if self.stopped is not None:
            return dict(self.stopped)
        if self.should_stop:  # set directly, not through `stop`
            return {
                "by": "should_stop",
                "reason": "`trainer.should_stop` was set to True.",
                "epoch": self.progress.epoch,
                "global_step": self.progress.global_step,
                "final": True,
            }
        return None

    # ------------------------------------------------------------------ metrics
    def publish(self, metrics: Any, step: int) -> None:
        """Send metrics (with the current `"epoch"`) to every `on_log` and the loggers."""
        if isinstance(metrics, PackedMetrics):  # never touch its values here (a dispatch each)
            metrics = metrics.with_items(epoch=self.progress.epoch)
            self.trainer._logged[metrics.names] = metrics
        else:
            metrics = {**metrics, "epoch": self.progress.epoch}
            self.trainer._logged[tuple(metrics)] = metrics
        self.hooks.call("on_log", metrics, step)

    def publish_interval(self, packed: Any) -> None:
        """A log interval was closed on the device (`packed`): publish it, start a new one."""
        self.accumulators.new_interval()
        self.publish(self.steps.unpack("train", packed, "train/"), self.progress.global_step)

    def close_interval(self) -> None:
        """Close a partial log interval (epoch end) with its own compiled call."""
        acc = self.accumulators
        packed, acc.total_flat.tree = self.steps.close_interval(
            "train", acc.acc, acc.total, acc.epoch_flag()
        )
        self.publish_interval(packed)

    def in_step_value(self, key: str) -> PyTree:
        """The current on-device state of the in-step reduction `key`, or `None` if this run
        carries none (see `adopt_in_step`)."""
        states = self.in_step_state.tree
        return None if states is None else states.get(key)

    def adopt_in_step(self, in_steps: dict[str, InStep], states: PyTree) -> None:
        """An evaluation run: carry the in-step reductions and final states of the fit (or the
        checkpoint) whose experiment it evaluates, so that callbacks read them as in that fit
        (e.g. the weight average that `Callback.evaluation_experiment` swaps in)."""
        self.in_steps = dict(in_steps)
        self.in_step_state = FlatTree(states or None)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> CheckpointState:
        """The run's state now: the value a checkpoint holds. Taken at a step boundary or at
        an epoch's end (then it records the start of the next epoch)."""
        trainer = self.trainer
        progress = self.progress.state_dict()
        mid_epoch = progress["batch_idx"] > 0 and self.accumulators.held and not self.epoch_done
        if self.epoch_done:
            progress.update(epoch=progress["epoch"] + 1, batch_idx=0, epoch_logged=False)
        trainer._logging.flush_history()  # the history file must hold every record it counts
        device = TrainState(
            experiment=self.dyn,
            metrics=self.accumulators.metrics() if mid_epoch else None,
            in_step=self.in_step_state.tree or {},
        )
        host = RunRecord(
            progress=progress,
            accumulating=self.accumulators.flags() if mid_epoch else None,
            stopped=self.stop_record(),
            callback_metrics=dict(trainer.callback_metrics),
            datamodule=None if self.datamodule is None else self.datamodule.state_dict(),
            callbacks={
                k: s for k, cb in callback_keys(trainer.callbacks) if (s := cb.state_dict())
            },
            history=trainer.history.state_dict(),
            settings=run_settings(self),
            experiment_type=f"{type(self.experiment).__module__}.{type(self.experiment).__qualname__}",
        )
        return CheckpointState(device, host)


def run_settings(run: Run) -> dict[str, Any]:
    """The settings a checkpoint records, which an exact resume needs unchanged (and the
    limits, to tell whether a resumed run that had stopped should train on)."""
    trainer, datamodule = run.trainer, run.datamodule
    mesh = run.placement.mesh
    return {
        "devices": run.placement.num_devices,
        "processes": jax.process_count(),
        "mesh": ",".join(f"{axis}={size}" for axis, size in mesh.shape.items()),
        "sharding": sharding_layout(run.steps.dyn_shardings),
        "seed": trainer.seed,
        "steps_per_execution": trainer.steps_per_execution,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "log_every_n_steps": trainer.log_every_n_steps,
        "train_batch_size": run.train_batch_size,
        "datamodule": None if datamodule is None else type(datamodule).__qualname__,
        "max_epochs": trainer.max_epochs,
        "max_steps": trainer.max_steps,
        "precision": trainer.precision,
    }


def sharding_layout(shardings: PyTree) -> str:
    """How the experiment's arrays lie on the mesh, in a few words that compare equal exactly
    when the layouts do: `"replicated"`, or `"5 of 9 arrays split (specs 1f2e3d4c)"` (a digest
    of every array's `PartitionSpec`, in tree order)."""
    specs = [_normal_spec(s.spec) for s in jax.tree.leaves(shardings)]
    split = sum(bool(spec) for spec in specs)
    if not split:
        return "replicated"
    digest = hashlib.sha1(repr(specs).encode()).hexdigest()[:8]
    return f"{split} of {len(specs)} arrays split (specs {digest})"


def _normal_spec(spec: PartitionSpec) -> tuple[Any, ...]:
    """`spec` without trailing `None`s (`P("batch")` and `P("batch", None)` are one layout)."""
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return tuple(entries)


def start_run(
    trainer: "Trainer", experiment: Experiment, datamodule: Any, stage: str, setup: str
) -> Run:
    """A new run of `trainer` (its current one from now on), with `datamodule` set up."""
    if not isinstance(datamodule, DataModule):
        raise TypeError(
            f"Expected a `solstice.datamodules.DataModule`, got `{type(datamodule).__name__}`. "
            "Wrap arrays in `ArrayDataModule(...)`."
        )
    run = Run(trainer, experiment, stage)
    if stage != "train" and trainer._run is not None:  # evaluations happen at fit's position
        run.progress.load_state_dict(trainer._run.progress.state_dict())
    run.datamodule = datamodule
    datamodule.prepare_data()
    datamodule.setup(setup)
    run.steps.set_batch_transform(getattr(datamodule, "device_transform", None))
    trainer._run = run
    return run


@contextlib.contextmanager
def running(run: Run, stage: str) -> Iterator[None]:
    """While `run` runs `stage`: `on_exception` hooks if it raises, the logs flushed after."""
    run.progress.stage = stage
    try:
        yield
    except BaseException as exc:
        if run.hooks.active("on_exception"):
            try:
                run.hooks.call("on_exception", exc)
            except Exception as hook_exc:  # noqa: BLE001 - reported; the original propagates
                warnings.warn(
                    f"An `on_exception` hook raised {hook_exc!r}.", RuntimeWarning, stacklevel=3
                )
        raise
    finally:
        run.progress.stage = None
        run.trainer._logging.flush()
