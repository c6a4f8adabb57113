"""Hook dispatch: call each hook only on the experiment and callbacks that override it."""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._experiment import Experiment
from .._hook_names import HOOK_NAMES
from ..callbacks._callback import Callback

if TYPE_CHECKING:
    from ._trainer import Trainer


def _overrides(obj: object, base: type, name: str) -> bool:
    return getattr(type(obj), name, None) is not getattr(base, name)


class Hooks:
    """Resolves, once per run, which objects override which hook.

    `hooks.active(name)` is `False` when nobody overrides `name`, so the loop can skip a
    per-batch hook entirely. The experiment's hook runs first (it may return a replacement
    experiment, which the callbacks then see), then the callbacks in order.
    """

    def __init__(self, callbacks: Sequence[Callback], experiment: Experiment):
        self.callbacks = list(callbacks)
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

    def call(self, trainer: "Trainer", name: str, *args: Any) -> None:
        """Call hook `name` on the experiment (which may replace itself) and the callbacks."""
        if self._experiment_has[name]:
            experiment = trainer.experiment
            replacement = getattr(experiment, name)(trainer, *args)
            if replacement is not None:
                where = f"{type(experiment).__name__}.{name}"
                trainer._replace_experiment(replacement, where, getattr(type(experiment), name))
        callbacks = self._callbacks_for[name]
        if callbacks:
            # Rebuilding the experiment from its arrays costs ~30-100 us: only for callbacks
            # that may read it (the built-in logging and progress bar do not).
            experiment = None
            for cb in callbacks:
                if experiment is None and cb._reads_experiment:
                    experiment = trainer.experiment
                getattr(cb, name)(trainer, experiment, *args)
