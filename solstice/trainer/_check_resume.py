"""`check_resume`: check that an interrupted and resumed run ends bit for bit like one that
never stopped."""

import dataclasses
import math
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np

from .._checks import check_int
from ..callbacks import Callback, ModelCheckpoint
from ..checkpointing._tree import is_key, leaves_with_paths
from ._trainer import Trainer


class _Interrupted(Exception):
    """Raised by `_InterruptAt` to end the first part of the interrupted run."""


class _InterruptAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, experiment, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise _Interrupted


@dataclasses.dataclass
class ResumeReport:
    """The outcome of `check_resume`; true when nothing differs.

    **Attributes:**

    - `interrupt_at`: the global step at which the run was interrupted.
    - `total_steps`: the steps of the whole run.
    - `checkpoint`: the checkpoint the run resumed from.
    - `differences`: what differs between the resumed and the uninterrupted run (empty when
      they match bit for bit).
    """

    interrupt_at: int
    total_steps: int
    checkpoint: str
    differences: list[str]

    @property
    def ok(self) -> bool:
        return not self.differences

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        head = (
            f"interrupted after step {self.interrupt_at} of {self.total_steps}, resumed from "
            f"`{self.checkpoint}`"
        )
        if self.ok:
            return (
                f"Resume check passed ({head}): parameters, optimizer and PRNG state, progress "
                "and every logged metric are bit-identical."
            )
        listed = "\n".join(f"- {d}" for d in self.differences)
        return f"Resume check FAILED ({head}):\n{listed}"


def _kwargs_factory(trainer_kwargs: Any) -> Callable[[], dict[str, Any]]:
    if trainer_kwargs is None:
        return dict
    if callable(trainer_kwargs):
        return lambda: dict(trainer_kwargs())
    if not isinstance(trainer_kwargs, dict):
        raise TypeError(
            "`trainer_kwargs` must be a dict of `Trainer` arguments or a function returning "
            f"one, got {type(trainer_kwargs).__name__}."
        )
    if trainer_kwargs.get("callbacks") or trainer_kwargs.get("loggers"):
        raise ValueError(
            "`trainer_kwargs` holds `callbacks`/`loggers`, which keep state and cannot be "
            "shared by the three runs of the check. Pass a function that builds the kwargs "
            "afresh instead: `trainer_kwargs=lambda: dict(max_epochs=2, callbacks=[...])`."
        )
    return lambda: dict(trainer_kwargs)


def _bits(x: Any) -> np.ndarray:
    if is_key(x):
        x = jax.random.key_data(x)
    return np.asarray(jax.device_get(x))


def _compare_arrays(expected: Any, got: Any, differences: list[str]) -> None:
    paths, a_leaves, _ = leaves_with_paths(eqx.filter(expected, eqx.is_array))
    b_paths, b_leaves, _ = leaves_with_paths(eqx.filter(got, eqx.is_array))
    if paths != b_paths:
        differences.append("the experiments have different arrays (pytree paths differ)")
        return
    for path, a, b in zip(paths, a_leaves, b_leaves):
        a, b = _bits(a), _bits(b)
        if a.dtype != b.dtype or a.shape != b.shape:
            differences.append(
                f"experiment `{path}`: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
            )
        elif a.tobytes() != b.tobytes():
            unequal = a != b
            if np.issubdtype(a.dtype, np.inexact):
                unequal &= ~(np.isnan(a) & np.isnan(b))
                diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
                extra = f", max |difference| {diff:.3g}"
            else:
                extra = ""
            differences.append(
                f"experiment `{path}`: {int(np.sum(unequal))} of {a.size} values differ{extra}"
            )


