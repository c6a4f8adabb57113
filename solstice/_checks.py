"""Argument checks shared by every public constructor: one message per kind of mistake."""

from typing import Any


def check_int(name: str, value: Any, *, minimum: int = 0, allow_none: bool = False) -> None:
    """Raise `ValueError` unless `value` is an int >= `minimum` (or `None`, if allowed).

    `name` is how the user wrote the argument, e.g. ``"`Trainer(max_epochs=...)`"`` or
    ``"max_epochs"`` (then shown in backticks).
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        label = name if name.startswith("`") else f"`{name}`"
        raise ValueError(f"{label} must be an int >= {minimum}, got {value!r}.")


def check_seconds(name: str, value: Any, *, allow_none: bool = True) -> float | None:
    """A positive duration in seconds (a number or a `datetime.timedelta`), as a float."""
    import datetime

    if value is None and allow_none:
        return None
    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value < float("inf")
    ):
        label = name if name.startswith("`") else f"`{name}`"
        raise ValueError(
            f"{label} must be a `datetime.timedelta` or a positive number of seconds, got "
            f"{value!r}."
        )
    return float(value)
