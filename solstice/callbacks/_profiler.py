"""`ProfilerCallback`: `jax.profiler` traces of a few training steps, now and then."""

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

import jax

from .._checks import check_int
from .._periodic import Every
from ._callback import Callback

_log = logging.getLogger("solstice")


@dataclasses.dataclass(frozen=True)
class Trace:
    """One profiler trace: its directory (`tensorboard --logdir` or `xprof --logdir` it, or
    a folder above it) and the training steps it covers (counting from 1, inclusive)."""

    dirpath: str
    first_step: int
    last_step: int


class ProfilerCallback(Callback):
    """Records `jax.profiler` traces of `num_steps` training steps from step `start_step`,
    and again every `every_seconds` seconds if given.

    Each trace starts before its first step is dispatched and stops after its last step
    has run on the devices (the callback waits for them, `trainer.block_until_ready()`),
    so it holds exactly the device work of its steps, with the host's dispatch. It is
    written to `<dirpath>/step_<first>/plugins/profile/<timestamp>/<host>.xplane.pb` (and a
    `.trace.json.gz`), and described in `traces`. `dirpath` defaults to `profile/` inside
    the first logger's `log_dir` (e.g. the `TensorBoardLogger`'s), so the traces sit beside
    the run's logs. Open them in TensorBoard's profile plugin (`pip install
    tensorboard-plugin-profile`, then `tensorboard --logdir <log_dir>`, tab *Profile*) or in
    XProf (`pip install xprof`, then `xprof --logdir <dirpath>`): the trace viewer shows
    each step's kernels, the op profile and memory views come with it.

    The steps are those `trainer.global_step` counts after them: `start_step=5,
    num_steps=3` traces steps 5, 6 and 7. With `steps_per_execution > 1` a trace starts
    and stops at call boundaries, so it covers whole fused calls (`traces` says which
    steps). The callback uses a per-batch hook (`on_train_batch_start`), so while it is
    in the callbacks each step's batch is fed to the step (rather than gathered inside
    it, for a DataModule whose data lives on the devices); without it, nothing of it runs.

    **Arguments:**

    - `dirpath`: where the traces go (default: `<first logger's log_dir>/profile`).
    - `start_step`: the first traced step (skip the first few: they compile).
    - `num_steps`: how many steps each trace covers.
    - `every_seconds`: if given, trace `num_steps` steps again whenever this many seconds
      have passed since the previous trace began.
    - `clock`: the time source for `every_seconds` (tests drive it).

    **Example:**

    ```python
    profiler = ProfilerCallback(start_step=10, num_steps=5, every_seconds=3600)
    trainer = solstice.Trainer(loggers=[TensorBoardLogger("runs/a")], callbacks=[profiler])
    trainer.fit(experiment, datamodule)
    print(profiler.traces)  # [Trace(dirpath='runs/a/profile/step_10', first_step=10, ...)]
    ```
    """

    _reads_experiment = False

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        *,
        start_step: int = 5,
        num_steps: int = 5,
        every_seconds: float | None = None,
        clock: Callable[[], float] | None = None,
    ):
        check_int("ProfilerCallback(start_step=...)", start_step, minimum=1)
        check_int("ProfilerCallback(num_steps=...)", num_steps, minimum=1)
        self.dirpath = None if dirpath is None else os.fspath(dirpath)
        self.start_step = start_step
        self.num_steps = num_steps
        self.repeat = Every(seconds=every_seconds, clock=clock)
        self.traces: list[Trace] = []
        self._root: str | None = None
        self._tracing: tuple[str, int] | None = None  # (directory, first step)

    def on_fit_start(self, trainer, experiment) -> None:
        self._root = self.dirpath or self._beside_the_logs(trainer)

    @staticmethod
    def _beside_the_logs(trainer) -> str:
        for logger in trainer.loggers:
            log_dir = getattr(logger, "log_dir", None)
            if log_dir:
                return os.path.join(os.fspath(log_dir), "profile")
        raise ValueError(
            "`ProfilerCallback()` writes its traces beside the run's logs, but no logger of "
            "this Trainer has a `log_dir`. Pass the directory: "
            "`ProfilerCallback('runs/profile')`, or add a `TensorBoardLogger`/`CSVLogger`."
        )

    def on_train_batch_start(self, trainer, experiment, batch, batch_idx: int) -> None:
        if batch_idx != trainer.progress.batch_idx:  # inside a fused call: act at its start
            return
        done = trainer.global_step  # steps dispatched so far
        if self._tracing is not None:
            if done - self._tracing[1] + 1 >= self.num_steps:
                self._stop(trainer)
            return
        first_due = not self.traces and done + 1 >= self.start_step
        if first_due or (self.traces and self.repeat.time_due()):
            self._start(trainer, done + 1)

    def _start(self, trainer, first_step: int) -> None:
        assert self._root is not None
        directory = os.path.join(self._root, f"step_{first_step}")
        trainer.block_until_ready()  # the trace holds this step's work, not the previous'
        jax.profiler.start_trace(directory)
        self.repeat.start(first_step)
        self._tracing = (directory, first_step)

    def _stop(self, trainer) -> None:
        assert self._tracing is not None
        trainer.block_until_ready()  # every traced step has run on the devices
        jax.profiler.stop_trace()
        directory, first = self._tracing
        self._tracing = None
        self.traces.append(Trace(directory, first, trainer.global_step))
        _log.info(
            "ProfilerCallback: traced steps %d-%d into %s.", first, trainer.global_step, directory
        )

    def on_train_end(self, trainer, experiment) -> None:
        if self._tracing is not None:
            self._stop(trainer)

    def on_exception(self, trainer, experiment, exception: BaseException) -> None:
        if self._tracing is not None:
            try:
                self._stop(trainer)
            except Exception:  # noqa: BLE001 - the run's own exception is the one to see
                self._tracing = None
                _log.warning("ProfilerCallback: the trace could not be completed.")

    def state_dict(self) -> dict[str, Any]:
        return {"traces": [dataclasses.asdict(t) for t in self.traces]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.traces = [Trace(**t) for t in state.get("traces", [])]
