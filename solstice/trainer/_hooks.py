"""Hook dispatch: call each hook only on the experiment and callbacks that override it."""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._experiment import Experiment
from .._hook_names import HOOK_NAMES
from .._view import TrainerView
from ..callbacks import Callback

if TYPE_CHECKING:
    from ._run import Run


def _overrides(obj: object, base: type, name: str) -> bool:
    return getattr(type(obj), name, None) is not getattr(base, name)


def callback_keys(callbacks: Sequence[Callback]) -> list[tuple[str, Callback]]:
    """Stable names for callbacks in a checkpoint: `state_key` if a callback has one, else its
    class name; repeated names get `#1`, `#2`, ... in order."""
    seen: dict[str, int] = {}
    out = []
    for cb in callbacks:
        base = getattr(cb, "state_key", None) or type(cb).__qualname__
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.append((base if n == 0 else f"{base}#{n}", cb))
    return out


class Hooks:
    """Resolves, once per run, which objects override which hook, and calls them.

    `active(name)` is `False` when nobody overrides `name`, so the loop can skip a per-batch
    hook entirely. The experiment's hook runs first (it may return a replacement experiment,
    which the callbacks then see), then the callbacks in order. Hooks receive `view` (the
    Trainer, as a `TrainerView`).
    """

    def __init__(
        self, callbacks: Sequence[Callback], experiment: Experiment, view: TrainerView, run: "Run"
    ):
        self.callbacks = list(callbacks)
        self.view = view
        self.run = run
        self._callbacks_for = {
            name: [cb for cb in self.callbacks if _overrides(cb, Callback, name)]
            for name in HOOK_NAMES
        }
        self._experiment_type = type(experiment)
        self._experiment_has = {
            name: _overrides(experiment, Experiment, name) for name in HOOK_NAMES
        }

    def refresh(self, experiment: Experiment) -> None:
        """Re-resolve the experiment's hooks if it was replaced by one of another type."""
        if type(experiment) is not self._experiment_type:
            self._experiment_type = type(experiment)
            self._experiment_has = {
                name: _overrides(experiment, Experiment, name) for name in HOOK_NAMES
            }

    def active(self, name: str) -> bool:
        return self._experiment_has[name] or bool(self._callbacks_for[name])

    def call(self, name: str, *args: Any) -> None:
        """Call hook `name` on the experiment (which may replace itself) and the callbacks."""
        run, view = self.run, self.view
        if self._experiment_has[name]:
            experiment = run.experiment
            replacement = getattr(experiment, name)(view, *args)
            if replacement is not None:
                where = f"{type(experiment).__name__}.{name}"
                run.replace_experiment(replacement, where, getattr(type(experiment), name))
        callbacks = self._callbacks_for[name]
        if callbacks:
            # Rebuilding the experiment from its arrays costs ~30-100 us: only for callbacks
            # that may read it (the built-in logging and progress bar do not).
            reader: Experiment | None = None
            for cb in callbacks:
                if reader is None and cb._reads_experiment:
                    reader = run.experiment
                getattr(cb, name)(view, reader, *args)