def _same_float(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _compare_metrics(name: str, expected: dict, got: dict, differences: list[str]) -> None:
    for key in sorted(set(expected) | set(got)):
        a, b = expected.get(key), got.get(key)
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            bad = [i for i, (x, y) in enumerate(zip(a, b)) if not _same_float(x, y)]
            if bad:
                i = bad[0]
                differences.append(
                    f"{name} `{key}`: {len(bad)} of {len(a)} entries differ (first: entry "
                    f"{i}, {a[i]!r} vs {b[i]!r})"
                )
        elif not _same_float(a, b):
            differences.append(f"{name} `{key}`: {a!r} vs {b!r}")


def check_resume(
    make_experiment: Callable[[], Any],
    make_datamodule: Callable[[], Any],
    trainer_kwargs: "dict[str, Any] | Callable[[], dict[str, Any]] | None" = None,
    *,
    interrupt_at: int,
    dirpath: str | None = None,
) -> ResumeReport:
    """Check that your run resumes exactly: interrupted and resumed, it ends bit for bit like
    a run that never stopped. Three runs, each with a fresh `Trainer(**trainer_kwargs)`,
    experiment and datamodule: straight through; stopped right after a `ModelCheckpoint`
    saved at step `interrupt_at` (as a preempted job); resumed from that checkpoint to the
    end. The final experiments of the first and last are compared bit for bit (every array),
    and so are their progress, `callback_metrics` and history. Use it in your own tests, at a
    step inside an epoch and at one on an epoch boundary; keep the run small. **Arguments:**

    - `make_experiment`, `make_datamodule`: build the initial experiment and the datamodule
      (called three times; the same each time, e.g. from a fixed seed).
    - `trainer_kwargs`: the `Trainer` arguments, or a function returning them (needed when
      they hold callbacks or loggers, which must be new for each run).
    - `interrupt_at`: the global step after which the second run stops (>= 1, fewer than the
      run's steps, a multiple of `steps_per_execution`).
    - `dirpath`: where its checkpoint goes (default: a temporary directory).

    **Returns:** a `ResumeReport`, true when everything matches; `str(report)` explains.

    **Example:**

    ```python
    kwargs = dict(max_epochs=2, log_every_n_steps=5)
    report = solstice.check_resume(make_experiment, Digits, kwargs, interrupt_at=7)
    assert report, report
    ```
    """
    check_int("check_resume(interrupt_at=...)", interrupt_at, minimum=1)
    make = _trainer_factory(_kwargs_factory(trainer_kwargs))
    straight = make()
    expected = straight.fit(make_experiment(), make_datamodule())
    _check_interrupt(interrupt_at, straight)
    with tempfile.TemporaryDirectory(prefix="solstice-check-resume-") as tmp:
        checkpoint = ModelCheckpoint(
            dirpath or tmp, every_n_train_steps=interrupt_at, every_n_epochs=None
        )
        first = make([checkpoint, _InterruptAt(interrupt_at)])
        try:
            first.fit(make_experiment(), make_datamodule())
        except _Interrupted:
            pass
        path = checkpoint.last_model_path
        if not path:
            raise RuntimeError(f"The run was not checkpointed at step {interrupt_at}.")
        resumed = make()
        got = resumed.fit(make_experiment(), make_datamodule(), ckpt_path=path)
        differences = _differences(straight, expected, resumed, got)
        for t in (straight, first, resumed):
            t.close()
    return ResumeReport(interrupt_at, straight.global_step, path, differences)


def _trainer_factory(make_kwargs: Callable[[], dict[str, Any]]) -> Callable[..., Trainer]:
    def make(extra_callbacks: Sequence[Callback] = ()) -> Trainer:
        kwargs = make_kwargs()
        kwargs.setdefault("enable_progress_bar", False)
        if kwargs.get("fast_dev_run"):
            raise ValueError("`check_resume` cannot run with `fast_dev_run`, which never saves.")
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), *extra_callbacks]
        return Trainer(**kwargs)

    return make


def _check_interrupt(interrupt_at: int, straight: Trainer) -> None:
    total = straight.global_step
    if interrupt_at >= total:
        raise ValueError(
            f"`interrupt_at={interrupt_at}` but the whole run has {total} steps; choose a step "
            f"from 1 to {total - 1}."
        )
    if interrupt_at % straight.steps_per_execution:
        raise ValueError(
            f"`interrupt_at={interrupt_at}` is not a multiple of `steps_per_execution="
            f"{straight.steps_per_execution}`: a run can only stop between fused calls."
        )


def _differences(straight: Trainer, expected: Any, resumed: Trainer, got: Any) -> list[str]:
    """What differs between the run that never stopped and the resumed one."""
    differences: list[str] = []
    _compare_arrays(expected, got, differences)
    _compare_metrics(
        "progress", straight.progress.state_dict(), resumed.progress.state_dict(), differences
    )
    _compare_metrics(
        "callback_metrics", straight.callback_metrics, resumed.callback_metrics, differences
    )
    for t in (straight, resumed):
        t.flush_logs()
    _compare_metrics(
        "logged metric", straight.history.metrics, resumed.history.metrics, differences
    )
    _compare_metrics("log steps of", straight.history.steps, resumed.history.steps, differences)
    return differences
