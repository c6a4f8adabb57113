"""The names of every hook, shared by `Callback` and `Experiment`, and the misspelling check."""

import difflib

_STAGE_HOOKS = tuple(
    f"on_{stage}_{scope}_{edge}"
    for stage in ("train", "validation", "test", "predict")
    for scope in ("", "epoch", "batch")
    for edge in ("start", "end")
)

HOOK_NAMES: frozenset[str] = frozenset(
    name.replace("__", "_")
    for name in _STAGE_HOOKS + ("on_fit_start", "on_fit_end", "on_exception", "on_log")
)

# Names users legitimately define on callbacks that start with `on_` but are not hooks.
_NOT_HOOKS = frozenset({"on_device"})


def check_hook_spelling(cls: type, base_name: str) -> None:
    """Raise `TypeError` if `cls` defines an `on_*` method that is a near-miss of a hook name.

    A typo such as `on_train_epoch_ends` would otherwise never be called, silently.
    """
    for name, value in vars(cls).items():
        if not name.startswith("on_") or name in HOOK_NAMES or name in _NOT_HOOKS:
            continue
        if not callable(value):
            continue
        close = difflib.get_close_matches(name, sorted(HOOK_NAMES), n=1, cutoff=0.8)
        if close:
            raise TypeError(
                f"`{cls.__qualname__}.{name}` looks like a {base_name} hook but matches none, "
                f"so it would never be called. Did you mean `{close[0]}`? "
                f"Rename the method (valid hooks: {', '.join(sorted(HOOK_NAMES))})."
            )
